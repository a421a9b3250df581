"""One coordinator per campaign: the lease file, its heartbeat, takeover of a stale one, `graceq status`.

Liveness is tested with real processes: a holder in another Python process, a SIGKILLed holder, and
two `graceq run` on one campaign (the second is refused while the first lives and takes over after
the first was SIGKILLed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GRACEQ, picks_of, run_cli, settings_text
from graceq.lock import LOCK_NAME, CampaignLocked, CoordinatorLock, Holder, LeaseLost, coordinator_lines

HOLDER = """
import sys, time
from graceq.lock import CoordinatorLock
lock = CoordinatorLock(sys.argv[1], timeout_s=float(sys.argv[2])).acquire()
lock.set_stage("iteration 7: reference jobs")
print("held", flush=True)
time.sleep(600)
"""


def _hold(folder: Path, timeout_s: float = 30) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(timeout_s)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_in_another_process_keeps_the_campaign(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(CampaignLocked) as info:
            CoordinatorLock(tmp_path, timeout_s=30).acquire()
        message = str(info.value)
        assert f"PID {holder.pid} on {socket.gethostname()}" in message
        assert "iteration 7: reference jobs" in message and "graceq status" in message
        lines = coordinator_lines(tmp_path)
        assert lines[0].startswith(f"coordinator alive: PID {holder.pid}")
        assert "iteration 7: reference jobs (for" in lines[1]
    finally:
        holder.kill()
        holder.wait()


def test_a_sigkilled_holder_on_this_host_is_taken_over_at_once(tmp_path):
    holder = _hold(tmp_path, timeout_s=3600)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # a SIGKILL leaves the file behind
    assert coordinator_lines(tmp_path)[0].startswith(f"coordinator not running: PID {holder.pid}")
    start = time.time()
    lock = CoordinatorLock(tmp_path, timeout_s=3600).acquire()
    assert time.time() - start < 5  # no waiting for a timeout: the PID is gone
    assert Holder.read(tmp_path / LOCK_NAME).pid == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def _foreign_lock(folder: Path, age_s: float) -> Path:
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": time.time() - 1000,
                                "stage": "fitting", "stage_since": time.time() - 100, "token": "x"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_another_hosts_lock_counts_by_its_heartbeat(tmp_path):
    _foreign_lock(tmp_path, age_s=5)
    with pytest.raises(CampaignLocked, match="PID 1 on node-elsewhere"):
        CoordinatorLock(tmp_path, timeout_s=60).acquire()
    _foreign_lock(tmp_path, age_s=120)  # silent for longer than the timeout: its host or process died
    lock = CoordinatorLock(tmp_path, timeout_s=60).acquire()
    assert Holder.read(tmp_path / LOCK_NAME).host == socket.gethostname()
    lock.release()


def test_the_heartbeat_refreshes_the_file_and_set_stage_records_the_stage(tmp_path):
    lock = CoordinatorLock(tmp_path, timeout_s=1.2).acquire()  # beats every 0.2 s
    try:
        path = tmp_path / LOCK_NAME
        os.utime(path, (time.time() - 100, time.time() - 100))
        time.sleep(0.8)
        assert time.time() - path.stat().st_mtime < 0.7
        lock.set_stage("iteration 2: fitting the committee")
        record = json.loads(path.read_text())
        assert record["stage"] == "iteration 2: fitting the committee" and record["pid"] == os.getpid()
        assert abs(record["stage_since"] - time.time()) < 2
    finally:
        lock.release()


def test_a_lease_taken_over_stops_the_old_holder_at_its_next_stage(tmp_path):
    lock = CoordinatorLock(tmp_path, timeout_s=60).acquire()
    _foreign_lock(tmp_path, age_s=0)  # what a second coordinator that took over would leave
    with pytest.raises(LeaseLost, match="node-elsewhere"):
        lock.set_stage("iteration 3: selecting the next batch")
    lock.release()
    assert (tmp_path / LOCK_NAME).exists(), "the old holder must not delete the new holder's lock"


# -- two `graceq run` on one campaign ------------------------------------------------------------------
def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_second_run_is_refused_and_takes_over_after_the_first_is_killed(roy_small, tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text(settings_text(roy_small))
    campaign = tmp_path / "campaign"
    run_cli("init", str(campaign), "--settings", str(settings))
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(GRACEQ + ["run", str(campaign), "--quiet"], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        _wait(lambda: (campaign / LOCK_NAME).exists(), 60, "the first coordinator's lock")
        second = run_cli("run", str(campaign), "--quiet", check=False, timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"a coordinator already runs this campaign (PID {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        # status answers while the first one runs, and says what it does
        _wait(lambda: (campaign / "results").exists() and any((campaign / "results").glob("*.json")), 180,
              "the first reference results")
        status = run_cli("status", str(campaign)).stdout
        assert f"coordinator alive: PID {first.pid}" in status
        assert "stage      " in status and "(for " in status
        jobs = run_cli("jobs", str(campaign)).stdout
        assert "converged" in jobs
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert "coordinator not running" in run_cli("status", str(campaign)).stdout
    resumed = run_cli("run", str(campaign), "--quiet", "--max-iterations", "1", timeout=600)
    assert "IntegrityError" not in resumed.stderr
    assert not (campaign / LOCK_NAME).exists(), "a finished run releases its lock"
    picks = picks_of(campaign)
    assert len(picks) == len({i for i, _ in picks})
    with sqlite3.connect(campaign / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM iterations").fetchone()[0] >= 1
