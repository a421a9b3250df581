"""The attack of issue 10, replayed against real processes: a crafted `run_reference` message whose
campaign's settings name `subprocess.Popen` with a shell command, sent through Redis to a real
`graceq worker` and through Flower's HTTP API. No command may run, the refusal is logged, nothing
is written, and the worker goes on serving a normal task.

Before the fix the worker ran the command (the marker file appeared): see the first test's
`--allow-code` control, which shows that the same message does run code when the operator allows it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import GRACEQ, celery_client, free_port, run_cli, wait_port, write_subset, bundled


def _campaign(folder: Path, pool: Path) -> Path:
    """A real campaign (graceq init, replay engine) in folder/camp, its pool file beside it (a
    worker with campaign roots reads no file outside them, the replay engine's source included)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = Path(shutil.copy(pool, folder / pool.name))
    settings = folder / "settings.toml"
    settings.write_text(f'[campaign]\npool = "{pool}"\nunit = "kJ/mol"\nwindow = 5.0\nn_init = 8\nn_batch = 2\n')
    run_cli("init", str(folder / "camp"), "--settings", str(settings))
    return folder / "camp"


def _make_hostile(campaign: Path, marker: Path) -> None:
    """Rewrite the campaign's [engine] as the attacker would: a shell command as the 'calculator'."""
    text = (campaign / "settings.toml").read_text()
    hostile = ('[engine]\nengine = "ase"\ncalculator = "subprocess.Popen"\n\n[engine.calculator_parameters]\n'
               f'args = "touch {marker}"\nshell = true\n')
    text = re.sub(r'\[engine\]\nengine = "replay"\n', hostile, text)
    assert "subprocess.Popen" in text
    (campaign / "settings.toml").write_text(text)


def _name(campaign: Path, idx: int) -> str:
    from graceq.trust import pool_name

    return pool_name(campaign, idx)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return write_subset(bundled("roy264", "roy264.extxyz"), tmp_path_factory.mktemp("pool") / "roy12.extxyz", 22)


def _start_worker(workers, root: Path | None, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`graceq worker` as an operator starts it: --campaign-root, broker from the environment."""
    cmd = GRACEQ + ["worker", "--queues", "dft", "--concurrency", "1", "--name", f"sec{len(workers.procs)}@%h",
                    "--loglevel", "INFO", *extra]
    if root is not None:
        cmd += ["--campaign-root", str(root)]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, GRACEQ_BROKER_URL=workers.broker, **(env or {})))
    workers.procs.append(proc)
    return proc


def _wait_ready(client, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"worker not ready:\n{log.read_text()}")


def test_crafted_message_through_redis_runs_no_command(pool, workers, redis_url, tmp_path):
    root = tmp_path / "campaigns"
    legit = _campaign(root / "alice", pool)
    foreign = _campaign(tmp_path / "elsewhere" / "mallory", pool)  # outside the worker's roots
    inside = _campaign(root / "mallory", pool)  # a campaign author on the shared pool
    marker = tmp_path / "PWNED"
    _make_hostile(foreign, marker)
    _make_hostile(inside, marker)
    before = {c: _files(c) for c in (foreign, inside)}

    log = tmp_path / "worker.log"
    _start_worker(workers, root, log)
    client = celery_client(redis_url)
    _wait_ready(client, log)

    refused = {
        "foreign campaign_dir": [str(foreign), 0, _name(foreign, 0)],
        "settings that name code": [str(inside), 0, _name(inside, 0)],
        "a campaign_dir that is no campaign": [str(tmp_path), 0, "x"],
        "negative idx": [str(legit), -1, _name(legit, 0)],
        "idx past the pool": [str(legit), 12, _name(legit, 0)],
        "a neighbour's name": [str(legit), 0, _name(legit, 1)],
        "idx that is not an integer": [str(legit), "0", _name(legit, 0)],
    }
    for what, args in refused.items():
        result = client.send_task("graceq.run_reference", args=args, queue="dft")
        result.get(timeout=300, propagate=False)
        assert result.state == "FAILURE", (what, result.state, result.result)
        assert "UntrustedMessage" in repr(result.result) or type(result.result).__name__ == "UntrustedMessage", what
    negative_iteration = client.send_task("graceq.select_lambda", args=[str(legit), -5], queue="dft")
    negative_iteration.get(timeout=300, propagate=False)
    assert negative_iteration.state == "FAILURE"

    assert not marker.exists(), "the settings file ran a command on the worker"
    for campaign, files in before.items():
        assert _files(campaign) == files, f"files were written in {campaign}"
    assert not (legit / "jobs").exists() and not (legit / "results").exists() and not (legit / "iterations").exists()
    text = log.read_text()
    assert "outside this worker's campaign roots" in text
    assert "may not name code" in text and "subprocess.Popen" in text
    assert "is named" in text and "idx must be >= 0" in text and "iteration must be >= 0" in text

    # the worker goes on serving: a normal reference job of the legitimate campaign
    ok = client.send_task("graceq.run_reference", args=[str(legit), 3, _name(legit, 3)], queue="dft")
    assert ok.get(timeout=300)["status"] == "converged"
    assert json.loads((legit / "results" / "000003.json").read_text())["name"] == _name(legit, 3)
    client.close()


def test_the_same_message_runs_the_command_only_where_the_operator_allows_code(pool, workers, redis_url, tmp_path):
    """The control: with --allow-code the operator accepts settings code, and the command runs.

    This is what every worker did before issue 10 (reproduced then with this very message)."""
    root = tmp_path / "campaigns"
    campaign = _campaign(root / "mallory", pool)
    marker = tmp_path / "PWNED"
    _make_hostile(campaign, marker)
    log = tmp_path / "worker.log"
    _start_worker(workers, root, log, "--allow-code")
    client = celery_client(redis_url)
    _wait_ready(client, log)
    client.send_task("graceq.run_reference", args=[str(campaign), 0, _name(campaign, 0)],
                     queue="dft").get(timeout=300, propagate=False)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    assert "settings code ALLOWED" in log.read_text()
    client.close()


def _http(method: str, url: str, auth: str | None = None, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_crafted_message_through_flower_api_runs_no_command(pool, workers, redis_url, tmp_path):
    root = tmp_path / "campaigns"
    legit = _campaign(root / "alice", pool)
    foreign = _campaign(tmp_path / "elsewhere" / "mallory", pool)
    marker = tmp_path / "PWNED"
    _make_hostile(foreign, marker)
    before = _files(foreign)
    log = tmp_path / "worker.log"
    _start_worker(workers, root, log)
    client = celery_client(redis_url)
    _wait_ready(client, log)

    port = free_port()
    auth = "admin:" + os.urandom(8).hex()
    broker_file = tmp_path / "broker_url"
    broker_file.write_text(redis_url + "\n")
    broker_file.chmod(0o600)
    flower_log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen(GRACEQ + ["flower", "--broker-file", str(broker_file), "--port", str(port)],
                              stdout=flower_log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=dict(os.environ, GRACEQ_FLOWER_BASIC_AUTH=auth))
    workers.procs.append(flower)
    wait_port(port, flower, "flower", timeout=300)
    base = f"http://127.0.0.1:{port}"
    apply = f"{base}/api/task/async-apply/graceq.run_reference"
    assert _http("POST", apply, None, {"args": [str(foreign), 0, _name(foreign, 0)]})[0] == 401
    status, body = _http("POST", apply, auth, {"args": [str(foreign), 0, _name(foreign, 0)]})
    assert status == 200, body
    task_id = json.loads(body)["task-id"]
    deadline = time.time() + 300
    while f"refused task graceq.run_reference[{task_id}]" not in log.read_text():
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    assert "outside this worker's campaign roots" in log.read_text()
    assert not marker.exists()
    assert _files(foreign) == before

    # /metrics is behind the same authentication (Flower 2.x serves it to anyone by itself)
    assert _http("GET", f"{base}/metrics")[0] == 401
    assert _http("GET", f"{base}/metrics", auth)[0] == 200

    # the worker goes on serving, also tasks sent through Flower
    status, body = _http("POST", apply, auth, {"args": [str(legit), 2, _name(legit, 2)]})
    assert status == 200, body
    deadline = time.time() + 300
    while not (legit / "results" / "000002.json").exists():
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    assert json.loads((legit / "results" / "000002.json").read_text())["status"] == "converged"
    client.close()


# -- secrets stay out of sight ------------------------------------------------------------------
def _ps() -> str:
    """Every process's whole command line, one per line, as `ps -eww -o args` shows them to any
    user (read from /proc directly: no column width can cut a line short)."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:  # the process ended while the listing was read
            continue
    return "\n".join(lines)


@pytest.fixture
def password_redis(tmp_path):
    """A private redis-server that asks for a password; the password is given in its config file,
    not on its command line (which this test reads with ps)."""
    password = os.urandom(12).hex()
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\nrequirepass {password}\n")
    conf.chmod(0o600)
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL)
    wait_port(port, proc, "redis-server")
    yield password, f"redis://:{password}@127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_ps_never_shows_the_broker_password(pool, password_redis, tmp_path):
    """`graceq run --broker-file`, `graceq worker --broker-file` and `graceq flower --broker-file`
    (the documented commands) through a whole campaign: the password is in no process's argv."""
    password, url = password_redis
    broker_file = tmp_path / "broker_url"
    broker_file.write_text(url + "\n")
    broker_file.chmod(0o600)
    settings = tmp_path / "settings.toml"
    pool = Path(shutil.copy(pool, tmp_path / pool.name))  # inside the worker's campaign root
    settings.write_text(f'[campaign]\npool = "{pool}"\nunit = "kJ/mol"\nwindow = 5.0\nn_init = 8\nn_batch = 2\n'
                        'budget = 10\n[model]\nn_members = 16\nmembers_per_task = 8\n[descriptor]\nchunk_size = 4\n'
                        'n_max = 4\nl_max = 2\nn_compressed = 2\n')
    env = {k: v for k, v in os.environ.items() if k != "GRACEQ_BROKER_URL"}
    env["GRACEQ_FLOWER_BASIC_AUTH"] = "admin:" + os.urandom(6).hex()
    procs = []
    try:
        procs.append(subprocess.Popen(GRACEQ + ["worker", "--broker-file", str(broker_file), "-c", "1",
                                                "--campaign-root", str(tmp_path)],
                                      stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True))
        port = free_port()
        procs.append(subprocess.Popen(GRACEQ + ["flower", "--broker-file", str(broker_file), "--port", str(port)],
                                      stdout=open(tmp_path / "flower.log", "wb"), stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True))
        run = subprocess.Popen(GRACEQ + ["run", str(tmp_path / "camp"), "--settings", str(settings), "--quiet",
                                         "--broker-file", str(broker_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(run)
        seen = {"celery": 0, "run_flower": 0}
        while run.poll() is None:
            listing = _ps()
            assert password not in listing, [line for line in listing.splitlines() if password in line]
            for word in seen:
                seen[word] += word in listing
            time.sleep(0.1)
        out = run.stdout.read().decode()
        assert run.returncode == 0, out
        # the workers and Flower were up while the listing was read
        logs = {name: (tmp_path / name).read_text(errors="replace")[-3000:] for name in ("worker.log", "flower.log")}
        assert all(seen.values()), (seen, logs)
        assert "reference calls" in out and password not in out
        # a URL on the command line: warned about, and `graceq run` goes on without it in its argv
        again = subprocess.Popen(GRACEQ + ["run", str(tmp_path / "camp"), "--broker", url, "--budget", "24",
                                           "--quiet"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(again)
        # the URL is in the first argv until `graceq run` replaces itself (same pid) with one without
        # it; from then on no process shows the password (before its first exec the child still
        # shows pytest's command line: the replacement is a graceq command line without the URL)
        own = Path(f"/proc/{again.pid}/cmdline")
        replaced, late = False, []
        while again.poll() is None:
            try:
                cmdline = own.read_bytes()
            except OSError:
                break
            replaced = replaced or (b"graceq.cli" in cmdline and password.encode() not in cmdline)
            if replaced:
                late.append(_ps())
            time.sleep(0.05)
        out = again.communicate(timeout=300)[0].decode()
        assert again.returncode == 0, out
        assert "visible to every user" in out and password not in out
        assert late and all(password not in listing for listing in late)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    for log in ("worker.log", "flower.log"):
        assert password not in (tmp_path / log).read_text(errors="replace")


PILOT = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "graceq-workers.sbatch"


def _stored_environment(job_id: str) -> str | None:
    """What slurmctld keeps of a batch job's environment (its state files; root only)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    match = re.search(r"StateSaveLocation\s*=\s*(\S+)", out)
    if not match:
        return None
    for path in Path(match.group(1)).glob(f"hash.*/job.{job_id}/environment"):
        return path.read_bytes().replace(b"\0", b"\n").decode(errors="replace")
    return None


def test_the_pilot_job_keeps_the_broker_url_out_of_the_stored_job_environment(slurm, password_redis, tmp_path):
    password, url = password_redis
    broker_file = tmp_path / "broker_url"
    broker_file.write_text(url + "\n")
    broker_file.chmod(0o600)
    graceq = Path(sys.executable).with_name("graceq")
    env = dict(os.environ, GRACEQ_BROKER_URL=url,  # a user who also has it in the shell
               GRACEQ_BROKER_FILE=str(broker_file), GRACEQ_QUEUES="dft",
               GRACEQ=str(graceq) if graceq.exists() else " ".join(GRACEQ))
    # --time above the pilot's --signal=TERM@300, or SLURM sends the warm-shutdown TERM at once
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/pilot-%j.out", "--time=00:10:00",
                          str(PILOT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    try:
        stored = _stored_environment(job_id)
        if stored is not None:
            assert password not in stored and "GRACEQ_BROKER_URL=\n" in stored + "\n"
        client = celery_client(url)
        deadline = time.time() + 300
        while not any(f"-{job_id}-0@" in name for reply in (client.control.ping(timeout=1.0) or [])
                      for name in reply):
            assert time.time() < deadline, (tmp_path / f"pilot-{job_id}.out").read_text()
            time.sleep(0.5)
        assert client.send_task("graceq.noop", args=[7], queue="dft").get(timeout=300) == 7
        client.close()
    finally:
        subprocess.run(["scancel", "--signal=TERM", job_id], capture_output=True)
    deadline = time.time() + 300
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline
        time.sleep(0.5)
    assert password not in (tmp_path / f"pilot-{job_id}.out").read_text()

    # an --export on the command line puts the URL back into the job: the pilot refuses to start
    bad = subprocess.run(["sbatch", "--parsable", "--wait", "--export=ALL", f"--output={tmp_path}/bad-%j.out",
                          "--time=00:02:00", str(PILOT)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    bad_id = bad.stdout.strip().split(";")[0]
    assert bad.returncode != 0
    assert "reached the job environment" in (tmp_path / f"bad-{bad_id}.out").read_text()


# -- message signing -------------------------------------------------------------------------------
def test_signing_workers_refuse_unsigned_and_mis_signed_messages(pool, workers, redis_url, tmp_path, monkeypatch):
    """With GRACEQ_SIGNING_KEY the coordinator signs every message and workers check it before the
    task runs; a whole campaign runs signed."""
    from graceq import trust

    key = os.urandom(16).hex()
    log = tmp_path / "worker.log"
    _start_worker(workers, tmp_path, log, env={trust.ENV_SIGNING_KEY: key})
    client = celery_client(redis_url)
    _wait_ready(client, log)
    assert "message signing: required" in log.read_text()

    monkeypatch.delenv(trust.ENV_SIGNING_KEY, raising=False)
    unsigned = client.send_task("graceq.noop", args=[1], queue="dft")
    unsigned.get(timeout=300, propagate=False)
    monkeypatch.setenv(trust.ENV_SIGNING_KEY, "not-the-key")
    forged = client.send_task("graceq.noop", args=[2], queue="dft")
    forged.get(timeout=300, propagate=False)
    monkeypatch.setenv(trust.ENV_SIGNING_KEY, key)
    assert client.send_task("graceq.noop", args=[3], queue="dft").get(timeout=300) == 3
    assert unsigned.state == forged.state == "FAILURE"
    text = log.read_text()
    assert f"refused task graceq.noop[{unsigned.id}]" in text and "is not signed" in text
    assert f"refused task graceq.noop[{forged.id}]" in text and "signature does not match" in text
    client.close()

    # a campaign whose coordinator has the key: every featurize, fit and dft message verifies
    settings = tmp_path / "settings.toml"
    pool = Path(shutil.copy(pool, tmp_path / pool.name))  # inside the worker's campaign root
    settings.write_text(f'[campaign]\npool = "{pool}"\nunit = "kJ/mol"\nwindow = 5.0\nn_init = 8\nn_batch = 2\n'
                        'budget = 10\n[model]\nn_members = 16\nmembers_per_task = 8\n[descriptor]\nchunk_size = 4\n'
                        'n_max = 4\nl_max = 2\nn_compressed = 2\n')
    log2 = tmp_path / "worker-all.log"
    _start_worker(workers, tmp_path, log2, "--queues", "featurize,fit,dft", env={trust.ENV_SIGNING_KEY: key})
    run_cli("run", str(tmp_path / "camp"), "--settings", str(settings), "--quiet",
            env={"GRACEQ_BROKER_URL": redis_url, trust.ENV_SIGNING_KEY: key}, timeout=600)
    import sqlite3

    with sqlite3.connect(tmp_path / "camp" / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 10
    assert "refused" not in log2.read_text().replace("settings code refused", "")
