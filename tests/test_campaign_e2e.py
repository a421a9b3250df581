"""End-to-end campaigns through real Celery workers: embedded, Redis, resume, worker loss.

No eager mode anywhere: every task is a message consumed by a separate worker process.
"""

from __future__ import annotations

import html
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import GRACEQ, picks_of, run_cli, settings_text


def write_settings(folder: Path, pool: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.toml"
    path.write_text(settings_text(pool, **extra))
    return path


@pytest.fixture(scope="module")
def embedded_run(roy_small, tmp_path_factory):
    """One complete embedded campaign (no broker) on the 66-structure ROY pool; reused below."""
    folder = tmp_path_factory.mktemp("embedded")
    settings = write_settings(folder, roy_small)
    result = run_cli("run", str(folder / "campaign"), "--settings", str(settings), "--quiet")
    return folder / "campaign", result


def test_embedded_campaign_runs_to_a_stop(embedded_run):
    campaign, result = embedded_run
    summary = json.loads((campaign / "summary.json").read_text())
    assert summary["n_pool"] == 66
    assert summary["stop"] in ("converged", "budget", "pool exhausted")
    assert summary["iterations"], "no iteration recorded"
    for key in ("n_reference_calls", "n_unstable", "converged", "found", "window", "unit"):
        assert key in summary
    for it in summary["iterations"]:
        for key in ("p_conv", "residual", "test_rmse", "calibration", "ridge_lambda", "n_labelled"):
            assert it[key] is not None
    picks = picks_of(campaign)
    assert len(picks) == summary["n_reference_calls"] == len({i for i, _ in picks})
    # the found structures are the labelled ones within the window of the best measured energy
    rows = (campaign / "structures.csv").read_text().splitlines()
    assert len(rows) == 67
    assert "reference calls" in result.stdout


def test_same_picks_through_redis_and_two_separate_workers(embedded_run, roy_small, workers, redis_url, tmp_path):
    campaign, _ = embedded_run
    workers.start(name="alpha@%h")
    workers.start(name="beta@%h")
    settings = write_settings(tmp_path, roy_small)
    run_cli("run", str(tmp_path / "campaign"), "--settings", str(settings), "--broker", redis_url, "--quiet")
    assert picks_of(tmp_path / "campaign") == picks_of(campaign)
    hosts = {json.loads(p.read_text())["host"] for p in (tmp_path / "campaign" / "results").glob("*.json")}
    assert hosts, "no result files written by the workers"
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("worker*.log"))
    assert "alpha@" in logs and "beta@" in logs
    # both workers did reference work
    assert logs.count("graceq.run_reference") > 0


