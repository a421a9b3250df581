"""Celery tasks: thin, idempotent wrappers that call the science and the engines.

Every task reads its inputs by reference (paths inside the campaign directory, which all workers
see) and writes its output durably, by atomic rename, before it returns and so before its message
is acknowledged. Running a task twice gives the same file, so a re-delivered or duplicated message
does no harm; the coordinator collects outputs from the files, never from the result backend.

A task that cannot do its work writes ``<output>.error.json`` with the reason, so that the
coordinator stops with that message instead of waiting. Every task holds a lease on its output
while it works (``graceq.dispatcher.Lease``), so that the dispatcher can tell a lost task from a
long one. Transport and job protocol (sending, re-sending, leases' rules) live in
``graceq.dispatcher``; the tasks only do the work and write its file.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from functools import lru_cache
from pathlib import Path

import numpy as np
from celery.signals import worker_init

from graceq.app import app
from graceq.dispatcher import SUBMITTED, Lease, LeaseLost, count_delivery, lease_file
from graceq.store import CampaignPaths, atomic_save_npy, atomic_save_npz, atomic_write_json, error_file


@worker_init.connect
def _import_before_fork(**_) -> None:
    """Import what the tasks import when they run, once, in the worker's main process before its
    pool forks: each pool process would otherwise import it at its first task (ASE's database
    module alone takes 0.3 s, scikit-learn more), while the slot or the refit it holds waits."""
    import graceq.config  # noqa: F401
    import graceq.engines.replay  # noqa: F401
    import graceq.model  # noqa: F401
    import graceq.pooldb  # noqa: F401


@lru_cache(maxsize=8)
def _settings(campaign_dir: str, mtime: float):
    from graceq.config import load_settings

    return load_settings(Path(campaign_dir) / "settings.toml")


def settings_of(campaign_dir: str):
    """The campaign's settings, read once per worker process (re-read if the file changes)."""
    path = Path(campaign_dir) / "settings.toml"
    return _settings(str(campaign_dir), path.stat().st_mtime)


def _guarded(campaign_dir: str, output: Path, work) -> str:
    """Run work() under the output's lease; on an exception write the error file the coordinator
    watches, then re-raise. A duplicate delivery of a task that a live worker runs returns at once.

    The lease lets the dispatcher see a task whose worker died (its beat stops) and send it again,
    instead of waiting for the broker's visibility timeout (12 h by default).
    """
    lease = Lease(lease_file(output), settings_of(campaign_dir).runtime.lease_timeout)
    if not lease.acquire():
        return str(output)
    try:
        if output.exists():
            return str(output)
        return work()
    except Exception as exc:
        atomic_write_json(
            error_file(output),
            {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
             "host": socket.gethostname()},
        )
        raise
    finally:
        lease.release()


# -- featurize queue --------------------------------------------------------------------------
def _soap_from_settings(settings, species):
    from graceq.features import CompressedSoap

    d = settings.descriptor
    return CompressedSoap(
        species=species, n_max=d.n_max, l_max=d.l_max, cutoff=d.cutoff, smoothing=d.smoothing,
        gaussian_width=d.gaussian_width, scaling_rate=d.scaling_rate, scaling_scale=d.scaling_scale,
        scaling_exponent=d.scaling_exponent, n_compressed=d.n_compressed,
    )


@app.task(name="graceq.fit_projection")
def fit_projection(campaign_dir: str, sample: list[int], species: list[int]) -> str:
    """Fit the radial compression on the sampled pool structures; writes artifacts/projection.npz."""
    from graceq.pooldb import read_frames_db

    paths = CampaignPaths(campaign_dir)
    if paths.projection.exists():
        return str(paths.projection)

    def work():
        frames = read_frames_db(paths.structures, sample)
        soap = _soap_from_settings(settings_of(campaign_dir), species).fit(frames)
        paths.projection.parent.mkdir(parents=True, exist_ok=True)
        tmp = paths.projection.with_name(f".projection.{os.getpid()}.tmp.npz")
        soap.save(tmp)
        os.replace(tmp, paths.projection)
        return str(paths.projection)

    return _guarded(campaign_dir, paths.projection, work)


@app.task(name="graceq.featurize")
def featurize(campaign_dir: str, chunk: int, start: int, stop: int) -> str:
    """Features of pool rows start..stop-1 with the campaign's projection; writes one chunk file."""
    from graceq.features import CompressedSoap
    from graceq.pooldb import read_frames_db

    paths = CampaignPaths(campaign_dir)
    output = paths.feature_chunk(chunk)
    if output.exists():
        return str(output)

    def work():
        soap = CompressedSoap.load(paths.projection)
        frames = read_frames_db(paths.structures, list(range(start, stop)))
        atomic_save_npy(output, soap.transform(frames))
        return str(output)

    return _guarded(campaign_dir, output, work)


