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
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import GRACEQ, celery_client, free_port, run_cli, wait_port, write_subset, bundled


def _campaign(folder: Path, pool: Path) -> Path:
    """A real campaign (graceq init, replay engine) in folder/camp."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / "settings.toml"
    settings.write_text(f'[campaign]\npool = "{pool}"\nunit = "kJ/mol"\nwindow = 5.0\nn_init = 4\nn_batch = 2\n')
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


def _wait_ready(client, log: Path, timeout: float = 60) -> None:
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
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE", (what, result.state, result.result)
        assert "UntrustedMessage" in repr(result.result) or type(result.result).__name__ == "UntrustedMessage", what
    negative_iteration = client.send_task("graceq.select_lambda", args=[str(legit), -5], queue="dft")
    negative_iteration.get(timeout=60, propagate=False)
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
    assert ok.get(timeout=120)["status"] == "converged"
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
                     queue="dft").get(timeout=60, propagate=False)
    deadline = time.time() + 10
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
        with urllib.request.urlopen(request, timeout=20) as response:
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
    wait_port(port, flower, "flower")
    base = f"http://127.0.0.1:{port}"
    apply = f"{base}/api/task/async-apply/graceq.run_reference"
    assert _http("POST", apply, None, {"args": [str(foreign), 0, _name(foreign, 0)]})[0] == 401
    status, body = _http("POST", apply, auth, {"args": [str(foreign), 0, _name(foreign, 0)]})
    assert status == 200, body
    task_id = json.loads(body)["task-id"]
    deadline = time.time() + 60
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
    deadline = time.time() + 120
    while not (legit / "results" / "000002.json").exists():
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    assert json.loads((legit / "results" / "000002.json").read_text())["status"] == "converged"
    client.close()
