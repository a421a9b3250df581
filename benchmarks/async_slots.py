"""Synchronous rounds against asynchronous steering, on replayed landscapes with heavy-tailed jobs.

    python benchmarks/async_slots.py [--json] [--slots 8 32 128] [--pools roy264 benzamide synthetic]
                                     [--synthetic-n 3000]
                                     [--members 256] [--seed 0] [--skip-100k]
                                     [--skip-celery | --celery-only] [--celery-medians 0.5 1 2]
                                     [--celery-members 64] [--plot PNG]
    python benchmarks/async_slots.py --from-json OUT.json --plot PNG    # redraw a saved output

An in-process discrete-event simulation on the replay engine's answers. Each structure's reference
job takes a duration drawn once from a log-normal (median 1 h, sigma 1; seeded), the same in both
modes. With N slots:

- ``sync`` (mode "batch", the seed's recipe, batch width N): send a batch, wait for its slowest
  job, refit, pick the next N by Kriging-Believer (``graceq.campaign.decide``);
- ``async`` (mode "async", ``slots`` N, ``refit_every`` N): keep N jobs in flight; after every
  arrival, ``graceq.steering.decide_on_arrival`` (the coordinator's function) fills the free slots
  with the pending jobs believed at their predicted means; fit r is trained on the first
  n_init + r N arrivals and used from N arrivals later (the coordinator's schedule). Before the
  first fit no slot waits: the slots the initial batch leaves free run the farthest-point
  sampling's continuation, and each arrival before that fit sends the next farthest point
  (``graceq.steering.farthest_points_due``, as the coordinator).

Both start from the same farthest-point initial batch (n_init 20) and run as the campaign runs
(its default stopping rule, evaluated as the coordinator does: after every round, after every
arrival; in async mode no new job is sent while the committee that believes the running jobs would
stop) until it stops, and on to full recall (every structure within the window of the true
minimum measured) with a rule that never fires if the stop came first. Figures per run:
``wall_h_to_full_recall`` (simulated hours until the last window structure's result arrived),
``calls_to_full_recall`` (jobs sent by then, running ones included), ``utilisation`` (busy
slot-hours / slot-hours until then); ``wall_h_at_stop``, ``calls_at_stop`` and
``utilisation_at_stop`` (the issue's definition: busy slot-hours / slot-hours until the stop, the
jobs running then counted up to the stop: when the rule holds, the campaign has its answer, and
``cancel_on_stop`` cancels them; a stop on the budget or the pool, "budget" or "pool exhausted",
ends when its last running job lands, since the campaign's answer needs their results and the
coordinator waits for them: until 2026-12-07 the simulation ended such a run when its last job
was sent, and counted the slots busy until then), ``stop`` (the
decision's: "converged" when the rule held, "budget" or "pool exhausted"), ``idle_at_stop``
(the idle share of the slot-hours until the stop by cause: ``round``, slots waiting for a round's
slowest job; ``nothing_left``, every structure sent or the budget reached; ``paused``, async
sending nothing because the committee that believes the running jobs would stop). Per run,
``utilisation_ceiling_whole_pool``: the most any schedule can reach measuring the whole pool with
these durations (``whole_pool_ceiling``; binding where the stop needs the whole pool). Fitting and
deciding cost no simulated time; their real cost is measured separately as
``decision_s_per_arrival_100k``: one arrival decision on a 100,000-structure pool with 1,000
labelled and N - 1 jobs pending (synthetic features of the bundled pool's width).

The simulated campaigns work in the pool's own coordinates (``pool_coordinates``: a rotation onto
the span of its features, which changes no dot product, so no member, prediction or pick): the
same figures at a fraction of the arithmetic. ``--pools synthetic``: the 3,000-structure landscape of
``benchmarks/synthetic.py`` (window 10 kJ/mol), a pool of CSP size, whose campaign stops long
before the pool runs out (the bundled pools are measured almost whole before an honest stop). ``celery``: one real async campaign through Celery
and Redis (``celery_run``: 2 workers holding 4 slots, the replay engine's job times drawn from
the same log-normal with a median of 0.5 s, 1 s and 2 s) against its simulation.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.resources
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402
from lognormal_engine import durations_h  # noqa: E402
from retro import campaign_features, fit_committee, load_pool, make_settings, save_figure  # noqa: E402

from graceq import campaign as cp  # noqa: E402
from graceq import steering  # noqa: E402

POOLS = {
    "roy264": ("roy264/roy264.extxyz", 5.0, "error"),
    "benzamide": ("benzamide/landscape.extxyz", 10.0, "skip"),
    # drawn, not read (benchmarks/synthetic.py): a pool of CSP size, --synthetic-n structures
    "synthetic": (None, 10.0, "error"),
}


class Simulation:
    """Slots, a clock in hours, and the jobs running on them."""

    def __init__(self, slots: int, hours: np.ndarray, n_initial: int):
        self.slots, self.hours, self.n_initial = slots, hours, n_initial
        self.clock = 0.0
        self.running: list[tuple[float, int]] = []  # (end time h, structure), a heap
        self.started: list[tuple[float, int]] = []  # (start time h, structure) of every job sent
        self.sent: list[int] = []
        self.n_arrived = 0
        self.initial_done_h: float | None = None    # when the n_initial-th result came back (the first fit)
        self.idle_h: dict[str, float] = {}          # idle slot-hours, by why the slots were idle
        self.why_idle = "round"                     # set by the runner after each decision

    def idle_why(self, n_pool: int, budget: int | None) -> str:
        """Why slots are idle now, in async mode: nothing left to send (every structure sent, or
        the budget), else the campaign sent nothing (the committee believing the running jobs
        would stop)."""
        return "nothing_left" if len(self.sent) >= min(n_pool, budget or n_pool) else "paused"

    def send(self, idx: int) -> None:
        assert len(self.running) < self.slots
        heapq.heappush(self.running, (self.clock + self.hours[idx], int(idx)))
        self.started.append((self.clock, int(idx)))
        self.sent.append(int(idx))

    def next_arrival(self) -> int:
        end = self.running[0][0]
        if len(self.running) < self.slots:
            self.idle_h[self.why_idle] = self.idle_h.get(self.why_idle, 0.0) + (self.slots - len(self.running)) * (end - self.clock)
        end, idx = heapq.heappop(self.running)
        self.clock = end
        self.n_arrived += 1
        if self.n_arrived == self.n_initial:
            self.initial_done_h = end
        return idx

    def timeline(self, window: set) -> list[list]:
        """Every job sent so far as [start h, end h, 1 if its structure lies in the window else 0]
        (what ``plot`` draws: busy slots and window structures found against wall hours); a job
        still running ends now (the run is over: ``cancel_on_stop`` cancels it)."""
        return [[round(t, 3), round(min(t + float(self.hours[i]), self.clock), 3), int(i in window)]
                for t, i in self.started]

    def utilisation(self, since_h: float = 0.0) -> float:
        """Busy slot-hours from ``since_h`` until now (running jobs count up to now) / slot-hours
        in that time."""
        busy = sum(max(0.0, min(self.clock, t + self.hours[i]) - max(since_h, t)) for t, i in self.started)
        return busy / (self.slots * (self.clock - since_h))


def whole_pool_ceiling(hours: np.ndarray, slots: int) -> float:
    """The highest utilisation any schedule can reach when it measures every structure of the pool
    on ``slots`` slots (durations ``hours``, in hours), even one that knew the durations.

    It sends nothing else (there is nothing else), so its busy slot-hours are ``W = sum(hours)``,
    and it cannot end before ``W / slots`` nor before its longest job: utilisation until its end
    <= ``W / (slots max(W / slots, max(hours)))``. With log-normal jobs (sigma 1) the longest of a
    few hundred is 10-40 median lengths, so on a small pool that every honest stop measures whole
    (ROY-264) the slots must drain for most of the campaign, whatever decides the picks.
    """
    hours = np.asarray(hours, dtype=np.float64)
    work = float(hours.sum())
    return work / (slots * max(work / slots, float(hours.max())))


def pool_coordinates(features: np.ndarray) -> np.ndarray:
    """The pool's features in an orthonormal basis of the space they span (n_pool coordinates
    instead of p = 3,750 when the pool is smaller than the descriptor).

    A rotation: every dot product between pool structures, hence every ridge member fitted on them
    (dual form, unpenalised intercept), its predictions, lambda's cross-validation, the
    calibration and every pick are those of the original features, up to round-off; only the
    products are n_pool / p times cheaper. (``decision_s_per_arrival_100k`` keeps the full width.)
    """
    if features.shape[0] >= features.shape[1]:
        return features
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    return u * s


def _view(pool, picks, arrived, predictions):
    """What the campaign knows: its picks, the results in, and each pick's prediction (mean, raw
    spread) made when it was picked, as the coordinator's picks table keeps them (the stop rule's
    prospective errors and p_window's forecasters come from them)."""
    arrived = set(arrived)
    return cp.CampaignView(n_atoms=pool.n_atoms, energy_ff=pool.energy_ff, atoms_per_molecule=pool.atoms_per_molecule,
                           picks=list(picks), results={i: pool.result(i) for i in arrived},
                           predictions={i: predictions[i] for i in picks if i in predictions})


