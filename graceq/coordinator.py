"""The coordinator: runs a campaign by moving Celery messages and persisting every step.

It is the single writer of the campaign's state. Each iteration: dispatch the batch's reference
jobs, ingest each result as its file appears, dispatch the committee fit, then ask
``graceq.campaign.decide`` for the convergence check and the next batch, and persist the iteration
and its picks in one transaction. A coordinator killed at any point resumes from the store and
makes the same next decision; a job whose worker died (its lease went stale) is sent again and
resumes from its checkpoint; duplicate deliveries are ignored by the workers and by the store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from graceq import campaign as cp
from graceq.config import ConfigError, Settings, load_settings, write_settings
from graceq.lock import CoordinatorLock
from graceq.store import CampaignPaths, CampaignStore, atomic_save_npy, atomic_save_npz, error_file

log = logging.getLogger("graceq.coordinator")


class TaskError(RuntimeError):
    """A worker could not do a task; the message carries the worker's reason."""


# -- creating a campaign ------------------------------------------------------------------------
def init_campaign(settings: Settings, campaign_dir: str | Path, source: str = "settings") -> CampaignStore:
    """Validate the pool and the engine, then lay out a new campaign directory.

    Nothing is written until every input check has passed; an existing campaign is left alone
    (it is resumed, not re-initialised).
    """
    from graceq.engines import make_engine
    from graceq.features import species_of
    from graceq.io import check_pool_fits_settings, read_pool, write_pool_db, write_pool_notes

    paths = CampaignPaths(campaign_dir)
    if paths.state.exists() and CampaignStore(paths.root).n_structures() > 0:
        raise FileExistsError(f"{paths.root}: a campaign already exists here; `graceq run` resumes it")
    c = settings.campaign
    pool = read_pool(
        c.pool, c.unit, energy_key=c.energy_key, name_key=c.name_key, energies_csv=c.energies_csv,
        atoms_per_molecule=c.atoms_per_molecule, on_bad_molecule=c.on_bad_molecule,
    )
    check_pool_fits_settings(len(pool), settings, source)
    try:  # a calculator that cannot be loaded, a missing replay source: stop before any work
        make_engine(settings.engine.model_dump(), c.unit, pool.source)
    except (ValueError, ImportError, OSError) as exc:
        raise ConfigError(f"{source} [engine]: {exc}") from None

    paths.root.mkdir(parents=True, exist_ok=True)
    write_settings(settings, paths.settings)
    write_pool_db(pool, paths.structures)
    write_pool_notes(pool, paths.root)  # dropped.csv, identical.csv
    species = species_of(pool.frames)
    paths.pool_meta.write_text(json.dumps({
        "source": str(pool.source), "unit": pool.unit, "n_structures": len(pool),
        "atoms_per_molecule": int(pool.atoms_per_molecule), "species": [int(z) for z in species],
    }, indent=1))
    store = CampaignStore(paths.root)
    store.add_structures(list(pool.names), pool.n_atoms, pool.energy_ff)
    store.set_meta("campaign_id", uuid.uuid4().hex[:12])
    store.set_meta("atoms_per_molecule", int(pool.atoms_per_molecule))
    store.set_meta("species", [int(z) for z in species])
    store.set_meta("has_reference", bool(pool.energy_ref is not None and np.isfinite(pool.energy_ref).any()))
    return store


# -- embedded workers ---------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the embedded worker gets SIGTERM (warm shutdown) when the coordinator dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


def worker_command(queues: str, concurrency: int, name: str, loglevel: str = "WARNING",
                   embedded: bool = False) -> list[str]:
    """The `celery worker` command line that every graceq worker pool runs."""
    cmd = [
        sys.executable, "-m", "celery", "-A", "graceq.app", "worker", "-Q", queues,
        "-c", str(concurrency), "-n", name, "--loglevel", loglevel, "-O", "fair",
    ]
    if embedded:
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return cmd