# -- fit queue --------------------------------------------------------------------------------
def _training_set(paths: CampaignPaths, iteration: int):
    data = np.load(paths.iteration(iteration) / "train.npz")
    features = np.load(paths.features, mmap_mode="r")
    # the model's inputs beyond the descriptor (campaign.model_inputs: the force-field column), as
    # the coordinator wrote them for these rows
    return np.hstack([features[data["rows"]], data["inputs_beyond_descriptor"]]), data["y"], data


@app.task(name="graceq.select_lambda")
def select_lambda(campaign_dir: str, iteration: int) -> str:
    """Ridge lambda by chronological-free 5-fold CV on the iteration's train set; writes lambda.json."""
    from graceq.model import select_ridge_alpha

    paths = CampaignPaths(campaign_dir)
    output = paths.iteration(iteration) / "lambda.json"
    if output.exists():
        return str(output)

    def work():
        X, y, _ = _training_set(paths, iteration)
        m = settings_of(campaign_dir).model
        ridge_lambda, cv_rmse = select_ridge_alpha(X, y, alphas=np.asarray(m.alphas), cv=m.cv)
        atomic_write_json(output, {"ridge_lambda": float(ridge_lambda), "cv_rmse": [float(v) for v in cv_rmse]})
        return str(output)

    return _guarded(campaign_dir, output, work)


@app.task(name="graceq.fit_members")
def fit_committee(campaign_dir: str, iteration: int, start: int, stop: int, ridge_lambda: float) -> str:
    """Fit committee members start..stop-1 of an iteration; writes their coefficients."""
    from graceq.model import fit_members

    paths = CampaignPaths(campaign_dir)
    output = paths.members(iteration, start, stop)
    if output.exists():
        return str(output)

    def work():
        X, y, data = _training_set(paths, iteration)
        coef, intercept = fit_members(X, y, ridge_lambda, data["subsets"][start:stop])
        atomic_save_npz(output, coef=coef, intercept=intercept)
        return str(output)

    return _guarded(campaign_dir, output, work)


# -- dft queue --------------------------------------------------------------------------------
@app.task(name="graceq.run_reference", bind=True)
def run_reference(self, campaign_dir: str, idx: int, name: str) -> dict:
    """Re-minimise pool structure idx with the campaign's engine; writes results/<idx>.json once.

    The engine's ``submit`` either runs the job here (the default) or hands it to a scheduler and
    returns; ``poll`` then gives the result, or None while the scheduler holds the job (the task
    leaves a ``submitted.json`` and the dispatcher polls the engine from then on). Only the lease's
    holder writes: a worker that was paused past the lease finds the task taken over and stops.
    """
    from graceq.engines import ReferenceResult, make_engine
    from graceq.pooldb import read_frames_db

    paths = CampaignPaths(campaign_dir)
    output = paths.result(idx)
    if output.exists():
        return {"idx": idx, "duplicate": "result exists"}
    settings = settings_of(campaign_dir)
    job_dir = paths.job_dir(idx)
    lease = Lease(job_dir / "lease.json", settings.runtime.lease_timeout)
    if not lease.acquire():
        return {"idx": idx, "duplicate": "running elsewhere"}
    try:
        if output.exists():  # finished between our first look and the lease
            return {"idx": idx, "duplicate": "result exists"}
        deliveries = count_delivery(job_dir)
        if deliveries > settings.runtime.max_attempts:
            # Celery re-delivers a job whose worker process died, at once and for ever: a structure
            # that kills its worker (out of memory, a crashing code) is failed, not retried again
            result = ReferenceResult.failed(name, f"its worker process died {deliveries - 1} times")
        else:
            meta = json.loads(paths.pool_meta.read_text())
            atoms = read_frames_db(paths.structures, [idx])[0]
            try:
                engine = make_engine(settings.engine.model_dump(), settings.campaign.unit, meta.get("source"))
                engine.submit(atoms, name, job_dir, heartbeat=lease.beat)
                result = engine.poll([job_dir])[job_dir]
            except LeaseLost:
                return {"idx": idx, "duplicate": "taken over by another worker"}
            except Exception as exc:  # the engine itself broke: a failed reference, with the reason
                result = ReferenceResult.failed(name, f"{type(exc).__name__}: {exc}")
            if result is None:  # the engine's scheduler holds the job now
                lease.write_if_held(job_dir / SUBMITTED, {"host": socket.gethostname(), "at": time.time(),
                                                          "task_id": self.request.id})
                return {"idx": idx, "submitted": True}
        record = result.to_json()
        record.update(idx=idx, host=socket.gethostname(), pid=os.getpid(), task_id=self.request.id)
        if not lease.write_if_held(output, record):
            return {"idx": idx, "duplicate": "taken over by another worker"}
        return {"idx": idx, "status": result.status}
    finally:
        lease.release()


@app.task(name="graceq.noop")
def noop(value: int) -> int:
    """Does nothing: measures the per-task overhead of the broker (benchmarks/dispatch.py)."""
    return value
