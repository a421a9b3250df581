"""Reference jobs as a cluster user follows them: `graceq jobs` (list) and `graceq retry` (send again).

The list is read-only: it opens ``state.sqlite`` read-only (picks, jobs, results tables) and reads
the files that the workers write: ``results/<idx>.json`` (outcome, worker host, task id),
``jobs/<idx>/lease.json`` (the worker that runs the job now and since when) and
``jobs/<idx>/deliveries`` (written when a worker starts a delivery: its time is the job's start).
It answers while a coordinator runs.

A retry keeps every decision already taken. `graceq retry` holds the campaign's coordinator lease
(so no coordinator writes meanwhile), moves each failed job's result row and its jobs row into the
``retried_results`` / ``retried_jobs`` history tables, and moves its result file, its working
directory and the newest iteration's fitted files (which were fitted on the failed result) into
``retried/<time>/``. The picks stay. The coordinator's next run sends every pick that has no result
again (with the current iteration's batch), and fits and decides the newest iteration with the new
results; the picks of earlier iterations, and their order, are unchanged. A campaign that had
stopped takes its stop decision again with the new results (as when its stopping rule is lifted).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from graceq.store import CampaignPaths

STATES = ("waiting", "queued", "running", "submitted", "converged", "unstable", "failed")

HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS retried_results (
    idx INTEGER NOT NULL, status TEXT NOT NULL, energy_ref REAL, n_steps INTEGER, message TEXT,
    received REAL NOT NULL, retried REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS retried_jobs (
    idx INTEGER NOT NULL, task_id TEXT NOT NULL, sent_at REAL NOT NULL, attempts INTEGER NOT NULL,
    retried REAL NOT NULL
);
"""


class RetryError(ValueError):
    """A retry that cannot be done as asked; the message says why and what to do."""


@dataclass
class Job:
    """One reference job of a campaign (times in s since the epoch; None when unknown)."""

    idx: int
    name: str
    iteration: int
    state: str          # one of STATES
    attempts: int       # deliveries sent by the coordinator for this round (0: not sent yet)
    retries: int        # earlier rounds undone by `graceq retry`
    host: str | None    # worker host that ran (or runs) it
    started: float | None
    finished: float | None
    message: str
    log: str | None     # the newest *.log / *.out file of its working directory, else the directory

    @property
    def run_time_s(self) -> float | None:
        if self.started is None:
            return None
        end = self.finished if self.finished is not None else time.time()
        return max(0.0, end - self.started)


def _read_only(paths: CampaignPaths) -> sqlite3.Connection:
    if not paths.state.exists():
        raise FileNotFoundError(f"{paths.root}: no campaign here (no state.sqlite); create one with `graceq init`")
    return sqlite3.connect(f"file:{paths.state}?mode=ro", uri=True, timeout=30)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _log_of(job_dir: Path) -> str | None:
    if not job_dir.is_dir():
        return None
    logs = [p for pattern in ("*.log", "*.out") for p in job_dir.glob(pattern) if p.is_file()]
    return str(max(logs, key=lambda p: p.stat().st_mtime) if logs else job_dir)