def _remember(predictions: dict, decision) -> None:
    """Each pick's prediction as the coordinator stores it: mean, and the raw spread (sigma over
    the calibration of the record that decided it)."""
    spread = decision.sigma / decision.stats.calibration
    for i in decision.picks:
        predictions[int(i)] = (float(decision.mu[i]), float(spread[i]))


def _free_run(settings, n_batch):
    s = settings.model_copy(deep=True)
    s.campaign.stop_rule = "p_conv"  # a rule that never fires: the runs go on to full recall
    s.campaign.p_conv_target = np.inf
    s.campaign.n_batch = n_batch
    return s


def _figures(sim: Simulation, window: set, arrived: list) -> dict:
    after = sim.initial_done_h
    return {"wall_h_to_full_recall": round(sim.clock, 2), "calls_to_full_recall": len(sim.sent),
            "utilisation": round(sim.utilisation(), 4), "results_at_full_recall": len(arrived),
            # pick quality apart from the wait: jobs sent when the last window structure was sent
            # (the rest of calls_to_full_recall were sent while window jobs still ran)
            "calls_to_send_every_window_structure": 1 + max(sim.sent.index(i) for i in window) if window else 0,
            # where the time goes: until the first fit (sync: the whole initial batch; async: n_init results)
            "initial_batch_h": None if after is None else round(after, 2),
            "utilisation_after_initial_batch": None if after is None or after >= sim.clock
            else round(sim.utilisation(after), 4)}


