"""Leases and the coordinator's rule for re-sending a reference job: the cases, one by one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from graceq.dispatcher import Lease, job_is_lost

T = 1_000_000.0  # s since the epoch, any fixed moment


@pytest.mark.parametrize(
    "beat, sent_at, now, lost",
    [
        (None, T, T + 10, False),          # queued, not yet started: wait
        (None, T, T + 4000, True),         # never started within the queueing allowance: lost message
        (T + 5, T, T + 20, False),         # running, beating
        (T + 5, T, T + 200, True),         # started, then silent for longer than the lease timeout
        (T - 500, T, T + 200, False),      # a dead worker's old lease, and we already sent it again
        (T - 500, T, T + 4000, True),      # ... but that second delivery never started either
    ],
)
def test_job_is_lost(beat, sent_at, now, lost):
    assert job_is_lost(beat, sent_at, now, lease_timeout_s=90, resend_unstarted_after_s=3600) is lost


def test_a_live_lease_keeps_a_second_worker_out_and_is_released(tmp_path):
    first = Lease(tmp_path / "lease.json", timeout_s=30)
    assert first.acquire()
    assert first.is_fresh()
    assert not Lease(tmp_path / "lease.json", timeout_s=30).acquire()
    first.release()
    assert not (tmp_path / "lease.json").exists()
    assert Lease(tmp_path / "lease.json", timeout_s=30).acquire()


def test_a_lease_of_a_dead_process_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket

    (tmp_path / "lease.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                                    "since": time.time()}))
    lease = Lease(tmp_path / "lease.json", timeout_s=300)
    assert not lease.is_fresh()
    assert lease.acquire()
    assert json.loads((tmp_path / "lease.json").read_text())["pid"] == os.getpid()
    lease.release()


def test_a_silent_lease_goes_stale_and_a_beating_one_does_not(tmp_path):
    other_host = {"host": "another-node", "pid": 1, "since": time.time()}
    (tmp_path / "lease.json").write_text(json.dumps(other_host))
    lease = Lease(tmp_path / "lease.json", timeout_s=0.5)
    assert lease.is_fresh()            # another node's live-looking lease: trust its heartbeat
    time.sleep(0.7)
    assert not lease.is_fresh()        # no beat for longer than the timeout
    assert lease.acquire()             # taken over; our own thread now beats it (every 0.5 s)
    time.sleep(1.5)
    assert Lease(tmp_path / "lease.json", timeout_s=1.0).is_fresh()
    lease.release()
