"""The coordinator: runs a campaign as a few named reactions over the task server.

It is the single writer of the campaign's state, and the thinker of Colmena's split: it decides
what runs and records what came back; ``graceq.dispatcher`` (the task server) sends the tasks,
watches leases, re-sends lost tasks and polls engines that run jobs out of band. The reactions:

- result arrived -> ``on_result``: record it once in the store, with its relaxed structure;
- refit due -> ``fit_committee``: lambda by CV and the committee members through ``fit`` tasks,
  calibrated on the held-out rows;
- slots free -> ``decide`` (``graceq.campaign.decide``: the stop check and the next picks, persisted
  with the iteration in one transaction) -> ``send_picks``;
- stop: ``decide`` says so (the same check in every mode).

In asynchronous mode no slot waits for the first committee: until n_init results are in (the
first fit), the free slots run the farthest-point sampling's continuation (``farthest_points_due``).

In synchronous rounds (``mode = "batch"``) a round sends its picks, collects every result, refits
and decides. A coordinator killed at any point resumes from the store and makes the same next
decision; a job whose worker died (its lease went stale) is sent again and resumes from its
checkpoint; duplicate deliveries are ignored by the workers and by the store.
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
from graceq import steering
from graceq.config import ConfigError, Settings, load_settings, write_settings
from graceq.dispatcher import Dispatcher, TaskError, TaskSpec, lease_files
from graceq.store import (CampaignPaths, CampaignStore, artifact_ok, atomic_save_npy, atomic_save_npz,
                          foreign_artifacts, load_artifact)
from graceq.lock import CoordinatorLock
from graceq.model import member_systems

__all__ = ["Coordinator", "EmbeddedWorkers", "TaskError", "init_campaign", "worker_command"]

log = logging.getLogger("graceq.coordinator")


# -- creating a campaign ------------------------------------------------------------------------
def init_campaign(settings: Settings, campaign_dir: str | Path, source: str = "settings") -> CampaignStore:
    """Validate the pool and the engine, then lay out a new campaign directory.

    Nothing is written until every input check has passed; an existing campaign is left alone
    (it is resumed, not re-initialised).
    """
    from graceq.engines import make_engine
    from graceq.features import species_of
    from graceq.pool import check_pool_fits_settings, read_pool, write_pool_notes
    from graceq.pooldb import write_pool_db

    paths = CampaignPaths(campaign_dir)
    if paths.state.exists() and CampaignStore(paths.root).n_structures() > 0:
        raise FileExistsError(f"{paths.root}: a campaign already exists here; `graceq run` resumes it")
    foreign = foreign_artifacts(paths)
    if foreign:  # another pool's features or models would be reused silently (and crash later)
        raise FileExistsError(
            f"{paths.root}: holds files of another campaign but no campaign state: {', '.join(foreign)}; "
            "they would be reused for this pool. Create the campaign in a new or empty directory, "
            "or remove them first"
        )
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


#: s that a message may wait in the embedded broker's queue while no task's lease beats before the
#: embedded worker counts as jammed and is started again: a billiard pool process SIGKILLed while
#: idle keeps its job pipe's lock, and the pool then takes no job for ever (benchmarks/README.md,
#: "Fault injection"). Above the beat period of any lease (lease_timeout / 6).
JAMMED_AFTER_S = 60.0


class EmbeddedWorkers:
    """Celery worker processes on this machine, consuming the campaign's folder broker."""

    def __init__(self, paths: CampaignPaths, processes: int, lease_timeout_s: float = 0.0):
        self.paths = paths
        self.processes = processes
        self.proc: subprocess.Popen | None = None
        self.jammed_after_s = max(JAMMED_AFTER_S, lease_timeout_s)
        self._started_at = self._looked_at = 0.0

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
        self._started_at = time.time()
        return self

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise TaskError(
                f"the embedded worker exited with code {self.proc.returncode}; "
                f"see {self.paths.broker / 'worker.log'}"
            )
        if self.proc is not None and self._jammed():
            log.warning("the embedded worker has taken no message for %.0f s while none of its tasks runs; "
                        "starting it again (see %s)", self.jammed_after_s, self.paths.broker / "worker.log")
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session (_die_with_parent): pool included
            self.proc.wait()
            self.__enter__()  # the tasks it held are lost; the dispatcher sends them again

    def _jammed(self) -> bool:
        """A message has waited in the queue folder longer than jammed_after_s, and no task lease
        of the campaign was beaten meanwhile (looked at every 5 s at most)."""
        now = time.time()
        if now - self._looked_at < 5.0 or now - self._started_at < self.jammed_after_s:
            return False
        self._looked_at = now
        ages = []
        for message in (self.paths.broker / "queue").glob("*.msg"):
            try:
                ages.append(now - message.stat().st_mtime)
            except FileNotFoundError:  # taken meanwhile
                pass
        if not ages or max(ages) < self.jammed_after_s:
            return False
        for lease in lease_files(self.paths.root):
            try:
                if now - lease.stat().st_mtime < self.jammed_after_s:
                    return False
            except FileNotFoundError:
                pass
        return True

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # warm shutdown: the worker finishes its tasks and stops its pool
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


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
        self.dispatcher: Dispatcher | None = None
        self._fits: dict = {}  # fit number -> Future of (calibrated committee, rows it saw) (async mode)
        self._executor = None
        self._span: steering.Span | None = None  # coordinates of the members' rows, grown per decision (async)
        self.lock = CoordinatorLock(self.paths.root)  # held while run() runs: one coordinator per campaign

    # -- settings of the asynchronous mode --
    @property
    def mode(self) -> str:
        return self.settings.campaign.mode

    @property
    def slots(self) -> int:
        return self.settings.campaign.slots

    @property
    def refit_every(self) -> int:
        return self.settings.campaign.refit_every or self.slots

    # -- plumbing --
    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=None if self.progress else True,  # None: bars on a TTY only
                    leave=False, dynamic_ncols=True, mininterval=0.5)

    def _say(self, message: str) -> None:
        log.info(message)
        tqdm.write(message)  # also with --quiet (no bars) and into a log file: these lines are the record

    # -- steps --
    def ensure_features(self) -> np.ndarray:
        """Fit the radial projection and featurize the pool in chunks (once per campaign); returns
        the delta model's inputs (``campaign.model_inputs``). The descriptor alone, in which the
        farthest-point sampling measures distances, is kept as ``self.descriptor`` (a view of them)."""
        from graceq import tasks

        if not artifact_ok(self.paths.features):  # a corrupt artifact is moved aside and recomputed
            self.lock.set_stage("featurizing the pool")
            d = self.settings.descriptor
            n = len(self.names)
            root = str(self.paths.root)
            if not artifact_ok(self.paths.projection):
                rng = np.random.default_rng(self.settings.campaign.seed)
                sample = np.sort(rng.choice(n, size=min(d.fit_sample, n), replace=False)).tolist()
                self.dispatcher.run([TaskSpec(tasks.fit_projection, [root, sample, self.store.get_meta("species")],
                                              f"graceq-{self.campaign_id}-projection", self.paths.projection)],
                                    "fitting the radial compression")
            chunks = [(k, start, min(start + d.chunk_size, n)) for k, start in enumerate(range(0, n, d.chunk_size))]
            specs = [TaskSpec(tasks.featurize, [root, k, a, b], f"graceq-{self.campaign_id}-featurize-{k:05d}",
                              self.paths.feature_chunk(k)) for k, a, b in chunks]
            with self._bar(len(specs), "featurizing the pool") as bar:
                self.dispatcher.run(specs, "featurizing the pool", bar)
            features = np.concatenate([load_artifact(spec.output) for spec in specs])
            atomic_save_npy(self.paths.features, features)
        features = load_artifact(self.paths.features)
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if len(bad):  # checked once here, so that the decisions need not check the pool again
            names = ", ".join(self.names[i] for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise ValueError(f"{self.paths.features}: {len(bad)} structures have features that are not finite "
                             f"numbers (NaN or infinite): {names}. Look at those structures in the pool, "
                             f"fix or remove them, and delete this file to featurize again.")
        inputs = cp.model_inputs(features, cp.per_molecule(self.energy_ff, self.n_atoms, self.apm), self.settings.model)
        self.descriptor = inputs[:, :features.shape[1]]
        return inputs

    def view(self) -> cp.CampaignView:
        return cp.CampaignView(
            n_atoms=self.n_atoms, energy_ff=self.energy_ff, atoms_per_molecule=self.apm,
            picks=[idx for idx, _ in self.store.picks()], results=self.store.results(),
            predictions=cp.prospective_predictions(self.store.pick_table(), self.store.iterations()),
        )

    # -- reactions --
    def on_result(self, idx: int, record: dict) -> bool:
        """A result arrived: record it (once) with its relaxed structure; False for a duplicate."""
        from graceq.engines import ReferenceResult

        result = ReferenceResult.from_json(record)
        energy = None if result.energy is None else float(result.energy)
        with self.store.transaction():  # the result and its place in the arrival order, together
            if not self.store.add_result(idx, result.status, energy, result.n_steps, result.message):
                return False
            self.store.add_arrival(idx)
        if result.atoms is not None:
            from ase.db import connect

            with connect(self.paths.relaxed) as db:
                db.write(result.atoms, name=str(self.names[idx]), pool_index=int(idx), status=result.status)
        return True

    def send_picks(self, picks: list[int]) -> None:
        """Slots free: send every pick without a result (a resumed campaign's jobs are taken over)."""
        done = self.store.results()
        jobs = self.store.jobs()
        pending = [i for i in picks if i not in done]
        self.dispatcher.track([i for i in pending if i in jobs])
        for i in pending:
            if i not in jobs:
                self.dispatcher.send(i)

    def collect(self) -> None:
        """Record every result of the jobs in flight as it lands (result -> store)."""
        with self._bar(len(self.dispatcher.in_flight), "reference jobs") as bar:
            for idx, record in self.dispatcher.results(bar):
                self.on_result(idx, record)

    def fit_committee(self, view: cp.CampaignView, features: np.ndarray, iteration: int):
        """Refit due: fit the iteration's committee through `fit` tasks and calibrate it on the held-out rows."""
        from graceq import tasks

        self.lock.set_stage(f"iteration {iteration}: fitting the committee")
        plan = cp.plan_committee(view, self.settings.model, self.settings.campaign.seed, iteration)
        folder = self.paths.iteration(iteration)
        extra = features[plan.train_rows, self.descriptor.shape[1]:]  # campaign.model_inputs beyond the descriptor
        train = folder / "train.npz"
        keys = ("rows", "y", "test_rows", "y_test", "subsets", "inputs_beyond_descriptor")
        if artifact_ok(train, keys) and np.load(train)["inputs_beyond_descriptor"].shape[1] != extra.shape[1]:
            # [model] force_field_feature was changed since this iteration's fit began: its fits are stale
            for stale in [train, folder / "lambda.json", *folder.glob("members_*.npz")]:
                stale.unlink(missing_ok=True)
        if not artifact_ok(train, keys):
            atomic_save_npz(train, rows=plan.train_rows, y=plan.y_train, test_rows=plan.test_rows,
                            y_test=plan.y_test, subsets=plan.subsets, inputs_beyond_descriptor=extra)
        prefix = f"graceq-{self.campaign_id}-it{iteration:04d}"
        root = str(self.paths.root)
        lam_path = folder / "lambda.json"
        self.dispatcher.run([TaskSpec(tasks.select_lambda, [root, iteration], f"{prefix}-lambda", lam_path)],
                            f"iteration {iteration}: choosing lambda")
        ridge_lambda = load_artifact(lam_path, ("ridge_lambda",))["ridge_lambda"]
        m = self.settings.model.n_members
        step = self.settings.model.members_per_task
        specs = [TaskSpec(tasks.fit_committee, [root, iteration, a, min(a + step, m), ridge_lambda],
                          f"{prefix}-members-{a:04d}-{min(a + step, m):04d}",
                          self.paths.members(iteration, a, min(a + step, m))) for a in range(0, m, step)]
        with self._bar(len(specs), f"iteration {iteration}: fitting {m} members") as bar:
            self.dispatcher.run(specs, f"iteration {iteration}: fitting {m} members", bar)
        parts = [load_artifact(spec.output, ("coef", "intercept")) for spec in specs]
        return cp.assemble_committee(plan, features, ridge_lambda, np.concatenate([p["coef"] for p in parts]),
                                     np.concatenate([p["intercept"] for p in parts]))

    def decide(self, features: np.ndarray, model, iteration: int) -> cp.Decision:
        """Pick: the convergence check and the next picks; persisted with the iteration in one transaction."""
        decision = cp.decide(self.view(), model, features, self.settings, iteration)
        atomic_save_npz(self.paths.iteration(iteration) / "predictions.npz", mu=decision.mu,
                        sigma=decision.sigma, ei=decision.ei, picks=decision.picks, pick_ei=decision.pick_ei)
        with self.store.transaction() as db:
            self.store.add_iteration(db, iteration, decision.stats.to_json())
            if len(decision.picks):
                self.store.add_picks(db, iteration + 1, decision.picks.tolist(), decision.pick_ei,
                                     decision.mu[decision.picks], decision.sigma[decision.picks])
        s = decision.stats
        unit = self.settings.campaign.unit
        risk = "-" if not np.isfinite(s.risk) else f"{s.risk:.3g}"
        self._say(
            f"iteration {iteration:3d}: {s.n_reference_calls:4d} reference calls, best {s.best:.3f} "
            f"{unit}/molecule, stated risk {risk}, p_conv {s.p_conv:.3f}, test RMSE {s.test_rmse:.3f} "
            f"{unit}/molecule, ridge lambda {s.ridge_lambda:.1e}, calibration {s.calibration:.2f}"
            + (f" -> stop: {s.stop}" if s.stop else f" -> {s.n_next} next")
            + (f" ({s.n_trimmed} fewer than a batch: all the stop needs if they come back as predicted)"
               if s.n_trimmed and not s.stop else "")
        )
        return decision

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
            self.workers = EmbeddedWorkers(self.paths, self.settings.runtime.workers,
                                           self.settings.runtime.lease_timeout).__enter__()
        self.dispatcher = Dispatcher(self.paths, self.store, self.settings, self.campaign_id, self.names,
                                     check_workers=self.workers.check if self.workers else None, say=self._say)
        try:
            if self.mode == "async":
                return self._async_loop(write_summary)
            return self._loop(write_summary)
        finally:
            self.dispatcher.close()
            if self.workers is not None:
                self.workers.__exit__(None, None, None)
                self.workers = None
            self.lock.release()

    def pick_initial_batch(self) -> None:
        """The farthest-point initial batch, once per campaign (both modes start with it)."""
        if self.store.last_pick_iteration() is None:
            first = cp.initial_batch(self.descriptor, cp.per_molecule(self.energy_ff, self.n_atoms, self.apm),
                                     self.settings.campaign.n_init)
            with self.store.transaction() as db:
                self.store.add_picks(db, 0, first.tolist())

    def _loop(self, write_summary) -> dict:
        """Synchronous rounds (mode "batch"): send the batch, collect it, refit, decide, repeat."""
        if (resumed := self.store.last_pick_iteration()) is not None:
            self._say(f"resuming at iteration {resumed} ({len(self.store.results())} reference results stored)")
        features = self.ensure_features()
        c = self.settings.campaign
        self.pick_initial_batch()
        if not self.store.iterations() and len(self.store.picks()) < c.n_init:
            # n_init raised before the first fit (`graceq run --n-init`): farthest point sampling is greedy,
            # so the larger batch starts with the picks made and goes on as a campaign started with it would
            first, made = cp.initial_batch(self.descriptor, cp.per_molecule(self.energy_ff, self.n_atoms, self.apm),
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
            self.lock.set_stage(f"iteration {iteration}: reference jobs")
            self.send_picks([idx for idx, it in self.store.picks() if it == iteration and idx not in retried] + retried)
            self.collect()
            model = self.fit_committee(self.view(), features, iteration)
            self.lock.set_stage(f"iteration {iteration}: selecting the next batch")
            decision = self.decide(features, model, iteration)
            write_summary(self.paths.root)
            done += 1
            if decision.stop or (self.max_iterations is not None and done >= self.max_iterations):
                break
        return write_summary(self.paths.root)

    # -- asynchronous mode --
    def prefix_view(self, n: int) -> cp.CampaignView:
        """What the campaign knew right after its n-th recorded result: the first n arrivals, and
        the picks of the initial batch and of decisions 1..n-1 (decision n is made on this)."""
        arrived = set(self.store.arrivals()[:n])
        results = {i: r for i, r in self.store.results().items() if i in arrived}
        return cp.CampaignView(
            n_atoms=self.n_atoms, energy_ff=self.energy_ff, atoms_per_molecule=self.apm,
            picks=[idx for idx, it in self.store.picks() if it < n], results=results,
            predictions=cp.prospective_predictions(
                [row for row in self.store.pick_table() if row[1] < n], self.store.iterations(), lag=0),
        )

    def _n_initial(self) -> int:
        """n0: the arrivals the first fit is trained on (the initial batch; the farthest points sent
        on free slots before that fit are stored with it, under iteration 0, and are not counted)."""
        return min(sum(1 for _, it in self.store.picks() if it == 0), self.settings.campaign.n_init)

    def farthest_points_due(self, n_arrived: int) -> list[int]:
        """Slots free before the first fit -> the farthest-point sampling's next picks
        (``steering.farthest_points_due``), stored under iteration 0 after the initial batch; returns them."""
        c = self.settings.campaign
        made = [idx for idx, it in self.store.picks() if it == 0]
        due = steering.farthest_points_due(c.n_init, self.slots, n_arrived, len(self.names), c.budget)
        if len(made) >= due:
            return []
        sampled = cp.initial_batch(self.descriptor, cp.per_molecule(self.energy_ff, self.n_atoms, self.apm), due).tolist()
        made_set = set(made)
        new = [i for i in sampled if i not in made_set]
        with self.store.transaction() as db:
            self.store.add_picks(db, 0, new, first_rank=len(made))
        return new

    def fit_schedule(self, n: int) -> int:
        """The fit that decision n uses: fit r is trained on the first n0 + r * refit_every arrivals
        and used from refit_every arrivals later on (fit 0 at once), so that a refit never holds
        the slots and every decision depends on the arrival order only, never on timing."""
        n0, k = self._n_initial(), self.refit_every
        return 0 if n < n0 + 2 * k else (n - n0 - k) // k

    def _fit_arrivals(self, r: int) -> int:
        return self._n_initial() + r * self.refit_every

    def _launch_fit(self, r: int, features: np.ndarray):
        """Refit due: fit r through the fit queue in the background (lambda, members, calibration)."""
        if r not in self._fits:
            from concurrent.futures import ThreadPoolExecutor

            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graceq-fit")
            view = self.prefix_view(self._fit_arrivals(r))
            self._fits[r] = self._executor.submit(self._fit_with_rows, view, features, r)
        return self._fits[r]

    def _fit_with_rows(self, view: cp.CampaignView, features: np.ndarray, r: int):
        """Fit r's calibrated committee and the pool rows it saw (train and test), from one view."""
        model = self.fit_committee(view, features, r)
        member_systems(model)  # factorised here, off the decisions' path: they border it with the rows since
        plan = cp.plan_committee(view, self.settings.model, self.settings.campaign.seed, r)
        return model, np.concatenate([plan.train_rows, plan.test_rows])

    def _model_for(self, n: int, features: np.ndarray):
        """The fitted committee that decision n uses and the rows it saw (waits only if the fit is late)."""
        r = self.fit_schedule(n)
        for old in [k for k in self._fits if k < r]:  # decisions only go forward: an older fit (and the member
            del self._fits[old]                        # systems it keeps, 0.3 GB at 1,000 labelled) is not used again
        return self._launch_fit(r, features).result()

    def decide_on_arrival(self, n: int, features: np.ndarray, persist: bool = True) -> cp.Decision:
        """Slots free -> pick: the decision after the n-th arrival (believing the jobs in flight)."""
        view = self.prefix_view(n)
        model, fitted_rows = self._model_for(n, features)
        pending = [i for i in view.picks if i not in view.results]
        if self._span is None or self._span.features is not features:
            self._span = steering.Span(features)
        decision = steering.decide_on_arrival(view, model, features, self.settings, n, fitted_rows, pending,
                                              self.slots - len(pending), span=self._span)
        if persist:
            with self.store.transaction() as db:
                self.store.add_iteration(db, n, decision.stats.to_json())
                if len(decision.picks):
                    self.store.add_picks(db, n, decision.picks.tolist(), decision.pick_ei,
                                         decision.mu[decision.picks], decision.sigma[decision.picks])
            s = decision.stats
            log.info("arrival %d: %d pending, stated risk %.3g, %d sent%s", n, s.n_pending, s.risk,
                     len(decision.picks), f", stop: {decision.stop}" if decision.stop else "")
        return decision

    def replay_decisions(self) -> dict[int, list[int]]:
        """Every recorded decision made again from the arrival log: {decision: picks} (for checks)."""
        from graceq import app as app_module

        own = self.dispatcher is None
        if own:  # the fits are on disk: nothing is sent
            app_module.configure(embedded_dir=self.paths.broker)
            self.dispatcher = Dispatcher(self.paths, self.store, self.settings, self.campaign_id, self.names)
        try:
            features = self.ensure_features()
            return {it["iteration"]: self.decide_on_arrival(it["iteration"], features, persist=False).picks.tolist()
                    for it in self.store.iterations()}
        finally:
            if own:  # its doorbell, if it rang one up, stops listening
                self.dispatcher.close()
                self.dispatcher = None

    def _async_loop(self, write_summary) -> dict:
        """Asynchronous mode: keep `slots` jobs in flight; decide after every arrival.

        With ``max_iterations``, an iteration is ``refit_every`` decisions (the arrivals one refit of
        the committee spans): after that many decisions this run sends nothing more, waits for the
        jobs in flight and records them; `graceq run` again makes the decisions of the arrivals that
        came in meanwhile, from the arrival log, and goes on.
        """
        features = self.ensure_features()
        self.pick_initial_batch()
        n0 = self._n_initial()
        n = len(self.store.arrivals())
        if n < n0:  # no model yet: the free slots run farthest points (after the first fit, never again,
            self.farthest_points_due(n)  # even if a resumed run has more slots)
        self.send_picks([idx for idx, _ in self.store.picks()])  # a resumed campaign's jobs are taken over
        decided = {it["iteration"]: it for it in self.store.iterations()}
        stopped = any(it.get("stop") for it in decided.values())
        limit = None if self.max_iterations is None else self.max_iterations * self.refit_every
        made = 0  # decisions made by this run

        def react(m: int) -> bool:
            """Decide after arrival m unless the campaign stopped or this run made its decisions."""
            nonlocal made
            if stopped or (limit is not None and made >= limit):
                return stopped
            made += 1
            stop = self._react(m, features)
            if limit is not None and made >= limit and stop is None:
                self._say(f"arrival {m}: {self.max_iterations} iterations of {self.refit_every} decisions made; "
                          f"waiting for {len(self.dispatcher.in_flight)} running jobs (`graceq run` goes on)")
            return stop is not None

        if stopped and self.dispatcher.in_flight:  # killed after its stop: cancel (or wait) as it would have
            last = max(m for m, it in decided.items() if it.get("stop"))
            self.stop_running(last, decided[last]["stop"])
        if n >= n0 and n >= self._fit_arrivals(self.fit_schedule(n) + 1):  # a refit that fell due before a kill
            self._launch_fit(self.fit_schedule(n) + 1, features)
        for m in range(n0, n + 1):  # a coordinator killed between a result and its decision
            if m not in decided:
                stopped = react(m)
        try:
            while self.dispatcher.in_flight:
                landed = self.dispatcher.arrivals()
                if landed:
                    self.dispatcher.progressed()
                else:
                    self.dispatcher.idle(("dft",))
                for idx, record in landed:  # result -> store; slots free -> pick -> send
                    if not self.on_result(idx, record):
                        continue
                    n += 1
                    if n >= n0:
                        stopped = react(n)
                    else:  # before the first fit: the next farthest point
                        self.send_picks(self.farthest_points_due(n))
            if stopped:
                self.assess_after_stop(n, features)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
        return write_summary(self.paths.root)

    def assess_after_stop(self, n: int, features: np.ndarray) -> None:
        """The last statement of a campaign that stopped on its budget or an exhausted pool, made
        with every result in (decision n, the last arrival's; it sends nothing: the budget or the
        pool allows no pick).

        Such a stop is decided when the last job is sent, and the coordinator then waits for the
        jobs still running: their results came after the stop's statement, which counted them as
        unmeasured. A chemist reads the campaign's risk once every result is in (as batch mode
        states it after its last round). A stop by the rule cancels the running jobs, or, without
        ``cancel_on_stop``, keeps its statement: it already held without them.
        """
        last = self.store.iterations()[-1]  # in iteration order
        if last["iteration"] < n and last.get("stop") in ("budget", "pool exhausted"):
            c = self.settings.campaign
            statement = cp.risk_statement(self.decide_on_arrival(n, features).stats.to_json(), c.risk, c.unit)
            self._say(f"arrival {n}: every running job has landed; {statement}")

    def _react(self, n: int, features: np.ndarray) -> str | None:
        """Decide after arrival n, send the picks, launch the refit that falls due; returns the stop.

        The refit is launched once the picks are sent: decision n never uses it (it is used
        refit_every arrivals later), and started before, its thread competes with this decision for
        the interpreter while the slot that arrival freed waits (2-3 times slower decisions measured).
        """
        decision = self.decide_on_arrival(n, features)
        self.send_picks(decision.picks.tolist())
        if n == self._fit_arrivals(self.fit_schedule(n) + 1):  # refit due: trained now, used later
            self._launch_fit(self.fit_schedule(n) + 1, features)
        if decision.stop:
            self.stop_running(n, decision.stop)
        return decision.stop

    def stop_running(self, n: int, stop: str) -> None:
        """Stop: the jobs still running are cancelled (``cancel_on_stop``, when the stopping rule fired)
        or waited for; either way each one's result is recorded as it lands (a cancelled job's is a
        failed result saying so)."""
        running = len(self.dispatcher.in_flight)
        if stop == "converged" and self.settings.campaign.cancel_on_stop and running:
            cancelled = self.dispatcher.cancel(f"cancelled: the campaign stopped (arrival {n}: {stop}; cancel_on_stop)")
            self._say(f"arrival {n}: stop: {stop}; cancelled {len(cancelled)} of {running} running jobs"
                      + (f" (the other {running - len(cancelled)} had ended or are held by the engine's scheduler)"
                         if len(cancelled) < running else ""))
        else:
            self._say(f"arrival {n}: stop: {stop}; waiting for {running} running jobs")