def _at_stop(sim: Simulation, reason: str) -> dict:
    """Where the campaign stopped (``reason``: the decision's stop, "converged" when its rule held):
    its clock, the jobs sent, and the utilisation until then (the jobs still running count up to
    that moment: ``cancel_on_stop`` cancels them)."""
    return {"wall_h_at_stop": round(sim.clock, 2), "calls_at_stop": len(sim.sent),
            "utilisation_at_stop": round(sim.utilisation(), 4), "stop": reason,
            # the idle share until the stop, by cause (sums to 1 - utilisation_at_stop)
            "idle_at_stop": {why: round(h / (sim.slots * sim.clock), 4) for why, h in sorted(sim.idle_h.items())}}


def run_sync(pool, features, settings, slots, hours, window: set, descriptor) -> dict:
    """Synchronous rounds of width `slots`: each round waits for its slowest job. The campaign as
    it runs (its stopping rule) until the rule holds, then on to full recall with a rule that never
    fires, if the stop came first. ``features``: the model's inputs; ``descriptor``: what the
    farthest-point sampling measures distances in."""
    live = settings.model_copy(deep=True)
    live.campaign.n_batch = slots
    free = _free_run(settings, slots)
    queue = [int(i) for i in cp.initial_batch(descriptor, pool.energy_ff_mol, live.campaign.n_init)]
    sim = Simulation(slots, hours, len(queue))
    picks, arrived, iteration = list(queue), [], 0
    predictions: dict[int, tuple[float, float]] = {}
    full = stop = None
    while True:
        while queue or sim.running:  # one round: the batch on the slots, in waves if it is wider
            while queue and len(sim.running) < slots:
                sim.send(queue.pop(0))
            arrived.append(sim.next_arrival())
            if full is None and window <= set(arrived):
                full = _figures(sim, window, arrived)
        view = _view(pool, picks, arrived, predictions)
        model = fit_committee(view, features, free, iteration)
        decision = cp.decide(view, model, features, live if stop is None else free, iteration)
        if stop is None and decision.stop is not None:
            stop = _at_stop(sim, decision.stop)
            if full is None:  # an early stop: on to full recall
                decision = cp.decide(view, model, features, free, iteration)
        if full is not None and stop is not None:
            return full | stop | {"timeline": sim.timeline(window)}
        _remember(predictions, decision)
        iteration += 1
        queue = [int(i) for i in decision.picks]
        if not queue:
            raise RuntimeError("sync run stopped before full recall")
        picks += queue


