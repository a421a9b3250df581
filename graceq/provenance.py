"""Where a campaign's numbers come from: versions, settings hash, dates, wall time, reference-job hours.

:func:`provenance` returns the record that ``summary.json`` carries under ``"provenance"`` (the
report writer adds it). Times are in s since the epoch and as ISO 8601 (UTC); hours are wall-clock
hours. A reference job's wall time runs from the moment a worker started its last delivery
(``jobs/<idx>/deliveries``) to its result file; for a batch-scheduler engine it includes the time
the job waited in the scheduler's queue. CPU time is not measured by the engines: it is reported as
None rather than guessed from wall time and core counts.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sqlite3
import time
from importlib import metadata
from pathlib import Path

from graceq.store import CampaignPaths

#: distributions whose versions decide the numbers (science) or the way they were computed (system)
DEPENDENCIES = ("numpy", "scipy", "scikit-learn", "skmatter", "ase", "featomic", "metatensor-core",
                "celery", "kombu", "redis", "pydantic", "matplotlib")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def settings_hash(root: str | Path) -> str:
    """sha256 of the campaign's settings (canonical JSON of the validated model, not the file's layout)."""
    from graceq.config import load_settings

    settings = load_settings(CampaignPaths(root).settings)
    canonical = json.dumps(settings.model_dump(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def timestamps(root: str | Path) -> dict:
    """The campaign's dates, s since the epoch (None when not yet): ``created`` (pool.json, written
    once at init), ``first_sent`` (first reference job), ``first_result`` / ``last_result``
    (received), ``last_iteration`` (finished). Read-only: the store is opened in SQLite's ro mode."""
    paths = CampaignPaths(root)
    with sqlite3.connect(f"file:{paths.state}?mode=ro", uri=True, timeout=30) as db:
        first_sent = db.execute("SELECT MIN(sent_at) FROM jobs").fetchone()[0]
        first_result, last_result = db.execute("SELECT MIN(received), MAX(received) FROM results").fetchone()
        last_iteration = db.execute("SELECT MAX(finished) FROM iterations").fetchone()[0]
    return {"created": paths.pool_meta.stat().st_mtime if paths.pool_meta.exists() else None,
            "first_sent": first_sent, "first_result": first_result, "last_result": last_result,
            "last_iteration": last_iteration}


def versions(distributions=DEPENDENCIES) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent)."""
    return {name: _version(name) for name in distributions}


def provenance(root: str | Path) -> dict:
    """The provenance record of the campaign in `root` (read-only)."""
    import graceq
    from graceq.jobs import job_table

    paths = CampaignPaths(root)
    t = timestamps(paths.root)
    created, first_sent, last_finished = t["created"], t["first_sent"], t["last_iteration"]
    jobs = [j for j in job_table(paths.root) if j.state in ("converged", "unstable", "failed")]
    run_times = [j.run_time_s for j in jobs if j.run_time_s is not None]
    return {
        "graceq": graceq.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dependencies": versions(),
        "settings_sha256": settings_hash(paths.root),
        "created": _iso(created),
        "first_reference_sent": _iso(first_sent),
        "last_iteration_finished": _iso(last_finished),
        "wall_time_s": None if created is None or last_finished is None else round(last_finished - created, 3),
        "reference_jobs": {
            "n_finished": len(jobs),
            "n_timed": len(run_times),
            "wall_hours": round(sum(run_times) / 3600.0, 6),
            "cpu_hours": None,
        },
    }
