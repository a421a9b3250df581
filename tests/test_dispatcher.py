"""Faults that used to stall or jam a campaign, reproduced with real processes (issue 12).

Each test runs a real coordinator (`graceq run`), real Celery workers and a real redis-server, and
injects the fault with signals: a fit worker killed whole (its task was lost until the broker's
12 h visibility timeout), a worker paused past its lease and resumed (it deleted the new holder's
lease and rewrote the result), Redis down while the coordinator sends (the coordinator exited),
and a temporary error whose old error files stopped every resume.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GRACEQ, free_port, picks_of, run_cli, settings_text, wait_port

SLOW_FIT = """
import time
import graceq.model as model

_fit_members = model.fit_members


def slow_fit_members(*args, **kwargs):  # a committee fit that takes a while, as on a large pool
    time.sleep(4.0)
    return _fit_members(*args, **kwargs)


model.fit_members = slow_fit_members
"""


def _settings(folder: Path, pool: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.toml"
    path.write_text(settings_text(pool, **extra))
    return path


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"the coordinator exited ({proc.returncode}) while waiting for {what}:\n{out}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _coordinator(target: Path, broker: str) -> subprocess.Popen:
    return subprocess.Popen(GRACEQ + ["run", str(target), "--broker", broker, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(coordinator: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = coordinator.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        coordinator.kill()
        out, _ = coordinator.communicate()
        raise AssertionError(f"the campaign stalled: no end within {timeout} s\n{out.decode()}") from None
    assert coordinator.returncode == 0, out.decode()
    return out.decode()


def test_a_fit_task_lost_with_its_whole_worker_is_sent_again(roy_small, workers, redis_url, tmp_path):
    """SIGKILL of the whole fit worker (main process and pool) during the committee fit, restarted at
    once: Redis keeps the unacked task until its visibility timeout (12 h), so without a lost-task
    rule for fit tasks the campaign waits 12 h, silently."""
    settings = _settings(tmp_path, roy_small, runtime={"lease_timeout": 3.0},
                         campaign={"n_init": 12, "budget": 12})
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(settings))
    (tmp_path / "slowfit.py").write_text(SLOW_FIT)
    workers.start(queues="featurize,dft", concurrency=2, name="other@%h")
    env = dict(os.environ, GRACEQ_BROKER_URL=redis_url,
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    fitter = subprocess.Popen(
        [sys.executable, "-c", "import sys, slowfit; from celery.__main__ import main; sys.exit(main())",
         "-A", "graceq.app", "worker", "-Q", "fit", "-c", "2", "-n", "slowfit@%h", "--loglevel", "INFO"],
        env=env, stdout=open(tmp_path / "slowfit.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    workers.procs.append(fitter)  # stopped with the others at the end
    coordinator = _coordinator(target, redis_url)
    try:
        iteration = target / "iterations" / "0000"
        _wait(lambda: list(iteration.glob(".members_*.lease")) if iteration.exists() else [], 900,
              "a committee fit task to start", coordinator)
        os.killpg(fitter.pid, signal.SIGKILL)
        fitter.wait()
        workers.start(queues="fit", concurrency=2, name="fresh-fitter@%h")
        _finish(coordinator, 900)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
    # the tasks the killed worker had taken were sent again and done by the fresh one
    import re

    killed = (tmp_path / "slowfit.log").read_text()
    taken = set(re.findall(r"graceq\.fit_members\[([^\]]+)\] received", killed))
    done_there = set(re.findall(r"graceq\.fit_members\[([^\]]+)\] succeeded", killed))
    assert taken - done_there, "the kill landed after the fit: nothing was lost"
    fresh = (tmp_path / "worker2.log").read_text()  # other@ is worker0, slowfit@ the second process
    assert "fresh-fitter@" in fresh
    for task_id in taken - done_there:
        assert f"graceq.fit_members[{task_id}] succeeded" in fresh, task_id
    summary = json.loads((target / "summary.json").read_text())
    assert summary["stop"] == "budget" and summary["iterations"]
    assert list(iteration.glob("members_*.npz"))


def test_a_worker_paused_past_its_lease_neither_deletes_the_new_lease_nor_rewrites_the_result(
        roy_small, workers, redis_url, tmp_path):
    """SIGSTOP of the process running a reference job until its lease goes stale and another
    worker takes the job over, then SIGCONT: the paused worker must find it lost the job, leave the
    new holder's lease alone, and write nothing."""
    settings = _settings(tmp_path, roy_small, engine={"engine": "replay", "delay_s": 4.0},
                         runtime={"lease_timeout": 2.0}, campaign={"n_init": 12, "budget": 12})
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(settings))
    workers.start(queues="featurize,fit", concurrency=2, name="fitter@%h")
    workers.start(queues="dft", concurrency=1, name="paused@%h")
    coordinator = _coordinator(target, redis_url)
    stopped = None
    try:
        def first_lease():
            for lease in (target / "jobs").glob("*/lease.json") if (target / "jobs").exists() else []:
                try:
                    return lease, json.loads(lease.read_text())["pid"]
                except (ValueError, FileNotFoundError, KeyError):
                    continue
            return None

        lease, paused_pid = _wait(first_lease, 900, "the first reference job to start", coordinator)
        os.kill(paused_pid, signal.SIGSTOP)
        stopped = paused_pid
        workers.start(queues="dft", concurrency=4, name="rescuer@%h")

        def taken_over():
            try:
                return json.loads(lease.read_text())["pid"] != paused_pid
            except (ValueError, FileNotFoundError, KeyError):
                return False

        _wait(taken_over, 300, "another worker to take the job over", coordinator)
        new_holder = json.loads(lease.read_text())
        os.kill(paused_pid, signal.SIGCONT)
        stopped = None
        # from now until the job's result lands, the new holder's lease stays, and every version
        # of the result file is the new holder's
        result = target / "results" / f"{int(lease.parent.name):06d}.json"
        writers = set()
        while not result.exists():
            assert lease.exists(), "the resumed worker deleted the new holder's lease"
            assert coordinator.poll() is None, coordinator.stdout.read().decode()
            time.sleep(0.02)
        for _ in range(150):  # 3 s more: a late write of the resumed worker would show here
            writers.add(json.loads(result.read_text())["pid"])
            time.sleep(0.02)
        assert writers == {new_holder["pid"]}, f"result written by {writers}, lease holder {new_holder['pid']}"
        _finish(coordinator, 900)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        if coordinator.poll() is None:
            coordinator.kill()
    with sqlite3.connect(target / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 12
    assert "taken over by another worker" in (tmp_path / "worker1.log").read_text()


class RestartableRedis:
    """A redis-server on a fixed port that the test stops and starts again (no persistence)."""

    def __init__(self):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def test_the_coordinator_waits_for_a_broker_that_is_down_instead_of_exiting(roy_small, tmp_path):
    """Redis down when the coordinator sends: it retries with backoff and goes on once Redis is back
    (kombu's OperationalError used to end the coordinator within a second)."""
    from conftest import Workers

    redis = RestartableRedis()
    settings = _settings(tmp_path, roy_small, campaign={"n_init": 12, "budget": 12})
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(settings))
    pool = Workers(redis.url, tmp_path)
    coordinator = _coordinator(target, redis.url)
    try:
        time.sleep(8.0)  # the coordinator tries to send the projection fit while nobody listens
        assert coordinator.poll() is None, f"the coordinator exited:\n{coordinator.stdout.read().decode()}"
        redis.start()
        pool.start(concurrency=2)
        _finish(coordinator, 900)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
        pool.stop()
        redis.stop()
    assert json.loads((target / "summary.json").read_text())["stop"] == "budget"