def run_async(pool, features, settings, slots, hours, window: set | None, timings: list, descriptor) -> dict:
    """Asynchronous steering with `slots` jobs in flight and the coordinator's refit schedule.

    ``window`` None: the campaign's own settings (stop rule, budget) and figures when its last job
    is back (the simulation of the real Celery run); else the campaign as it runs (its rule; no new
    job is sent while the committee that believes the running ones would stop) until the rule holds,
    then on to full recall of ``window`` with a rule that never fires, if the stop came first.
    """
    free = _free_run(settings, slots)
    c = settings.campaign
    n0, k = min(c.n_init, len(pool)), c.refit_every or slots

    def farthest_points(n_arrived):  # no model yet: the free slots run farthest points (as the coordinator)
        due = steering.farthest_points_due(c.n_init, slots, n_arrived, len(pool), c.budget)
        return [int(i) for i in cp.initial_batch(descriptor, pool.energy_ff_mol, due)]

    initial = farthest_points(0)
    span = steering.Span(features)  # the coordinator's coordinates for its decisions
    sim = Simulation(slots, hours, n0)
    queue, picks, arrived = list(initial), list(initial), []
    fits: dict[int, tuple] = {}
    predictions: dict[int, tuple[float, float]] = {}
    stopped = False

    def fit(r):
        if r not in fits:
            view = _view(pool, picks_at[n0 + r * k], arrived[:n0 + r * k], predictions)
            plan = cp.plan_committee(view, settings.model, settings.campaign.seed, r)
            fits[r] = (fit_committee(view, features, settings, r), np.concatenate([plan.train_rows, plan.test_rows]))
        return fits[r]

    picks_at: dict[int, list] = {}

    def decide(now):
        """The coordinator's decision after the latest arrival, under ``now``'s settings."""
        n = len(arrived)
        r = 0 if n < n0 + 2 * k else (n - n0 - k) // k
        for old in [key for key in fits if key < r]:  # as the coordinator: an older fit is not used again
            del fits[old]
        model, fitted_rows = fit(r)
        view = _view(pool, picks, arrived, predictions)
        landed = set(arrived)
        pending = [i for i in picks if i not in landed]
        t = time.perf_counter()
        decision = steering.decide_on_arrival(view, model, features, now, n, fitted_rows, pending,
                                              slots - len(pending), span=span)
        timings.append(time.perf_counter() - t)
        return decision

    def follow(decision):
        """Keep the picks' predictions and queue the picks; whether the decision stops."""
        _remember(predictions, decision)
        queue.extend(int(i) for i in decision.picks)
        picks.extend(int(i) for i in decision.picks)
        return decision.stop is not None

    full = stop = None
    ending = None  # a stop on the budget or the pool: the campaign ends when its running jobs have landed
    while True:
        while queue and len(sim.running) < slots:
            sim.send(queue.pop(0))
        sim.why_idle = "before_first_fit" if len(arrived) < n0 else sim.idle_why(len(pool), c.budget)
        if ending is not None and not sim.running:  # its last running job has landed: the campaign ends
            stop, ending = _at_stop(sim, ending), None
            if full is not None:
                return full | stop | {"timeline": sim.timeline(window)}
            stopped = follow(decide(free))  # on to full recall, with a rule that never fires
            continue
        if not sim.running:
            if window is None:
                return _figures(sim, set(), arrived)
            raise RuntimeError("async run stopped before full recall")
        arrived.append(sim.next_arrival())
        n = len(arrived)
        picks_at[n] = list(picks)
        if window is not None and full is None and window <= set(arrived):
            full = _figures(sim, window, arrived)
        if full is not None and stop is not None:
            return full | stop | {"timeline": sim.timeline(window)}
        if n < n0:
            sent = set(picks)
            new = [i for i in farthest_points(n) if i not in sent]
            queue += new
            picks += new
            continue
        if stopped or ending is not None:
            continue
        decision = decide(settings if stop is None else free)
        if window is not None and stop is None and decision.stop is not None:
            if decision.stop != "converged":
                # budget or pool: the coordinator sends nothing more and waits for the running jobs,
                # whose results the campaign's answer needs: it ends when the last one lands
                ending = decision.stop
                continue
            # the rule holds: the campaign has its answer now (the running jobs are cancelled with
            # cancel_on_stop, or waited for and recorded: the statement holds without them)
            stop = _at_stop(sim, decision.stop)
            if full is not None:
                return full | stop | {"timeline": sim.timeline(window)}
            decision = decide(free)  # an early stop: on to full recall
        stopped = follow(decision)