class EmbeddedWorkers:
    """Celery worker processes on this machine, consuming the campaign's folder broker."""

    def __init__(self, paths: CampaignPaths, processes: int):
        self.paths = paths
        self.processes = processes
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "EmbeddedWorkers":
        env = dict(os.environ, GRACEQ_EMBEDDED_DIR=str(self.paths.broker))
        env.pop("GRACEQ_BROKER_URL", None)
        if self.processes > 1:  # one thread per process: the processes share the cores
            env.setdefault("RAYON_NUM_THREADS", "1")
            env.setdefault("OMP_NUM_THREADS", "1")
            env.setdefault("OPENBLAS_NUM_THREADS", "1")
        logfile = open(self.paths.broker / "worker.log", "ab")
        self.proc = subprocess.Popen(
            worker_command("featurize,fit,dft", self.processes, f"embedded-{os.getpid()}@%h", embedded=True),
            env=env, stdout=logfile, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        return self

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise TaskError(
                f"the embedded worker exited with code {self.proc.returncode}; "
                f"see {self.paths.broker / 'worker.log'}"
            )

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # warm shutdown: the worker finishes its tasks and stops its pool
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def job_is_lost(beat: float | None, sent_at: float, now: float, lease_timeout_s: float,
                resend_unstarted_after_s: float) -> bool:
    """Whether a reference job without a result must be sent again (times in s since the epoch).

    ``beat`` is its lease's last heartbeat (None: no lease). Lost: the delivery we sent started and
    then stopped beating (its worker died), or it never started within the allowed queueing time
    (its message may be gone with a broker restart).
    """
    died = beat is not None and beat >= sent_at and now - beat > lease_timeout_s
    unstarted = (beat is None or beat < sent_at) and now - sent_at > resend_unstarted_after_s
    return died or unstarted


# -- the coordinator ----------------------------------------------------------------------------
class Coordinator:
    """Runs (or resumes) the campaign in `campaign_dir` until it converges or runs out."""

    def __init__(self, campaign_dir: str | Path, broker_url: str | None = None, progress: bool = True,
                 max_iterations: int | None = None):
        self.paths = CampaignPaths(campaign_dir)
        if not self.paths.state.exists():
            raise FileNotFoundError(f"{self.paths.root}: no campaign here; create one with `graceq init`")
        self.store = CampaignStore(self.paths.root)
        self.settings = load_settings(self.paths.settings)
        self.broker_url = broker_url if broker_url is not None else os.environ.get("GRACEQ_BROKER_URL")
        self.progress = progress
        self.max_iterations = max_iterations
        self.campaign_id = self.store.get_meta("campaign_id")
        self.apm = int(self.store.get_meta("atoms_per_molecule"))
        s = self.store.structures()
        self.names, self.n_atoms, self.energy_ff = s["name"], s["n_atoms"], s["energy_ff"]
        self.workers: EmbeddedWorkers | None = None
        self.lock = CoordinatorLock(self.paths.root)  # held while run() runs: one coordinator per campaign

    # -- plumbing --
    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=None if self.progress else True,  # None: bars on a TTY only
                    leave=False, dynamic_ncols=True, mininterval=0.5)

    def _say(self, message: str) -> None:
        log.info(message)
        tqdm.write(message)  # also with --quiet (no bars) and into a log file: these lines are the record

    def _wait_files(self, outputs: dict, desc: str, on_ready=None, on_idle=None) -> None:
        """Wait until every output file exists; a worker's error file stops the campaign."""
        missing = dict(outputs)
        with self._bar(len(outputs), desc) as bar:
            while missing:
                done = [key for key, path in missing.items() if path.exists()]
                for key in done:
                    if on_ready is not None:
                        on_ready(key, missing[key])
                    del missing[key]
                bar.update(len(done))
                for key, path in missing.items():
                    error = error_file(path)
                    if error.exists():
                        raise TaskError(f"{desc} failed on a worker: {json.loads(error.read_text())['error']}")
                if missing:
                    if self.workers is not None:
                        self.workers.check()
                    if on_idle is not None:
                        on_idle(missing)
                    time.sleep(self.settings.runtime.poll_interval)

    def _send(self, task, args: list, task_id: str) -> None:
        task.apply_async(args=args, task_id=task_id)

    # -- steps --
    def ensure_features(self) -> np.ndarray:
        """Fit the radial projection and featurize the pool in chunks (once per campaign)."""
        from graceq import tasks

        if not self.paths.features.exists():
            self.lock.set_stage("featurizing the pool")
            d = self.settings.descriptor
            n = len(self.names)
            if not self.paths.projection.exists():
                rng = np.random.default_rng(self.settings.campaign.seed)
                sample = np.sort(rng.choice(n, size=min(d.fit_sample, n), replace=False)).tolist()
                self._send(tasks.fit_projection, [str(self.paths.root), sample, self.store.get_meta("species")],
                           f"graceq-{self.campaign_id}-projection")
                self._wait_files({"projection": self.paths.projection}, "fitting the radial compression")
            chunks = {k: (start, min(start + d.chunk_size, n)) for k, start in enumerate(range(0, n, d.chunk_size))}
            outputs = {k: self.paths.feature_chunk(k) for k in chunks}
            for k, (start, stop) in chunks.items():
                if not outputs[k].exists():
                    self._send(tasks.featurize, [str(self.paths.root), k, start, stop],
                               f"graceq-{self.campaign_id}-featurize-{k:05d}")
            self._wait_files(outputs, "featurizing the pool")
            features = np.concatenate([np.load(outputs[k]) for k in sorted(chunks)])
            atomic_save_npy(self.paths.features, features)
        return np.load(self.paths.features)

    def view(self) -> cp.CampaignView:
        return cp.CampaignView(
            n_atoms=self.n_atoms, energy_ff=self.energy_ff, atoms_per_molecule=self.apm,
            picks=[idx for idx, _ in self.store.picks()], results=self.store.results(),
        )

    def _ingest(self, idx: int, path: Path) -> None:
        from graceq.engines import ReferenceResult

        record = json.loads(path.read_text())
        result = ReferenceResult.from_json(record)
        energy = None if result.energy is None else float(result.energy)
        if self.store.add_result(idx, result.status, energy, result.n_steps, result.message):
            if result.atoms is not None:
                from ase.db import connect

                with connect(self.paths.relaxed) as db:
                    db.write(result.atoms, name=str(self.names[idx]), pool_index=int(idx),
                             status=result.status)

    def run_reference_jobs(self, batch: list[int], iteration: int) -> None:
        """Send every job of the batch without a result, collect results as they land, re-send lost jobs."""
        from graceq import tasks

        rt = self.settings.runtime
        self.lock.set_stage(f"iteration {iteration}: reference jobs")
        done = self.store.results()
        pending = [i for i in batch if i not in done]
        outputs = {i: self.paths.result(i) for i in pending}
        already = {i: p for i, p in outputs.items() if p.exists()}
        for i, p in already.items():
            self._ingest(i, p)
            del outputs[i]
        jobs = self.store.jobs()
        scheduler = self._batch_engine()
        for i in outputs:
            if scheduler is not None and (self.paths.job_dir(i) / "slurm.json").exists():
                continue  # submitted to the batch scheduler already: polled below, never sent again
            # first send, or a resumed campaign: a duplicate is harmless (the worker sees the result
            # or the live lease and returns), a lost message is not
            lease = tasks.Lease(self.paths.job_dir(i) / "lease.json", rt.lease_timeout)
            if i not in jobs or not lease.is_fresh():
                self._send_reference(i, iteration, count=i not in jobs)

        def resend_lost(missing: dict) -> None:
            from graceq.engines import ReferenceResult
            from graceq.store import atomic_write_json

            if scheduler is not None:
                missing = self._poll_batch_jobs(scheduler, missing)
            jobs = self.store.jobs()
            for i in missing:
                _, sent_at, attempts = jobs[i]
                try:
                    beat = (self.paths.job_dir(i) / "lease.json").stat().st_mtime
                except FileNotFoundError:
                    beat = None
                if not job_is_lost(beat, sent_at, time.time(), rt.lease_timeout, rt.resend_unstarted_after):
                    continue
                if attempts >= rt.max_attempts:  # a job that kills its worker must not loop for ever
                    lost = ReferenceResult(str(self.names[i]), "failed", None, None,
                                           message=f"lost its worker {attempts} times")
                    atomic_write_json(self.paths.result(i), dict(lost.to_json(), idx=int(i)))
                else:
                    self._say(f"job {self.names[i]} lost its worker; sending it again")
                    self._send_reference(i, iteration)

        self._wait_files(outputs, "reference jobs", on_ready=self._ingest, on_idle=resend_lost)

    def _batch_engine(self):
        """The campaign's engine when it is a batch scheduler (slurm: submit, then poll), else None."""
        if self.settings.engine.engine != "slurm":
            return None
        from graceq.engines import make_engine

        return make_engine(self.settings.engine.model_dump(), self.settings.campaign.unit, None)

    def _poll_batch_jobs(self, engine, missing: dict) -> dict:
        """Write the result file of every submitted job that ended; returns the jobs not yet submitted.

        A submitted job belongs to the scheduler: the engine resubmits one that vanished without a
        result (up to its limit) and reports it failed after that, so the lease logic below is only
        for jobs whose Celery task has not submitted them yet.
        """
        from graceq.store import atomic_write_json

        submitted = {i: self.paths.job_dir(i) for i in missing if (self.paths.job_dir(i) / "slurm.json").exists()}
        if submitted:
            answers = engine.poll_many(list(submitted.values()))
            for i, workdir in submitted.items():
                result = answers[workdir.resolve()]
                if result is not None:  # the job's own record (compute host, SLURM job id), else the engine's
                    raw = workdir / "result.json"
                    record = json.loads(raw.read_text()) if raw.exists() else result.to_json()
                    record["idx"] = int(i)
                    atomic_write_json(self.paths.result(i), record)
        return {i: p for i, p in missing.items() if i not in submitted}

    def _send_reference(self, idx: int, iteration: int, count: bool = True) -> None:
        """Send job idx; `count` is False for a resumed campaign's re-send (not a new attempt)."""
        from graceq import tasks

        task_id = tasks.reference_task_id(self.campaign_id, iteration, idx)
        self.store.record_sent(idx, task_id, count=count)
        self._send(tasks.run_reference, [str(self.paths.root), int(idx), str(self.names[idx])], task_id)

    def fit_committee(self, view: cp.CampaignView, features: np.ndarray, iteration: int):
        """Fit the iteration's committee through `fit` tasks and calibrate it on the held-out rows."""
        from graceq import tasks
        from graceq.model import CommitteeRidge

        self.lock.set_stage(f"iteration {iteration}: fitting the committee")
        plan = cp.plan_committee(view, self.settings.model, self.settings.campaign.seed, iteration)
        folder = self.paths.iteration(iteration)
        if not (folder / "train.npz").exists():
            atomic_save_npz(folder / "train.npz", rows=plan.train_rows, y=plan.y_train,
                            test_rows=plan.test_rows, y_test=plan.y_test, subsets=plan.subsets)
        prefix = f"graceq-{self.campaign_id}-it{iteration:04d}"
        lam_path = folder / "lambda.json"
        if not lam_path.exists():
            self._send(tasks.select_lambda, [str(self.paths.root), iteration], f"{prefix}-lambda")
            self._wait_files({"lambda": lam_path}, f"iteration {iteration}: choosing lambda")
        alpha = json.loads(lam_path.read_text())["alpha"]
        m = self.settings.model.n_members
        step = self.settings.model.members_per_task
        spans = [(a, min(a + step, m)) for a in range(0, m, step)]
        outputs = {span: self.paths.members(iteration, *span) for span in spans}
        for (a, b), path in outputs.items():
            if not path.exists():
                self._send(tasks.fit_committee, [str(self.paths.root), iteration, a, b, alpha],
                           f"{prefix}-members-{a:04d}-{b:04d}")
        self._wait_files(outputs, f"iteration {iteration}: fitting {m} members")
        parts = [np.load(outputs[s]) for s in spans]
        model = CommitteeRidge.from_members(
            features[plan.train_rows], plan.y_train, alpha, plan.subsets,
            np.concatenate([p["coef"] for p in parts]), np.concatenate([p["intercept"] for p in parts]),
            **plan.params,
        )
        return model.calibrate(features[plan.test_rows], plan.y_test)

    # -- the loop --
    def run(self) -> dict:
        """Run the campaign to its end (or max_iterations more iterations); returns the summary."""
        from graceq import app as app_module
        from graceq.report import write_summary

        self.lock.acquire()  # raises CampaignLocked while another coordinator runs this campaign
        if self.broker_url:
            mode = app_module.configure(broker_url=self.broker_url)
        else:
            mode = app_module.configure(embedded_dir=self.paths.broker)
        self._say(f"graceq: campaign {self.paths.root} ({mode} broker: {app_module.redact(self.broker_url)})")
        if mode == "embedded":
            self.workers = EmbeddedWorkers(self.paths, self.settings.runtime.workers).__enter__()
        try:
            return self._loop(write_summary)
        finally:
            if self.workers is not None:
                self.workers.__exit__(None, None, None)
                self.workers = None
            self.lock.release()

    def _loop(self, write_summary) -> dict:
        if (resumed := self.store.last_pick_iteration()) is not None:
            self._say(f"resuming at iteration {resumed} ({len(self.store.results())} reference results stored)")
        features = self.ensure_features()
        c = self.settings.campaign
        if self.store.last_pick_iteration() is None:
            first = cp.initial_batch(features, cp.per_molecule(self.energy_ff, self.n_atoms, self.apm), c.n_init)
            with self.store.transaction() as db:
                self.store.add_picks(db, 0, first.tolist())
        elif not self.store.iterations() and len(self.store.picks()) < c.n_init:
            # n_init raised before the first fit (`graceq run --n-init`): farthest point sampling is greedy,
            # so the larger batch starts with the picks made and goes on as a campaign started with it would
            first, made = cp.initial_batch(features, cp.per_molecule(self.energy_ff, self.n_atoms, self.apm),
                                           c.n_init).tolist(), [idx for idx, _ in self.store.picks()]
            with self.store.transaction() as db:
                db.executemany("INSERT INTO picks(idx, iteration, rank) VALUES (?, 0, ?)",
                               [(i, rank) for rank, i in enumerate(first) if i not in made])
        done = 0
        while True:
            iteration = self.store.last_pick_iteration()
            finished = {it["iteration"]: it for it in self.store.iterations()}
            results = self.store.results()  # picks of decided iterations without one: undone by `graceq retry`
            retried = [idx for idx, it in self.store.picks()
                       if idx not in results and (it < iteration or iteration in finished)]
            if iteration in finished and not retried and cp.stop_holds(finished[iteration], self.settings,
                                                                       len(self.names)):
                self._say(f"iteration {iteration} stopped earlier ({finished[iteration]['stop']}): nothing to do")
                break  # a stop that the current settings keep; a lifted one re-decides this iteration
            batch = [idx for idx, it in self.store.picks() if it == iteration and idx not in retried] + retried
            self.run_reference_jobs(batch, iteration)
            view = self.view()
            model = self.fit_committee(view, features, iteration)
            self.lock.set_stage(f"iteration {iteration}: selecting the next batch")
            decision = cp.decide(view, model, features, self.settings, iteration)
            atomic_save_npz(self.paths.iteration(iteration) / "predictions.npz", mu=decision.mu,
                            sigma=decision.sigma, ei=decision.ei, picks=decision.picks, pick_ei=decision.pick_ei)
            with self.store.transaction() as db:
                self.store.add_iteration(db, iteration, decision.stats)
                if len(decision.picks):
                    self.store.add_picks(db, iteration + 1, decision.picks.tolist(), decision.pick_ei,
                                         decision.mu[decision.picks], decision.sigma[decision.picks])
            s = decision.stats
            self._say(
                f"iteration {iteration:3d}: {s['n_reference_calls']:4d} reference calls, "
                f"best {s['best']:.3f} {c.unit}/molecule, "
                f"p_conv {s['p_conv']:.3f}, residual {s['residual']:.2f}, test RMSE {s['test_rmse']:.3f} "
                f"{c.unit}/molecule, lambda {s['lambda']:.1e}, alpha {s['alpha']:.2f}"
                + (f" -> stop: {s['stop']}" if s["stop"] else f" -> {s['n_next']} next")
            )
            write_summary(self.paths.root)
            done += 1
            if decision.stop or (self.max_iterations is not None and done >= self.max_iterations):
                break
        return write_summary(self.paths.root)
