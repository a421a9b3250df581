"""Asynchronous mode through real Celery workers: slots kept busy, decisions replayable from the
stored arrival order, and kills (coordinator, worker) that lose and duplicate nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, settings_text

# The coordinator in asynchronous mode. The [campaign] mode/slots/refit_every settings are read
# defensively by the coordinator; they are put on the loaded settings here so that this test does
# not depend on config.py declaring them.
RUN_ASYNC = """
import sys
from graceq.coordinator import Coordinator

campaign_dir, broker, slots, refit_every = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
max_iterations = int(sys.argv[5]) if len(sys.argv) > 5 else None
coordinator = Coordinator(campaign_dir, broker_url=broker, progress=False, max_iterations=max_iterations)
campaign = coordinator.settings.campaign.model_copy(update={"mode": "async", "slots": slots, "refit_every": refit_every})
coordinator.settings = coordinator.settings.model_copy(update={"campaign": campaign})
coordinator.run()
"""

SLOTS, REFIT_EVERY = 4, 3


def _async(target: Path, broker: str | None = None, max_iterations: int | None = None, slots: int = SLOTS) -> list[str]:
    return ([sys.executable, "-c", RUN_ASYNC, str(target), broker or "", str(slots), str(REFIT_EVERY)]
            + ([] if max_iterations is None else [str(max_iterations)]))


def _init(tmp_path: Path, pool: Path, **extra) -> Path:
    (tmp_path / "settings.toml").write_text(settings_text(pool, **extra))
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(tmp_path / "settings.toml"))
    return target


def _replayed(target: Path, slots: int = SLOTS) -> tuple[dict, dict]:
    """(stored picks per decision, the same decisions made again from the arrival log)."""
    from graceq.coordinator import Coordinator

    coordinator = Coordinator(target, progress=False)
    campaign = coordinator.settings.campaign.model_copy(update={"mode": "async", "slots": slots,
                                                                "refit_every": REFIT_EVERY})
    coordinator.settings = coordinator.settings.model_copy(update={"campaign": campaign})
    stored: dict[int, list[int]] = {}
    for idx, it in coordinator.store.picks():
        if it:
            stored.setdefault(it, []).append(idx)
    replayed = {n: picks for n, picks in coordinator.replay_decisions().items() if picks}
    return stored, replayed


def _check_nothing_lost_or_twice(target: Path) -> None:
    with sqlite3.connect(target / "state.sqlite") as db:
        picks = [r[0] for r in db.execute("SELECT idx FROM picks")]
        results = [r[0] for r in db.execute("SELECT idx FROM results")]
        arrivals = [r[0] for r in db.execute("SELECT idx FROM arrivals ORDER BY seq")]
    assert len(picks) == len(set(picks))
    assert sorted(results) == sorted(picks), "a picked structure has no result"
    assert sorted(arrivals) == sorted(results) and len(arrivals) == len(set(arrivals))
    for idx in picks:  # one result record per job, written once
        assert json.loads((target / "results" / f"{idx:06d}.json").read_text())["idx"] == idx


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _count(target: Path, sql: str) -> int:
    if not (target / "state.sqlite").exists():
        return 0
    try:
        with sqlite3.connect(target / "state.sqlite") as db:
            return db.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # the arrivals table appears with the first result
        return 0


def test_async_campaign_keeps_slots_busy_and_its_decisions_replay_from_the_arrival_log(roy_small, tmp_path):
    target = _init(tmp_path, roy_small, campaign={"n_init": 12, "budget": 24},
                   engine={"engine": "replay", "delay_s": 0.3})
    subprocess.run(_async(target), check=True, timeout=900)
    summary = json.loads((target / "summary.json").read_text())
    assert summary["stop"] is not None
    _check_nothing_lost_or_twice(target)
    with sqlite3.connect(target / "state.sqlite") as db:
        n_picks = db.execute("SELECT COUNT(*) FROM picks").fetchone()[0]
        decisions = db.execute("SELECT iteration, stats FROM iterations ORDER BY iteration").fetchall()
    assert n_picks == 24
    # one decision per arrival from the end of the initial batch on until the stop, each with at
    # most the free slots
    stops = [d for d, stats in decisions if json.loads(stats)["stop"]]
    until_stop = [d for d, _ in decisions if d <= stops[0]]
    assert until_stop == list(range(12, 12 + len(until_stop)))
    for _, stats in decisions:
        stats = json.loads(stats)
        assert stats["n_pending"] + stats["n_next"] <= SLOTS
    # the budget stop is decided when the last job is sent; once the jobs then running have landed,
    # the campaign states its risk again with every result in (the last arrival's decision, no picks)
    first_stop = json.loads(dict(decisions)[stops[0]])
    assert first_stop["stop"] == "budget" and first_stop["n_pending"] > 0
    last_decision, last = decisions[-1][0], json.loads(decisions[-1][1])
    assert last_decision == 24 and last["n_pending"] == 0 and last["n_next"] == 0 and last["stop"]
    assert len(decisions) == len(until_stop) + 1
    assert summary["risk"] == last["risk"] and summary["stop"] == last["stop"]
    stored, replayed = _replayed(target)
    assert stored and replayed == stored


@pytest.mark.parametrize("victim", ["coordinator", "worker"])
def test_sigkill_in_async_mode_loses_nothing_sends_nothing_twice_and_replays_the_same_picks(
        roy_small, workers, redis_url, tmp_path, victim):
    target = _init(tmp_path, roy_small, campaign={"n_init": 12, "budget": 26},
                   engine={"engine": "replay", "delay_s": 1.5}, runtime={"lease_timeout": 4.0})
    workers.start(queues="featurize,fit", concurrency=2, name="fitter@%h")
    dft = workers.start(queues="dft", concurrency=2, name="dft@%h")
    log = open(tmp_path / "coordinator1.log", "wb")
    first = subprocess.Popen(_async(target, redis_url), stdout=log, stderr=subprocess.STDOUT)
    try:
        # past the first decisions, with jobs in flight
        _wait_for(lambda: _count(target, "SELECT COUNT(*) FROM iterations") >= 2, 600, "two async decisions")
        assert _count(target, "SELECT COUNT(*) FROM picks") > _count(target, "SELECT COUNT(*) FROM results")
        if victim == "coordinator":
            first.send_signal(signal.SIGKILL)
            first.wait()
            second = subprocess.run(_async(target, redis_url), capture_output=True, text=True, timeout=900)
            assert second.returncode == 0, second.stdout + second.stderr
        else:
            os.killpg(dft.pid, signal.SIGKILL)
            dft.wait()
            workers.start(queues="dft", concurrency=2, name="rescuer@%h")
            assert first.wait(timeout=900) == 0, (tmp_path / "coordinator1.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
    _check_nothing_lost_or_twice(target)
    assert _count(target, "SELECT COUNT(*) FROM picks") == 26
    jobs_sent = _count(target, "SELECT SUM(attempts) FROM jobs")
    assert jobs_sent <= 26 + (2 if victim == "worker" else 0), "jobs sent again beyond the lease rules"
    stored, replayed = _replayed(target)
    assert replayed == stored


def _results(target: Path) -> dict[int, tuple[str, str]]:
    with sqlite3.connect(target / "state.sqlite") as db:
        return {idx: (status, message) for idx, status, message in
                db.execute("SELECT idx, status, message FROM results")}


def test_cancel_on_stop_cancels_the_running_jobs_and_records_each_of_them(roy_small, workers, redis_url, tmp_path,
                                                                        monkeypatch):
    # The stop must come with jobs in flight, whatever order the results arrive in: 12 slots for an
    # initial batch of 8, so that the free slots run farthest points (19 sent by the 8th result),
    # and p_conv >= 0.001, which the first decision (after the 8th result, the first fit) always
    # meets (p_conv >= 1 / (pool + 1) once the best structure is measured). The jobs take 3, 6 or
    # 9 s (tests/staggered_engine.py) on 6 worker processes: some run, some wait in the queue. All
    # are cancelled, not waited for, and recorded as cancelled (or as converged if they ended first).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                    os.environ.get("PYTHONPATH")])))
    slots = 12
    target = _init(tmp_path, roy_small, campaign={"n_init": 8, "budget": 60, "stop_rule": "p_conv",
                                                  "p_conv_target": 0.001, "cancel_on_stop": True},
                   engine={"engine": "staggered_engine:StaggeredReplay", "delay_s": 3.0})
    workers.start(queues="featurize,fit", concurrency=1, name="fitter@%h")
    workers.start(queues="dft", concurrency=6, name="dft@%h", args=("--allow-code",))
    run = subprocess.run(_async(target, redis_url, slots=slots), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((target / "summary.json").read_text())
    assert summary["stop"] == "converged"
    _check_nothing_lost_or_twice(target)
    with sqlite3.connect(target / "state.sqlite") as db:
        stop_at, stats = db.execute("SELECT iteration, stats FROM iterations WHERE json_extract(stats, '$.stop') "
                                    "IS NOT NULL").fetchone()
        running = [idx for (idx,) in db.execute("SELECT idx FROM picks WHERE iteration < ?", (stop_at,))
                   if idx not in {i for (i,) in db.execute("SELECT idx FROM arrivals ORDER BY seq LIMIT ?",
                                                           (stop_at,))}]
    assert json.loads(stats)["n_pending"] == len(running) > 0
    results = _results(target)
    cancelled = [idx for idx in running if results[idx][0] == "failed" and "cancelled" in results[idx][1]]
    assert cancelled, f"no running job was cancelled: {[results[i] for i in running]}\n{run.stdout[-3000:]}"
    assert all(results[idx][0] == "converged" for idx in running if idx not in cancelled)  # ended first
    time.sleep(10.0)  # a worker that ran a cancelled job on writes nothing over its cancelled result
    for idx in cancelled:
        assert json.loads((target / "results" / f"{idx:06d}.json").read_text())["status"] == "failed"


def test_max_iterations_in_async_mode_counts_refits_and_a_second_run_goes_on(roy_small, tmp_path):
    target = _init(tmp_path, roy_small, campaign={"n_init": 12, "budget": 24},
                   engine={"engine": "replay", "delay_s": 0.3})
    subprocess.run(_async(target, max_iterations=2), check=True, timeout=900)
    # two iterations of REFIT_EVERY decisions, then the jobs in flight were waited for and recorded
    assert _count(target, "SELECT COUNT(*) FROM iterations") == 2 * REFIT_EVERY
    _check_nothing_lost_or_twice(target)
    assert not (target / "summary.json").exists() or json.loads((target / "summary.json").read_text())["stop"] is None
    subprocess.run(_async(target), check=True, timeout=900)
    assert json.loads((target / "summary.json").read_text())["stop"] is not None
    _check_nothing_lost_or_twice(target)
    assert _count(target, "SELECT COUNT(*) FROM picks") == 24
    stored, replayed = _replayed(target)
    assert replayed == stored


def test_a_resumed_run_with_more_slots_sends_no_farthest_points_after_the_first_fit(roy_small, tmp_path):
    target = _init(tmp_path, roy_small, campaign={"n_init": 8, "budget": 30},
                   engine={"engine": "replay", "delay_s": 0.2})
    subprocess.run(_async(target, max_iterations=1), check=True, timeout=900)
    initial = _count(target, "SELECT COUNT(*) FROM picks WHERE iteration = 0")
    assert initial == 8 and _count(target, "SELECT COUNT(*) FROM iterations") == REFIT_EVERY
    # 12 slots > n_init: a campaign started so would have sent farthest points on the free slots;
    # this one has its first fit, so the free slots get the model's picks
    subprocess.run(_async(target, max_iterations=1, slots=12), check=True, timeout=900)
    assert _count(target, "SELECT COUNT(*) FROM picks WHERE iteration = 0") == initial
    assert _count(target, "SELECT COUNT(*) FROM iterations") == 2 * REFIT_EVERY
    _check_nothing_lost_or_twice(target)


def test_with_more_slots_than_the_initial_batch_no_slot_waits_for_the_first_fit(roy_small, workers, redis_url, tmp_path):
    # 10 slots, n_init 8: the initial batch and the next 2 farthest points go out at once; each
    # arrival before the first fit (after 8 results) sends the next farthest point
    slots, n_init, budget = 10, 8, 24
    target = _init(tmp_path, roy_small, campaign={"n_init": n_init, "budget": budget},
                   engine={"engine": "replay", "delay_s": 2.0})
    workers.start(queues="featurize,fit", concurrency=2, name="fitter@%h")
    workers.start(queues="dft", concurrency=slots, name="dft@%h")
    log = open(tmp_path / "coordinator.log", "wb")
    run = subprocess.Popen(_async(target, redis_url, slots=slots), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _count(target, "SELECT COUNT(*) FROM jobs") >= 1, 600, "the first job")
        time.sleep(0.5)  # the coordinator sends the whole first wave at once
        assert _count(target, "SELECT COUNT(*) FROM results") == 0
        assert _count(target, "SELECT COUNT(*) FROM jobs") == min(slots, 66)
        assert run.wait(timeout=900) == 0, (tmp_path / "coordinator.log").read_text()
    finally:
        if run.poll() is None:
            run.kill()
    _check_nothing_lost_or_twice(target)
    with sqlite3.connect(target / "state.sqlite") as db:
        farthest = [idx for (idx,) in db.execute("SELECT idx FROM picks WHERE iteration = 0 ORDER BY rank")]
        decisions = db.execute("SELECT iteration, stats FROM iterations ORDER BY iteration").fetchall()
    # slots + one per arrival before the first fit, in farthest-point order
    assert len(farthest) == slots + n_init - 1
    from graceq import campaign as cp
    from graceq.coordinator import Coordinator

    c = Coordinator(target, progress=False)
    order = cp.initial_batch(np.load(c.paths.features), cp.per_molecule(c.energy_ff, c.n_atoms, c.apm), len(farthest))
    assert farthest == order.tolist()
    # the first fit after n_init arrivals; from then on every decision fills the slots (until the budget)
    assert decisions[0][0] == n_init
    for _, stats in decisions:
        stats = json.loads(stats)
        if not stats["stop"] and stats["n_reference_calls"] + stats["n_next"] < budget:
            assert stats["n_pending"] + stats["n_next"] == slots
    assert _count(target, "SELECT COUNT(*) FROM picks") == budget
    stored, replayed = _replayed(target, slots)
    assert stored and replayed == stored