def job_table(root: str | Path) -> list[Job]:
    """Every picked structure's reference job, in sampling order (read-only)."""
    from graceq.dispatcher import Lease
    from graceq.config import load_settings

    paths = CampaignPaths(root)
    lease_timeout = load_settings(paths.settings).runtime.lease_timeout
    with _read_only(paths) as db:
        picks = db.execute("SELECT p.idx, s.name, p.iteration FROM picks p JOIN structures s USING (idx) "
                           "ORDER BY p.iteration, p.rank").fetchall()
        results = {r[0]: r[1:] for r in db.execute("SELECT idx, status, message, received FROM results")}
        sent = {r[0]: r[1:] for r in db.execute("SELECT idx, sent_at, attempts FROM jobs")}
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        retries: dict[int, int] = {}
        if "retried_results" in tables:
            for idx, n in db.execute("SELECT idx, COUNT(*) FROM retried_results GROUP BY idx"):
                retries[idx] = n
    jobs = []
    for idx, name, iteration in picks:
        job_dir = paths.job_dir(idx)
        record = _json(paths.result(idx))
        lease = _json(job_dir / "lease.json")
        started = _mtime(job_dir / "deliveries") or lease.get("since")
        host = record.get("host") or lease.get("host")
        finished = None
        if idx in results:
            state, message, received = results[idx]
            finished = _mtime(paths.result(idx)) or received
        elif Lease(job_dir / "lease.json", lease_timeout).is_fresh():
            state, message = "running", ""
        elif (job_dir / "slurm.json").exists():
            state, message = "submitted", "in the batch scheduler"
        elif idx in sent:
            state, message, started = "queued", "", None
        else:
            state, message, started = "waiting", "", None
        jobs.append(Job(idx=idx, name=str(name), iteration=iteration, state=state,
                        attempts=sent.get(idx, (None, 0))[1], retries=retries.get(idx, 0), host=host,
                        started=started, finished=finished, message=message or "", log=_log_of(job_dir)))
    return jobs


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def job_lines(jobs: list[Job]) -> list[str]:
    """A table for people: one line per job, run time in s."""
    header = ("name", "iter", "state", "attempts", "worker", "started", "run time", "outcome", "log")
    rows = [header]
    for j in jobs:
        run = j.run_time_s
        attempts = str(j.attempts) + (f" (+{j.retries} retried)" if j.retries else "")
        outcome = j.message.replace("\n", " ")
        outcome = outcome if len(outcome) <= 60 else outcome[:57] + "..."
        rows.append((j.name, str(j.iteration), j.state, attempts, j.host or "-", _when(j.started),
                     "-" if run is None else f"{run:.1f} s", outcome or "-", j.log or "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(header) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def in_flight_lines(root: str | Path) -> list[str]:
    """`graceq status` lines for the reference jobs that run now: name, worker, for how long."""
    from graceq.lock import duration

    lines = []
    for j in job_table(root):
        if j.state in ("running", "submitted"):
            lines.append(f"  running  {j.name} on {j.host or '?'} for {duration(j.run_time_s or 0)} "
                         f"(attempt {j.attempts})")
    return lines


def retry(root: str | Path, names: list[str] | None = None, failed: bool = False) -> list[str]:
    """Undo the failed results of the named jobs (or of every failed job): the next run sends them again.

    Returns the names retried. Refuses while a coordinator runs the campaign (it holds the lease),
    a name that is not in the pool, and a job that did not fail (its result stands).
    """
    from graceq.lock import CoordinatorLock
    from graceq.store import CampaignStore

    paths = CampaignPaths(root)
    if not paths.state.exists():
        raise FileNotFoundError(f"{paths.root}: no campaign here (no state.sqlite)")
    if not names and not failed:
        raise RetryError("say which jobs to send again: --failed, or their names")
    lock = CoordinatorLock(paths.root).acquire()  # raises CampaignLocked while a coordinator runs
    store = CampaignStore(paths.root)
    try:
        jobs = {j.name: j for j in job_table(paths.root)}
        if failed and not names:
            chosen = [j for j in jobs.values() if j.state == "failed"]
        else:
            unknown = [n for n in names if n not in jobs]
            if unknown:
                raise RetryError(f"{paths.root}: no reference job for {', '.join(map(repr, unknown))} "
                                 "(see `graceq jobs` for the names)")
            chosen = [jobs[n] for n in names]
            standing = [j for j in chosen if j.state != "failed"]
            if standing:
                raise RetryError(
                    f"{paths.root}: only failed jobs can be sent again; "
                    + ", ".join(f"{j.name} is {j.state}" for j in standing))
        if not chosen:
            return []
        now = time.time()
        aside = paths.root / "retried" / time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        aside.mkdir(parents=True, exist_ok=True)
        idx = [j.idx for j in chosen]
        marks = ",".join("?" * len(idx))
        with store.transaction() as db:
            for statement in HISTORY_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"INSERT INTO retried_results SELECT idx, status, energy_ref, n_steps, message, received, ? "
                       f"FROM results WHERE idx IN ({marks})", [now, *idx])
            db.execute(f"INSERT INTO retried_jobs SELECT idx, task_id, sent_at, attempts, ? "
                       f"FROM jobs WHERE idx IN ({marks})", [now, *idx])
            db.execute(f"DELETE FROM results WHERE idx IN ({marks})", idx)
            db.execute(f"DELETE FROM jobs WHERE idx IN ({marks})", idx)
        for j in chosen:
            if paths.result(j.idx).exists():
                paths.result(j.idx).replace(aside / paths.result(j.idx).name)
            if paths.job_dir(j.idx).exists():
                shutil.move(str(paths.job_dir(j.idx)), aside / paths.job_dir(j.idx).name)
        if paths.relaxed.exists():
            from ase.db import connect

            with connect(paths.relaxed) as rdb:
                ids = [row.id for i in idx for row in rdb.select(pool_index=int(i))]
                if ids:
                    rdb.delete(ids)
        last = store.last_pick_iteration()
        if last is not None and paths.iteration(last).exists():
            # fitted on the failed results: the next run fits this iteration again
            shutil.move(str(paths.iteration(last)), aside / f"iteration-{last:04d}")
        return [j.name for j in chosen]
    finally:
        store.close()
        lock.release()
