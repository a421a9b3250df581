"""Celery tasks: thin, idempotent wrappers that call the science and the engines.

Every task reads its inputs by reference (paths inside the campaign directory, which all workers
see) and writes its output durably, by atomic rename, before it returns and so before its message
is acknowledged. Running a task twice gives the same file, so a re-delivered or duplicated message
does no harm; the coordinator collects outputs from the files, never from the result backend.

A task that cannot do its work writes ``<output>.error.json`` with the reason, so that the
coordinator stops with that message instead of waiting.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
from functools import lru_cache
from pathlib import Path

import numpy as np

from graceq.app import app
from graceq.store import CampaignPaths, atomic_save_npy, atomic_save_npz, atomic_write_json, error_file


@lru_cache(maxsize=8)
def _settings(campaign_dir: str, mtime: float):
    from graceq.config import load_settings

    return load_settings(Path(campaign_dir) / "settings.toml")


def settings_of(campaign_dir: str):
    """The campaign's settings, read once per worker process (re-read if the file changes)."""
    path = Path(campaign_dir) / "settings.toml"
    return _settings(str(campaign_dir), path.stat().st_mtime)


def _guarded(output: Path, work) -> dict:
    """Run work(); on an exception write the error file the coordinator watches, then re-raise."""
    try:
        return work()
    except Exception as exc:
        atomic_write_json(
            error_file(output),
            {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
             "host": socket.gethostname()},
        )
        raise


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
    from graceq.io import read_frames_db

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

    return _guarded(paths.projection, work)


@app.task(name="graceq.featurize")
def featurize(campaign_dir: str, chunk: int, start: int, stop: int) -> str:
    """Features of pool rows start..stop-1 with the campaign's projection; writes one chunk file."""
    from graceq.features import CompressedSoap
    from graceq.io import read_frames_db

    paths = CampaignPaths(campaign_dir)
    output = paths.feature_chunk(chunk)
    if output.exists():
        return str(output)

    def work():
        soap = CompressedSoap.load(paths.projection)
        frames = read_frames_db(paths.structures, list(range(start, stop)))
        atomic_save_npy(output, soap.transform(frames))
        return str(output)

    return _guarded(output, work)


# -- fit queue --------------------------------------------------------------------------------
def _training_set(paths: CampaignPaths, iteration: int):
    data = np.load(paths.iteration(iteration) / "train.npz")
    features = np.load(paths.features, mmap_mode="r")
    return np.asarray(features[data["rows"]]), data["y"], data


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

    return _guarded(output, work)


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

    return _guarded(output, work)


# -- dft queue --------------------------------------------------------------------------------
class Lease:
    """A job's claim by one worker: a file whose mtime a thread refreshes while the worker lives.

    A fresh lease held by someone else means the job runs elsewhere (a duplicate delivery must not
    run it again); a stale one means its worker died, and the job may be taken over, resuming from
    the engine's checkpoint.
    """

    def __init__(self, path: Path, timeout_s: float):
        self.path = path
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_fresh(self) -> bool:
        """Held by a live worker: beaten within the timeout, and not by a dead process of this host."""
        try:
            if time.time() - self.path.stat().st_mtime >= self.timeout_s:
                return False
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return False
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:  # its worker process was killed: Celery re-delivers at once
                return False
            except (PermissionError, KeyError, ValueError):
                pass
        return True

    def acquire(self) -> bool:
        """Claim the job; False when a live worker already holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        claim = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}")
        atomic_write_json(claim, {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        try:
            os.link(claim, self.path)  # atomic, and fails if someone holds the lease
        except FileExistsError:
            if self.is_fresh():
                claim.unlink(missing_ok=True)
                return False
            os.replace(claim, self.path)  # take over a dead worker's job
        else:
            claim.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout_s / 6)):
            self.beat()

    def beat(self) -> None:
        """Refresh now (engines call this between optimiser steps)."""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def _count_delivery(job_dir: Path) -> int:
    """One more delivery of a job that this worker now holds the lease of; returns the count."""
    counter = job_dir / "deliveries"
    try:
        count = int(counter.read_text()) + 1
    except (FileNotFoundError, ValueError):
        count = 1
    atomic_write_json(counter, count)
    return count


def reference_task_id(campaign_id: str, iteration: int, idx: int) -> str:
    """Deterministic task id (campaign, iteration, kind, structure): the same id for every retry."""
    return f"graceq-{campaign_id}-it{iteration:04d}-dft-{idx:06d}"


@app.task(name="graceq.run_reference", bind=True)
def run_reference(self, campaign_dir: str, idx: int, name: str) -> dict:
    """Re-minimise pool structure idx with the campaign's engine; writes results/<idx>.json once."""
    from graceq.engines import ReferenceResult, make_engine
    from graceq.io import read_frames_db

    paths = CampaignPaths(campaign_dir)
    output = paths.result(idx)
    if output.exists():
        return {"idx": idx, "duplicate": "result exists"}
    settings = settings_of(campaign_dir)
    lease = Lease(paths.job_dir(idx) / "lease.json", settings.runtime.lease_timeout)
    if not lease.acquire():
        return {"idx": idx, "duplicate": "running elsewhere"}
    try:
        if output.exists():  # finished between our first look and the lease
            return {"idx": idx, "duplicate": "result exists"}
        deliveries = _count_delivery(paths.job_dir(idx))
        if deliveries > settings.runtime.max_attempts:
            # Celery re-delivers a job whose worker process died, at once and for ever: a structure
            # that kills its worker (out of memory, a crashing code) is failed, not retried again
            lost = ReferenceResult(name, "failed", None, None,
                                   message=f"its worker process died {deliveries - 1} times")
            atomic_write_json(output, dict(lost.to_json(), idx=idx, host=socket.gethostname(), task_id=self.request.id))
            return {"idx": idx, "status": "failed"}
        meta = json.loads(paths.pool_meta.read_text())
        atoms = read_frames_db(paths.structures, [idx])[0]
        try:
            engine = make_engine(settings.engine.model_dump(), settings.campaign.unit, meta.get("source"))
            if callable(getattr(engine, "submit", None)):
                # a batch-scheduler engine (slurm): submit (idempotent) and return; the coordinator
                # polls the job, which survives this worker and the coordinator
                return {"idx": idx, "submitted": engine.submit(atoms, name, paths.job_dir(idx))}
            result = engine.run(atoms, name, paths.job_dir(idx), heartbeat=lease.beat)
        except Exception as exc:  # the engine itself broke: a failed reference, with the reason
            result = ReferenceResult(name=name, status="failed", energy=None, atoms=None,
                                     message=f"{type(exc).__name__}: {exc}")
        record = result.to_json()
        record.update(idx=idx, host=socket.gethostname(), task_id=self.request.id)
        atomic_write_json(output, record)
        return {"idx": idx, "status": result.status}
    finally:
        lease.release()


@app.task(name="graceq.noop")
def noop(value: int) -> int:
    """Does nothing: measures the per-task overhead of the broker (benchmarks/dispatch.py)."""
    return value
