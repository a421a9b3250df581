"""The `slurm` engine and the SLURM pilot job against a real single-node SLURM (slurm-wlm + munge).

Runs only when .ci/run asks for it (GRACEQ_TEST_SYSTEM=1, after it installed slurm-wlm and munge; see
conftest.py). `tests/slurm_setup.sh` starts munged, slurmctld and slurmd on this machine (it installs
nothing); the `slurm` fixture stops every daemon that the script started when the module ends. Every job here is real: sbatch'ed, scheduled and run by slurmd, relaxing benzamide
cells with GFN-FF (the `gfnff` ASE calculator) through the `ase` engine inside the allocation.
sbatch calls are counted by a wrapper that logs each call before it runs the real sbatch.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from conftest import celery_client

pytestmark = pytest.mark.slurm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PILOT = REPO / "deploy" / "slurm" / "graceq-workers.sbatch"


def _graceq() -> list[str]:
    exe = Path(sys.executable).with_name("graceq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graceq.cli"]


@pytest.fixture
def sbatch_log(tmp_path):
    """An sbatch that logs each call (time, arguments) to a file, then runs the real one."""
    real = shutil.which("sbatch")
    log = tmp_path / "sbatch-calls.log"
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/bash\necho "$(date +%s.%N) $*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    log.touch()
    return wrapper, log


def _calls(log: Path) -> list[str]:
    return [line.split()[-1] for line in log.read_text().splitlines() if line.strip()]


def _benzamide(n: int, offset: int = 0):
    """n GFN-FF-minimal benzamide cells of 32 atoms (2 molecules) from the bundled landscape."""
    from ase.io import read

    path = files("graceq") / "data" / "benzamide" / "landscape.extxyz"
    frames = [a for a in read(str(path), ":") if len(a) == 32 and a.info["status"] == "converged"]
    return frames[offset:offset + n]


def _engine_settings(sbatch: Path, **slurm) -> dict:
    options = {"sbatch": str(sbatch), "poll_interval": 0.5, "result_grace": 1.0, "time": "00:10:00",
               "command": " ".join(_graceq() + ["relax"])}
    options.update(slurm)
    return {"engine": "slurm", "calculator": "gfnff", "fmax": 0.05, "max_steps": 60,
            "cell_filter": "none", "slurm": options}




def _wait(predicate, timeout: float, what: str, step: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _cancel_jobs_under(folder: Path) -> None:
    """scancel every job whose working directory is under folder (keeps the cluster clean)."""
    proc = subprocess.run(["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True)
    ids = [line.split("|")[0] for line in proc.stdout.splitlines()
           if "|" in line and line.split("|", 1)[1].startswith(str(folder))]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


# -- the engine ------------------------------------------------------------------------------------
def test_submit_poll_relax_matches_a_direct_relaxation(slurm, sbatch_log, tmp_path, monkeypatch):
    from graceq.engines import make_engine
    from graceq.engines.slurm import SlurmEngine

    wrapper, log = sbatch_log
    frames = _benzamide(2)
    rng = np.random.default_rng(0)
    for atoms in frames:  # off the minimum, so that the relaxation takes real steps
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
    # a worker's environment holds the broker password: the jobs must not get it
    secret = secrets.token_hex(12)
    monkeypatch.setenv("GRACEQ_BROKER_URL", f"redis://:{secret}@127.0.0.1:1/0")
    settings = _engine_settings(wrapper, setup=["env > job-environment.txt"])
    engine = make_engine(settings, "kJ/mol")
    assert isinstance(engine, SlurmEngine)
    workdirs = [tmp_path / f"job{k}" for k in range(len(frames))]
    try:
        ids = [engine.submit(a, a.info["name"], w) for a, w in zip(frames, workdirs)]
        # idempotent: a second submit (a re-delivered task) returns the same job, no sbatch call
        assert [engine.submit(a, a.info["name"], w) for a, w in zip(frames, workdirs)] == ids
        assert _calls(log) == [str(w.resolve() / "job.sh") for w in workdirs]
        script = (workdirs[0] / "job.sh").read_text()
        assert script.startswith("#!/bin/bash\n")
        assert f"relax {workdirs[0].resolve()}" in script
        states = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i", "-j", ",".join(ids)],
                                capture_output=True, text=True).stdout.split()
        assert sorted(states) == sorted(ids), "the submitted jobs are not in squeue"
        results = _wait(lambda: (lambda r: r if all(v is not None for v in r.values()) else None)(
            engine.poll(workdirs)), 180, "the SLURM jobs' results")
    finally:
        _cancel_jobs_under(tmp_path)

    # the same relaxation, run directly with the ase engine in this process
    direct = make_engine({k: v for k, v in settings.items() if k != "slurm"} | {"engine": "ase"}, "kJ/mol")
    for atoms, w, job_id in zip(frames, workdirs, ids):
        got = results[w]
        record = json.loads((w / "result.json").read_text())
        assert record["slurm_job_id"] == job_id and record["host"] == slurm
        assert got.status == "converged", got.message
        environment = (w / "job-environment.txt").read_text()
        assert "SLURM_JOB_ID=" in environment and secret not in environment
        assert got.n_steps > 0
        ref = direct.run(atoms, atoms.info["name"], tmp_path / f"direct-{job_id}")
        assert ref.status == "converged"
        assert got.n_steps == ref.n_steps
        assert got.energy == pytest.approx(ref.energy, abs=1e-6)  # kJ/mol, total per cell
        np.testing.assert_allclose(got.atoms.positions, ref.atoms.positions, atol=1e-6)
    assert len(_calls(log)) == 2


def test_a_job_that_ends_without_result_is_resubmitted_then_failed(slurm, sbatch_log, tmp_path):
    from graceq.engines import make_engine

    wrapper, log = sbatch_log
    # the job's command exits 1 before relaxing: SLURM state FAILED and no result.json
    engine = make_engine(_engine_settings(wrapper, command="false", max_submissions=2), "kJ/mol")
    atoms = _benzamide(1)[0]
    workdir = tmp_path / "doomed"
    # squeue failing (a controller restart) must not count as the job vanishing
    outage = tmp_path / "bin" / "squeue"
    outage.write_text("#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller' >&2\nexit 1\n")
    outage.chmod(0o755)
    blind = make_engine(_engine_settings(wrapper, command="false", max_submissions=2, squeue=str(outage)),
                        "kJ/mol")
    try:
        first = engine.submit(atoms, "doomed", workdir)
        _wait(lambda: subprocess.run(["squeue", "-h", "-t", "all", "-j", first, "-o", "%T"], capture_output=True,
                                     text=True).stdout.strip() == "FAILED", 60, "the job to fail")
        for _ in range(3):
            assert blind.poll([workdir])[workdir] is None
            time.sleep(0.6)
        assert len(_calls(log)) == 1
        result = _wait(lambda: engine.poll([workdir])[workdir], 120, "the doomed job to be given up")
    finally:
        _cancel_jobs_under(tmp_path)
    submissions = json.loads((workdir / "slurm.json").read_text())["submissions"]
    assert [s["job_id"] for s in submissions][0] == first
    assert len(submissions) == 2 == len(_calls(log))
    assert result.status == "failed" and result.energy is None
    assert all(s["job_id"] in result.message for s in submissions)
    assert "FAILED" in result.message and "slurm-" in result.message


def test_a_submit_that_died_before_recording_its_job_adopts_it(slurm, sbatch_log, tmp_path):
    """sbatch ran, then the worker died before slurm.json: the next submit finds the job in squeue."""
    from graceq.engines import make_engine

    wrapper, log = sbatch_log
    engine = make_engine(_engine_settings(wrapper, command="true", setup=["sleep 30"]), "kJ/mol")
    atoms = _benzamide(1)[0]
    workdir = tmp_path / "interrupted"
    try:
        job_id = engine.submit(atoms, atoms.info["name"], workdir)
        (workdir / "slurm.json").unlink()  # what a kill between sbatch and the record leaves
        assert engine.submit(atoms, atoms.info["name"], workdir) == job_id
        assert len(_calls(log)) == 1
        record = json.loads((workdir / "slurm.json").read_text())
        assert record["job_id"] == job_id and record["submissions"][0]["adopted"]
        # a job directory SLURM never saw is submitted normally
        (workdir / "slurm.json").unlink()
        subprocess.run(["scancel", job_id], check=True)
        _wait(lambda: subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                                     text=True).stdout.strip() in ("", "CANCELLED"), 30, "the cancel")
        other = tmp_path / "elsewhere"
        assert engine.submit(atoms, atoms.info["name"], other) != job_id
        assert len(_calls(log)) == 2
    finally:
        _cancel_jobs_under(tmp_path)


# -- a campaign: coordinator killed while SLURM holds its jobs -------------------------------------------
def _campaign_settings(folder: Path, wrapper: Path) -> Path:
    import tomli_w
    from ase.io import write

    pool = folder / "benzamide24.extxyz"
    write(pool, _benzamide(24), format="extxyz")
    engine = _engine_settings(wrapper, setup=["sleep 2"])  # each job holds its CPU a while
    engine["fmax"] = 0.1  # the pool is GFN-FF-minimal already: few steps, converged
    path = folder / "settings.toml"
    path.write_text(tomli_w.dumps({
        "campaign": {"pool": pool.name, "unit": "kJ/mol", "window": 5.0, "n_init": 10, "n_batch": 4,
                     "budget": 18, "seed": 0},
        "descriptor": {"chunk_size": 12, "fit_sample": 24},
        "model": {"n_members": 32, "members_per_task": 16},
        "engine": engine,
        "runtime": {"poll_interval": 0.2, "workers": 2},
    }))
    return path


def _picks(campaign: Path) -> list[int]:
    with sqlite3.connect(campaign / "state.sqlite") as db:
        return [r[0] for r in db.execute("SELECT idx FROM picks ORDER BY iteration, rank")]


def test_killed_coordinator_restarts_and_collects_every_job_once(slurm, sbatch_log, tmp_path):
    wrapper, log = sbatch_log
    settings = _campaign_settings(tmp_path, wrapper)
    campaign = tmp_path / "campaign"
    jobs = campaign / "jobs"
    out = open(tmp_path / "coordinator1.log", "wb")
    first = subprocess.Popen(_graceq() + ["run", str(campaign), "--settings", str(settings), "--quiet"],
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # wait until SLURM holds several jobs of the initial batch, then kill the coordinator hard
        def submitted():
            n = len(list(jobs.glob("*/slurm.json"))) if jobs.exists() else 0
            return n >= 4 and n
        _wait(submitted, 240, "the first jobs to be submitted to SLURM")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        killed_at = time.time()
        in_slurm = [d for d in jobs.iterdir() if (d / "slurm.json").exists() and not (d / "result.json").exists()]
        assert in_slurm, "no job was queued or running in SLURM when the coordinator died"
        # the jobs go on without a coordinator: let them end while nobody watches
        _wait(lambda: all((d / "result.json").exists() for d in in_slurm), 180,
              "the orphaned jobs to finish in SLURM")

        second = subprocess.run(_graceq() + ["run", str(campaign), "--quiet"], capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 0, f"restarted coordinator failed:\n{second.stdout}\n{second.stderr}"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        _cancel_jobs_under(tmp_path)

    summary = json.loads((campaign / "summary.json").read_text())
    assert summary["iterations"], "no iteration recorded"
    picks = _picks(campaign)
    assert len(picks) == len(set(picks)) == summary["n_reference_calls"] >= 10
    # every picked structure was submitted exactly once and its result collected once
    calls = _calls(log)
    assert len(calls) == len(set(calls)) == len(picks), f"{len(calls)} sbatch calls for {len(picks)} picks"
    with sqlite3.connect(campaign / "state.sqlite") as db:
        stored = dict(db.execute("SELECT idx, status FROM results").fetchall())
    assert sorted(stored) == sorted(picks)
    for idx in picks:
        workdir = jobs / f"{idx:06d}"
        record = json.loads((workdir / "slurm.json").read_text())
        assert len(record["submissions"]) == 1
        assert str(workdir / "job.sh") in calls
        result = json.loads((campaign / "results" / f"{idx:06d}.json").read_text())
        assert result["slurm_job_id"] == record["job_id"]
        assert stored[idx] == result["status"]
    # the orphaned jobs ended while no coordinator ran, and the restarted one took their results
    for d in in_slurm:
        assert (d / "result.json").stat().st_mtime > killed_at - 5
        assert int(d.name) in stored
    assert sum(s == "converged" for s in stored.values()) >= 10


# -- the pilot job of deploy/ ---------------------------------------------------------------------------
def _pilot_env(folder: Path, broker: str, **extra) -> dict:
    """The environment of an sbatch of the pilot job: the broker URL in a mode-600 file under
    ``folder`` (never in the environment), and ``extra``."""
    broker_file = folder / "broker_url"
    broker_file.write_text(broker + "\n")
    broker_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "GRACEQ_BROKER_URL"}
    return env | {"GRACEQ_BROKER_FILE": str(broker_file)} | extra


def test_pilot_job_runs_a_worker_pool_inside_an_allocation(slurm, tmp_path):
    password = secrets.token_hex(16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--requirepass", password], stdout=subprocess.DEVNULL)
    broker = f"redis://:{password}@127.0.0.1:{port}/0"
    env = _pilot_env(tmp_path, broker, GRACEQ=" ".join(_graceq()), GRACEQ_QUEUES="dft")
    job_id = None
    try:
        # the limit must exceed the script's --signal=TERM@300 lead: with 5 min, slurmctld sends the
        # warning signal at its first periodic check (0-30 s after the start) and cancels the worker step
        proc = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/pilot-%j.out", "--time=00:10:00",
                               str(PILOT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip()
        name = f"graceq-dft-{job_id}-0@{slurm}"
        client = celery_client(broker)
        try:
            _wait(lambda: any(name in r for r in client.control.ping(timeout=1.0) or []), 90,
                  f"worker {name} to answer")
        except AssertionError as exc:
            out = tmp_path / f"pilot-{job_id}.out"
            state = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
            raise AssertionError(f"{exc}\n{state}\n{out.read_text() if out.exists() else 'no output'}") from None
        results = [client.send_task("graceq.noop", args=[k], queue="dft") for k in range(20)]
        assert [r.get(timeout=60) for r in results] == list(range(20))
        client.close()
        # what the time limit does (--signal=TERM@300): TERM to the workers, warm shutdown, job ends
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        _wait(lambda: subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                                     text=True).stdout.strip() in ("", "COMPLETED"), 60, "the pilot job to end")
    finally:
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True)
        redis.terminate()
        redis.wait(timeout=10)
    output = (tmp_path / f"pilot-{job_id}.out").read_text()
    assert f"{name} ready" in output
    assert "Warm shutdown" in output and "graceq-workers: done" in output
    assert output.count("graceq.noop") >= 20
    assert password not in output


def test_pilot_job_warns_when_its_limit_is_within_the_stop_signal_lead(slurm, tmp_path):
    """A limit of 5 min or less: SLURM sends the workers' TERM (--signal=TERM@300) at its next
    periodic check, so the job says so in its output; a longer limit says nothing."""
    env = _pilot_env(tmp_path, "redis://127.0.0.1:1/0", GRACEQ="true")   # the "workers" exit at once
    outputs = {}
    for limit in ("00:05:00", "00:10:00"):
        proc = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={tmp_path}/pilot-%j.out", f"--time={limit}",
                               str(PILOT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs[limit] = (tmp_path / f"pilot-{proc.stdout.strip()}.out").read_text()
    assert "warning" in outputs["00:05:00"] and "--time longer than 5 min" in outputs["00:05:00"]
    assert "warning" not in outputs["00:10:00"]
    assert all("graceq-workers: done" in out for out in outputs.values())