def test_error_files_of_a_temporary_failure_do_not_stop_the_resume(roy_small, tmp_path):
    """A featurize (projection) failure that goes away (here: the pool database is away, then back; in the field:
    a full disk, then freed): the resume sends the tasks again and does not read the old error
    files as the new attempt's."""
    settings = _settings(tmp_path, roy_small, campaign={"n_init": 12, "budget": 12})
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(settings))
    pool_db = target / "structures.db"
    pool_db.rename(tmp_path / "away.db")
    failed = run_cli("run", str(target), "--quiet", check=False)
    assert failed.returncode != 0 and "no such pool database" in failed.stderr, failed.stderr
    assert list((target / "artifacts").glob("**/*.error.json"))
    (tmp_path / "away.db").rename(pool_db)
    run_cli("run", str(target), "--quiet")
    assert len(picks_of(target)) == 12
    assert not list((target / "artifacts").glob("**/*.error.json"))


def test_only_the_holder_beats_writes_or_releases_a_lease(tmp_path):
    """Lease.release of a claim that was taken over leaves the new holder's lease in place."""
    from graceq.dispatcher import Lease, LeaseLost

    old = Lease(tmp_path / "lease.json", timeout_s=0.5)
    assert old.acquire()
    old._stop.set()  # paused: no more beats
    time.sleep(0.7)
    new = Lease(tmp_path / "lease.json", timeout_s=0.5)
    assert new.acquire()
    assert not old.holds() and new.holds()
    with pytest.raises(LeaseLost):
        old.beat()
    assert not old.write_if_held(tmp_path / "result.json", {"by": "old"})
    old.release()
    assert (tmp_path / "lease.json").exists() and new.holds()
    assert new.write_if_held(tmp_path / "result.json", {"by": "new"})
    assert json.loads((tmp_path / "result.json").read_text()) == {"by": "new"}
    new.release()
    assert not (tmp_path / "lease.json").exists()


DOORBELL = """
import sys, time
from graceq import app as app_module
from graceq.dispatcher import Doorbell

app_module.configure(broker_url=sys.argv[1])
backend = app_module.app.backend
bell = Doorbell("c0ffee")
time.sleep(0.5)  # subscribed


def waited(publish=None, timeout=0.5):
    bell.looking()
    if publish:  # published during the look, before the wait: the wait must not sleep through it
        backend.client.publish(backend.get_key_for_task(publish), b"{}")
    t = time.monotonic()
    bell.wait(timeout)
    return time.monotonic() - t


print(round(waited(), 2), round(waited("graceq-beef00-dft-000001"), 2), round(waited("graceq-c0ffee-dft-000001", 5.0), 2))
bell.close()
"""


def test_the_doorbell_ends_a_wait_when_a_task_of_the_campaign_changes_state(redis_url):
    out = subprocess.run([sys.executable, "-c", DOORBELL, redis_url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    nothing, other_campaign, ours = (float(v) for v in out.stdout.split())
    assert nothing >= 0.45 and other_campaign >= 0.45  # no ring: the whole poll interval
    assert ours < 0.25  # a ring of this campaign's task: at once (the 5 s timeout not waited)