def _count_reference_runs(campaign: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for path in (campaign / "results").glob("*.json"):
        record = json.loads(path.read_text())
        counts[record["idx"]] = counts.get(record["idx"], 0) + 1
    return counts


def test_coordinator_killed_mid_iteration_resumes_with_the_same_picks(embedded_run, roy_small, tmp_path):
    campaign, _ = embedded_run
    settings = write_settings(tmp_path, roy_small)
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(settings))
    proc = subprocess.Popen(GRACEQ + ["run", str(target), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    # kill it once the second iteration's reference jobs are on their way
    deadline = time.time() + 300
    while time.time() < deadline:
        if (target / "state.sqlite").exists():
            with sqlite3.connect(target / "state.sqlite") as db:
                n_iter = db.execute("SELECT COUNT(*) FROM iterations").fetchone()[0]
                n_sent = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            if n_iter >= 1 and n_sent > 12:
                break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the campaign never reached its second iteration")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the embedded worker gets SIGTERM through its parent-death signal
    run_cli("run", str(target), "--quiet")
    assert picks_of(target) == picks_of(campaign)
    with sqlite3.connect(target / "state.sqlite") as db:
        n_results = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert n_results == len(picks_of(target))
    # every reference job wrote exactly one result record
    assert set(_count_reference_runs(target).values()) == {1}


def start_slow_redis_campaign(roy_small, workers, redis_url, tmp_path, delay_s, lease_timeout_s, dft_name):
    """A 12-call replay campaign whose jobs take delay_s each, run by a `dft` worker and a
    featurize/fit worker through Redis; returns (campaign dir, dft worker, coordinator process)."""
    settings = write_settings(tmp_path, roy_small, engine={"engine": "replay", "delay_s": delay_s},
                              runtime={"lease_timeout": lease_timeout_s}, campaign={"n_init": 12, "budget": 12})
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(settings))
    dft = workers.start(queues="dft", name=dft_name)
    workers.start(queues="featurize,fit", concurrency=2, name="fitter@%h")
    coordinator = subprocess.Popen(GRACEQ + ["run", str(target), "--broker", redis_url, "--quiet"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return target, dft, coordinator


def test_worker_killed_during_a_reference_job_is_redelivered_and_recorded_once(roy_small, workers, redis_url, tmp_path):
    """SIGKILL of a whole worker (main process and pool) in the middle of a reference job."""
    # a slow replay: each reference job sleeps, so that the kill lands inside one
    target, victim, coordinator = start_slow_redis_campaign(roy_small, workers, redis_url, tmp_path,
                                                            delay_s=3.0, lease_timeout_s=4.0, dft_name="victim@%h")
    deadline = time.time() + 240
    lease = None
    while time.time() < deadline and lease is None:
        leases = list((target / "jobs").glob("*/lease.json")) if (target / "jobs").exists() else []
        lease = leases[0] if leases else None
        time.sleep(0.05)
    assert lease is not None, "no reference job started"
    job = int(lease.parent.name)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    workers.start(queues="dft", name="rescuer@%h")
    out, _ = coordinator.communicate(timeout=300)
    assert coordinator.returncode == 0, out.decode()
    record = json.loads((target / "results" / f"{job:06d}.json").read_text())
    assert record["status"] == "converged"
    with sqlite3.connect(target / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results WHERE idx = ?", (job,)).fetchone()[0] == 1
        attempts = db.execute("SELECT attempts FROM jobs WHERE idx = ?", (job,)).fetchone()[0]
    assert attempts >= 2, "the killed job was not sent again"
    assert "rescuer" in (tmp_path / "worker2.log").read_text()


def test_status_and_report_commands(embedded_run):
    campaign, _ = embedded_run
    status = run_cli("status", str(campaign)).stdout
    for word in ("iteration", "p_conv", "residual", "sampled", "reference"):
        assert word in status, status
    summary = json.loads((campaign / "summary.json").read_text())
    assert f"{summary['iterations'][-1]['p_conv']:.4f}" in status
    report = run_cli("report", str(campaign)).stdout
    assert "structures.csv" in report and "summary.json" in report
    # the default error law's assumption, tested on the campaign's own prospective errors
    assert summary["iterations"][-1]["n_prospective"] >= 20
    errors = [line for line in status.splitlines() if line.startswith("errors ")]
    assert len(errors) == 2, status
    assert "growth with the force-field height: likelihood ratio" in errors[0]
    assert "mean against the force-field height: Spearman's rho" in errors[1]
    page = (campaign / "report" / "report.html").read_text()
    assert "errors&#x27; width and the force-field height" in page and "errors&#x27; mean" in page
    for line in errors:
        assert html.escape(line[len("errors"):].strip()) in page


def test_a_stop_can_be_lifted_and_the_campaign_goes_on_with_the_same_decisions(embedded_run, roy_small, tmp_path):
    """Stop early at a stated risk of 0.9, then ask for 0.05. The early run's batches are those of
    the run aimed at 0.05 throughout until the first it cuts short (a batch holds what the stop at
    0.9 needs, `trim_last_batch`), which is the start of that run's batch; the lifted campaign keeps
    every early pick and goes on to a stop at 0.05."""
    campaign, _ = embedded_run
    settings = write_settings(tmp_path, roy_small, campaign={"risk": 0.9})
    target = tmp_path / "campaign"
    run_cli("run", str(target), "--settings", str(settings), "--quiet")
    early = json.loads((target / "summary.json").read_text())
    assert early["stop"] == "converged"
    early_picks = picks_of(target)
    assert len(early_picks) < len(picks_of(campaign))
    early_batches, batches = {}, {}
    for picks, by_iteration in ((early_picks, early_batches), (picks_of(campaign), batches)):
        for idx, iteration in picks:
            by_iteration.setdefault(iteration, []).append(idx)
    for iteration in sorted(early_batches):
        assert early_batches[iteration] == batches[iteration][:len(early_batches[iteration])], iteration
        if len(early_batches[iteration]) < len(batches[iteration]):
            break  # cut short for the stop at 0.9: from here the two runs have measured different sets
    again = run_cli("run", str(target), "--quiet")  # the stop holds: nothing new happens
    assert json.loads((target / "summary.json").read_text())["n_reference_calls"] == early["n_reference_calls"]
    run_cli("run", str(target), "--risk", "0.05", "--quiet")
    lifted = json.loads((target / "summary.json").read_text())
    assert picks_of(target)[:len(early_picks)] == early_picks and len(picks_of(target)) > len(early_picks)
    assert lifted["stop"] == "converged" and lifted["iterations"][-1]["risk"] <= 0.05
    assert "reference calls" in again.stdout


def test_killed_pool_process_is_redelivered_by_celery_at_once(roy_small, workers, redis_url, tmp_path):
    """SIGKILL of the process running a job (acks late + reject on worker lost): Celery re-delivers
    it straight away, the dead holder's lease counts as stale, and the coordinator never re-sends."""
    target, dft, coordinator = start_slow_redis_campaign(roy_small, workers, redis_url, tmp_path,
                                                         delay_s=4.0, lease_timeout_s=120.0, dft_name="dft@%h")
    deadline = time.time() + 240
    holder = None
    while time.time() < deadline and holder is None:
        for lease in (target / "jobs").glob("*/lease.json") if (target / "jobs").exists() else []:
            try:
                holder = (int(lease.parent.name), json.loads(lease.read_text())["pid"])
            except (ValueError, FileNotFoundError):
                continue
        time.sleep(0.05)
    assert holder is not None, "no reference job started"
    job, pid = holder
    assert pid != dft.pid  # the pool process, not the worker's main process
    os.kill(pid, signal.SIGKILL)
    out, _ = coordinator.communicate(timeout=300)
    assert coordinator.returncode == 0, out.decode()
    assert json.loads((target / "results" / f"{job:06d}.json").read_text())["status"] == "converged"
    with sqlite3.connect(target / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results WHERE idx = ?", (job,)).fetchone()[0] == 1
        assert db.execute("SELECT attempts FROM jobs WHERE idx = ?", (job,)).fetchone()[0] == 1
    assert "WorkerLostError" in (tmp_path / "worker0.log").read_text()


def test_a_structure_that_always_kills_its_worker_is_failed_after_max_attempts(roy_small, tmp_path):
    """Celery re-delivers a job whose worker process died at once and for ever; graceq counts the
    deliveries and fails that structure after max_attempts, and the campaign goes on."""
    from ase.io import read

    frames = read(roy_small, ":")
    victim = min(frames, key=lambda a: a.info["energy_ff"] / len(a)).info["name"]  # the first FPS pick
    settings = write_settings(tmp_path, roy_small,
                              engine={"engine": "killer_engine:KillerEngine", "victim": str(victim)},
                              runtime={"lease_timeout": 5.0, "max_attempts": 2},
                              campaign={"n_init": 12, "budget": 12})
    target = tmp_path / "campaign"
    tests_dir = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    run_cli("run", str(target), "--settings", str(settings), "--quiet", env=env, timeout=400)
    with sqlite3.connect(target / "state.sqlite") as db:
        idx = db.execute("SELECT idx FROM structures WHERE name = ?", (str(victim),)).fetchone()[0]
        status, message = db.execute("SELECT status, message FROM results WHERE idx = ?", (idx,)).fetchone()
        n_converged = db.execute("SELECT COUNT(*) FROM results WHERE status = 'converged'").fetchone()[0]
    assert status == "failed" and ("died" in message or "lost its worker" in message), message
    assert n_converged == 11
    summary = json.loads((target / "summary.json").read_text())
    assert summary["n_failed"] == 1 and summary["stop"] == "budget"