def decision_time_100k(slots: int, n_features: int, members: int, seed: int = 0) -> dict:
    """Seconds of one arrival decision: 100,000 structures, 1,000 labelled (48 of them since the
    committee's fit, which had 952: 80 % train, 20 % test), slots - 1 pending.

    ``span``: as the coordinator decides, in the coordinates of the span of the members' rows kept
    from the previous decision (which had all but the newest pending job: one new column);
    ``span_build_s``: building that span from nothing (a coordinator's start or resume, once);
    ``member_systems_s``: factorising the members' systems (once per fit, in the coordinator's fit
    thread; the decisions border them with the rows since the fit instead of refitting; the
    previous decision's rows left their bordering columns with them);
    ``features``: the same decision on the 3,750 features (no span).
    """
    from graceq.config import settings_from_dict
    from graceq.model import CommitteeRidge, member_systems

    rng = np.random.default_rng(seed)
    n, n_lab = 100_000, 1000
    latent = rng.normal(size=(n, 8))
    X = np.abs(latent @ rng.normal(size=(8, n_features))) / 8 + 0.05 * rng.random((n, n_features))
    y = X @ rng.normal(size=n_features) / np.sqrt(n_features) + 0.05 * rng.normal(size=n)
    n_atoms = np.full(n, 32)
    results = {i: ("converged", float(y[i] * 32)) for i in range(n_lab)}
    pending = list(range(n_lab, n_lab + slots - 1))
    # every pick after the initial batch has the prediction made before it was measured, as the
    # picks table keeps it: so the stop rule fits its error law on ~1,000 prospective errors and
    # states the risk (the check; the believing committee's picks reuse its law), as a real
    # campaign with 1,000 labelled does. The errors: a t law (4 df) whose scale is the raw spread
    # grown by 1.5 with a noise of half the median spread, per molecule (16 atoms each)
    spread = 0.02 * np.exp(0.5 * rng.normal(size=n_lab))
    error = np.hypot(1.5 * spread, 0.01) * rng.standard_t(4, size=n_lab)
    predictions = {i: (float(2 * y[i] - error[i]), float(spread[i])) for i in range(20, n_lab)}
    view = cp.CampaignView(n_atoms=n_atoms, energy_ff=np.zeros(n), atoms_per_molecule=16,
                           picks=list(range(n_lab)) + pending, results=results, predictions=predictions)
    settings = settings_from_dict({"campaign": {"pool": "synthetic", "window": 0.5, "n_batch": 1},
                                   "model": {"n_members": members}})
    # as the coordinator's refit schedule has it: the committee was fitted 1.5 x slots arrivals ago
    fitted = n_lab - (3 * slots) // 2
    train, test = np.arange(int(0.8 * fitted)), np.arange(int(0.8 * fitted), fitted)
    model = CommitteeRidge(n_members=members, random_state=1).fit(X[train], y[train]).calibrate(X[test], y[test])
    timed = {}
    t = time.perf_counter()
    systems = member_systems(model)  # as the coordinator does in the fit's background thread, once per fit
    timed["member_systems_s"] = time.perf_counter() - t
    previous = list(range(fitted, n_lab - 1)) + pending[:-1] + [n_lab - 1]  # the previous decision's added rows
    systems.border(X[train], X[previous], previous)  # it left their bordering columns with the systems
    t = time.perf_counter()
    span = steering.Span(X).cover(list(train) + list(range(fitted, n_lab)) + pending[:-1])  # the previous decision's
    timed["span_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    in_span = steering.decide_on_arrival(view, model, X, settings, n_lab, np.arange(fitted), pending, 1, span=span)
    timed["span"] = time.perf_counter() - t
    t = time.perf_counter()
    in_features = steering.decide_on_arrival(view, model, X, settings, n_lab, np.arange(fitted), pending, 1)
    timed["features"] = time.perf_counter() - t
    if list(in_span.picks) != list(in_features.picks):
        raise RuntimeError(f"the span's decision {in_span.picks} differs from the features' {in_features.picks}")
    if not np.isfinite(in_span.stats.risk):
        raise RuntimeError("the 100k decision stated no risk: its prospective errors were not used")
    return {k: round(v, 3) for k, v in timed.items()} | {"span_coordinates": span.r,
                                                         "n_prospective": in_span.stats.n_prospective,
                                                         "stated_risk": round(float(in_span.stats.risk), 4)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def celery_run(seed: int, members: int, slots: int = 4, median_s: float = 0.5, budget: int = 40,
               say=print) -> dict:
    """Utilisation of a real async campaign through Celery and Redis against its simulation.

    A private redis-server; two ``graceq worker`` processes on the dft queue with ``slots / 2``
    processes each (the slots), and one on the featurize and fit queues (the coordinator's
    refits); ``graceq run`` in async mode with ``slots`` slots on 66 ROY structures (every 4th of
    ROY-264), n_init 8, ``budget`` calls. The engine (``lognormal_engine.py``) is the replay
    engine with structure i's job lasting ``median_s`` times its simulated hours, and logs when
    each job ran. ``utilisation_real``: busy slot-seconds / (slots x seconds from the first job's
    start to the last one's end); ``utilisation_sim``: the same campaign (its settings, features
    and durations in hours) in the discrete-event simulation, busy slot-hours / slot-hours until
    its last result. The coordinator keeps the default ``poll_interval`` (0.2 s): the result
    backend's doorbell (``graceq.dispatcher.Doorbell``) wakes it when a job ends, so it does not
    wait out the interval (it used to be set to 0.02 s here: 0.2 s is nothing next to hour-long
    jobs, but 40 % of a 0.5 s one).
    """
    import os
    import shutil
    import subprocess

    import tomli_w
    from ase.io import read, write

    from graceq.config import load_settings
    from graceq.store import CampaignPaths

    bench_dir = Path(__file__).resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix="graceq-async-celery-"))
    pool_path = tmp / "roy66.extxyz"
    write(pool_path, read(str(importlib.resources.files("graceq") / "data" / POOLS["roy264"][0]), ":")[::4],
          format="extxyz")
    settings = {
        "campaign": {"pool": str(pool_path), "unit": "kJ/mol", "window": 5.0, "n_init": 8, "seed": seed,
                     "mode": "async", "slots": slots, "budget": budget},
        "model": {"n_members": members, "members_per_task": members},
        "engine": {"engine": "lognormal_engine:LogNormalReplay", "delay_s": median_s, "delay_seed": seed},
    }
    (tmp / "settings.toml").write_text(tomli_w.dumps(settings))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(bench_dir), os.environ.get("PYTHONPATH")])))
    graceq = [sys.executable, "-m", "graceq.cli"]
    port = _free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    procs = [subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)]
    target = tmp / "campaign"
    try:
        time.sleep(0.5)
        subprocess.run(graceq + ["init", str(target), "--settings", str(tmp / "settings.toml")], env=env,
                       check=True, capture_output=True, timeout=600)
        for k, (queues, concurrency) in enumerate([("dft", slots // 2), ("dft", slots - slots // 2),
                                                   ("featurize,fit", 1)]):
            log = open(tmp / f"worker{k}.log", "wb")
            procs.append(subprocess.Popen(graceq + ["worker", "--queues", queues, "--concurrency", str(concurrency),
                                                    "--name", f"bench{k}@%h", "--broker", broker,
                                                    "--allow-code"],  # the engine is this folder's file
                                          stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        t = time.perf_counter()
        run = subprocess.run(graceq + ["run", str(target), "--broker", broker, "--quiet"], env=env,
                             capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"graceq run failed:\n{run.stdout}\n{run.stderr}")
        wall_s = time.perf_counter() - t
    finally:
        for proc in procs[1:]:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in procs[1:]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        procs[0].terminate()
        procs[0].wait(timeout=10)
    paths = CampaignPaths(target)
    spans = []
    for log in sorted(paths.root.glob("**/runs.log")):
        spans += [tuple(float(v) for v in line.split()) for line in log.read_text().splitlines() if line.strip()]
    spans = np.array(spans)
    busy = float((spans[:, 1] - spans[:, 0]).sum())
    real = busy / (slots * (spans[:, 1].max() - spans[:, 0].min()))

    campaign = load_settings(paths.settings)
    pool = load_pool(str(pool_path), "kJ/mol")
    descriptor = np.load(paths.features)
    features = pool_coordinates(cp.model_inputs(descriptor, pool.energy_ff_mol, campaign.model))
    sim = run_async(pool, features, campaign, slots, durations_h(len(pool), seed), None, [], descriptor)
    out = {"slots": slots, "utilisation_sim": round(float(sim["utilisation"]), 4), "utilisation_real": round(real, 4),
           "jobs_real": int(len(spans)), "jobs_sim": sim["calls_to_full_recall"], "median_job_s": median_s,
           "wall_s": round(wall_s, 1), "workers": "2 on dft (slots / 2 processes each) + 1 on featurize,fit"}
    say(json.dumps(out))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _busy(jobs) -> tuple[np.ndarray, np.ndarray]:
    """Busy slots against hours, as steps: the times (h) where the count changes and the count from
    each of them on (``jobs``: [start h, end h, ...] rows of a ``timeline``). A job that starts when
    another ends on its slot is one time with no change (no dip drawn)."""
    jobs = np.asarray(jobs, dtype=np.float64).reshape(-1, 3)
    t, where = np.unique(np.concatenate([[0.0], jobs[:, 0], jobs[:, 1]]), return_inverse=True)
    change = np.zeros(len(t))
    np.add.at(change, where, np.concatenate([[0.0], np.ones(len(jobs)), -np.ones(len(jobs))]))
    return t, np.cumsum(change).astype(int)


def plot(out: dict, path: str | Path) -> Path:
    """The runs as a figure, one row per (pool, slots): window structures not yet measured against
    wall hours (left) and busy slots against wall hours (right), rounds and async, each mode's
    stop a dotted vertical line (async runs on past its stop only when it came before full recall,
    with a rule that never fires)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in out["runs"] if r["sync"].get("timeline") and r["async"].get("timeline")]
    if not runs:
        raise ValueError("no run has a timeline to draw (outputs before 2026-12-07 kept none)")
    fig, axes = plt.subplots(len(runs), 2, figsize=(12.0, 3.6 * len(runs)), squeeze=False)
    for (left, right), r in zip(axes, runs):
        for mode, color, label in (("sync", "C0", f"rounds of {r['slots']}"), ("async", "C1", "async")):
            m = r[mode]
            jobs = m["timeline"]
            found = np.sort([j[1] for j in jobs if j[2]])
            left.step(np.concatenate([[0.0], found]), r["n_window"] - np.arange(len(found) + 1), where="post",
                      color=color, label=f"{label}: every window structure after {m['wall_h_to_full_recall']:g} h, "
                                         f"{m['calls_to_full_recall']} calls")
            t, busy = _busy(jobs)
            right.step(t, busy, where="post", color=color, lw=1,
                       label=f"{label}: {m['utilisation_at_stop']:.0%} busy until its stop "
                             f"({m['stop']}: {m['wall_h_at_stop']:g} h, {m['calls_at_stop']} calls)")
            for ax in (left, right):
                ax.axvline(m["wall_h_at_stop"], color=color, ls=":", lw=1.2)
        right.axhline(r["slots"], color="k", lw=0.6)
        title = f"{r['pool']} ({r['n_pool']} structures, {r['n_window']} in the window), {r['slots']} slots"
        left.set(title=title, xlabel="wall hours (jobs: log-normal, median 1 h, sigma 1)",
                 ylabel="window structures not yet measured", xlim=(0, None), ylim=(0, None))
        right.set(title=title, xlabel="wall hours", ylabel="busy slots", xlim=(0, None), ylim=(0, r["slots"] * 1.08))
        left.legend(fontsize=7, loc="upper right")
        right.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.003, "dotted verticals: each mode's stop (converged: its stated risk <= the target; budget: "
                          "every structure sent, and the last running job landed); simulated from the replay "
                          "engine's answers", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    parser.add_argument("--members", type=int, default=256, help="committee members (default: the campaign default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-n", type=int, default=3000, metavar="N",
                        help="structures of the synthetic pool (--pools synthetic; default 3000)")
    parser.add_argument("--skip-100k", action="store_true", help="leave out decision_s_per_arrival_100k")
    parser.add_argument("--skip-celery", action="store_true", help="leave out the real Celery + Redis run")
    parser.add_argument("--celery-only", action="store_true",
                        help="only the real Celery + Redis runs (no simulated campaigns, no 100k decision)")
    parser.add_argument("--celery-medians", type=float, nargs="+", default=[0.5, 1.0, 2.0], metavar="S",
                        help="median job seconds of the real runs, one run each (default 0.5 1 2: the "
                             "simulation's median hour as a second, and either side)")
    parser.add_argument("--celery-members", type=int, default=64,
                        help="committee members of the real run (default 64: its 66-structure pool)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the runs: window structures found and busy slots "
                                                      "against wall hours")
    parser.add_argument("--from-json", metavar="FILE", help="instead of running: draw --plot from a saved JSON output")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot PNG")
        print(plot(json.loads(Path(args.from_json).read_text()), args.plot))
        return
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.celery_only:
        out = {_celery_key(m): celery_run(args.seed, args.celery_members, median_s=m, say=say)
               for m in args.celery_medians}
        print(json.dumps(out, indent=1) if args.json else out)
        return
    cache = Path(tempfile.gettempdir()) / "graceq-bench-cache"
    if set(args.pools) == {"synthetic"} and not args.skip_100k:
        parser.error("the 100k decision is timed at a bundled pool's descriptor width: add roy264 or "
                     "benzamide to --pools, or --skip-100k")
    runs, timings, width = [], [], None
    for name in args.pools:
        rel, window, on_bad = POOLS[name]
        if rel is None:  # the synthetic pool: its features are drawn with it (the same pool for every seed)
            pool, raw = synthetic.landscape(args.synthetic_n)
            path = pool.source
        else:
            path = str(importlib.resources.files("graceq") / "data" / rel)
            pool = load_pool(path, "kJ/mol", on_bad)
        settings = make_settings(path, "kJ/mol", window, 20, 8, args.seed, on_bad)
        settings.model.n_members = args.members
        settings.model.members_per_task = args.members
        if rel is not None:
            raw = campaign_features(pool, settings, cache)
            width = raw.shape[1]  # the descriptor's width: the 100k decision is timed at it
        features = pool_coordinates(cp.model_inputs(raw, pool.energy_ff_mol, settings.model))
        window_set = set(int(i) for i in pool.window_structures(window))
        hours = durations_h(len(pool), args.seed)
        for slots in args.slots:
            t = time.perf_counter()
            row = {"pool": name, "n_pool": len(pool), "window": window, "n_window": len(window_set), "slots": slots,
                   "sync": run_sync(pool, features, settings, slots, hours, window_set, raw),
                   "async": run_async(pool, features, settings, slots, hours, window_set, timings, raw)}
            row["utilisation_ceiling_whole_pool"] = round(whole_pool_ceiling(hours, slots), 4)
            row["compute_s"] = round(time.perf_counter() - t, 1)
            runs.append(row)
            brief = {mode: {k: v for k, v in row[mode].items() if k != "timeline"} for mode in ("sync", "async")}
            say(json.dumps(row | brief))  # the progress line without the jobs' timelines
    decision = None if args.skip_100k else decision_time_100k(32, width, args.members)
    out = {
        "runs": runs,
        "decision_s_per_arrival_sim": round(float(np.mean(timings)), 4) if timings else None,
        "decision_s_per_arrival_100k": None if decision is None else decision["span"],
        "decision_100k": decision,
        # with longer jobs the per-job dispatch overhead (a constant in seconds) weighs less
        **{_celery_key(m): None if args.skip_celery else celery_run(args.seed, args.celery_members, median_s=m,
                                                                     say=say)
           for m in args.celery_medians},
        "settings": {"n_init": 20, "members": args.members, "durations": "log-normal, median 1 h, sigma 1",
                     "seed": args.seed, "refit_every": "slots"},
    }
    print(json.dumps(out, indent=1) if args.json else out)
    if args.plot:
        say(f"figure: {plot(out, args.plot)}")


def _celery_key(median_s: float) -> str:
    """The output key of the real run with median job ``median_s`` s: ``celery`` for 0.5 s (the
    default), else ``celery_median_<m>s`` (``celery_median_2s``)."""
    return "celery" if median_s == 0.5 else f"celery_median_{median_s:g}s"


if __name__ == "__main__":
    main()
