"""Synchronous rounds against asynchronous steering, on replayed landscapes with heavy-tailed jobs.

    python benchmarks/async_slots.py [--json] [--slots 8 32 128] [--pools roy264 benzamide]
                                     [--members 256] [--seed 0] [--skip-100k]

An in-process discrete-event simulation on the replay engine's answers. Each structure's reference
job takes a duration drawn once from a log-normal (median 1 h, sigma 1; seeded), the same in both
modes. With N slots:

- ``sync`` (mode "batch", the seed's recipe, batch width N): send a batch, wait for its slowest
  job, refit, pick the next N by Kriging-Believer (``graceq.campaign.decide``);
- ``async`` (mode "async", ``slots`` N, ``refit_every`` N): keep N jobs in flight; after every
  arrival, ``graceq.steering.decide_on_arrival`` (the coordinator's function) fills the free slots
  with the pending jobs believed at their predicted means; fit r is trained on the first
  n_init + r N arrivals and used from N arrivals later (the coordinator's schedule).

Both start from the same farthest-point initial batch (n_init 20) and run to full recall (every
structure within the window of the true minimum measured); the stopping rule is not obeyed (it is
the same function in both modes). Figures per run: ``wall_h_to_full_recall`` (simulated hours
until the last window structure's result arrived), ``calls_to_full_recall`` (jobs sent by then,
running ones included), ``utilisation`` (busy slot-hours / slot-hours until then). Fitting and
deciding cost no simulated time; their real cost is measured separately as
``decision_s_per_arrival_100k``: one arrival decision on a 100,000-structure pool with 1,000
labelled and N - 1 jobs pending (synthetic features of the bundled pool's width).
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

from retro import campaign_features, fit_committee, load_pool, make_settings  # noqa: E402

from graceq import campaign as cp  # noqa: E402
from graceq import steering  # noqa: E402

POOLS = {
    "roy264": ("roy264/roy264.extxyz", 5.0, "error"),
    "benzamide": ("benzamide/landscape.extxyz", 10.0, "skip"),
}


def durations_h(n: int, seed: int) -> np.ndarray:
    """Hours each structure's reference job takes: log-normal, median 1 h, sigma 1 (seeded)."""
    return np.random.default_rng([seed, 1]).lognormal(mean=0.0, sigma=1.0, size=n)


class Simulation:
    """Slots, a clock in hours, and the jobs running on them."""

    def __init__(self, slots: int, hours: np.ndarray):
        self.slots, self.hours = slots, hours
        self.clock = 0.0
        self.running: list[tuple[float, int]] = []  # (end time h, structure), a heap
        self.busy_h = 0.0
        self.sent: list[int] = []

    def send(self, idx: int) -> None:
        assert len(self.running) < self.slots
        heapq.heappush(self.running, (self.clock + self.hours[idx], int(idx)))
        self.sent.append(int(idx))

    def next_arrival(self) -> int:
        end, idx = heapq.heappop(self.running)
        self.busy_h += self.hours[idx]
        self.clock = end
        return idx

    def utilisation(self) -> float:
        """Busy slot-hours until now (jobs still running count up to now) / slot-hours until now."""
        busy = self.busy_h + sum(self.clock - (end - self.hours[i]) for end, i in self.running)
        return busy / (self.slots * self.clock)


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


def _view(pool, picks, arrived):
    return cp.CampaignView(n_atoms=pool.n_atoms, energy_ff=pool.energy_ff, atoms_per_molecule=pool.atoms_per_molecule,
                           picks=list(picks), results={i: pool.result(i) for i in arrived})


def _free_run(settings, n_batch):
    s = settings.model_copy(deep=True)
    s.campaign.p_conv_target = np.inf
    s.campaign.n_batch = n_batch
    return s


def _figures(sim: Simulation, window: set, arrived: list) -> dict:
    return {"wall_h_to_full_recall": round(sim.clock, 2), "calls_to_full_recall": len(sim.sent),
            "utilisation": round(sim.utilisation(), 4), "results_at_full_recall": len(arrived)}


def run_sync(pool, features, settings, slots, hours, window: set) -> dict:
    """Synchronous rounds of width `slots`: each round waits for its slowest job."""
    sim = Simulation(slots, hours)
    settings = _free_run(settings, slots)
    queue = [int(i) for i in cp.initial_batch(features, pool.energy_ff_mol, settings.campaign.n_init)]
    picks, arrived, iteration = list(queue), [], 0
    while True:
        while queue or sim.running:  # one round: the batch on the slots, in waves if it is wider
            while queue and len(sim.running) < slots:
                sim.send(queue.pop(0))
            arrived.append(sim.next_arrival())
            if window <= set(arrived):
                return _figures(sim, window, arrived)
        view = _view(pool, picks, arrived)
        model = fit_committee(view, features, settings, iteration)
        decision = cp.decide(view, model, features, settings, iteration)
        iteration += 1
        queue = [int(i) for i in decision.picks]
        if not queue:
            raise RuntimeError("sync run stopped before full recall")
        picks += queue


def run_async(pool, features, settings, slots, hours, window: set, timings: list) -> dict:
    """Asynchronous steering with `slots` jobs in flight and the coordinator's refit schedule."""
    sim = Simulation(slots, hours)
    settings = _free_run(settings, slots)
    initial = [int(i) for i in cp.initial_batch(features, pool.energy_ff_mol, settings.campaign.n_init)]
    queue, picks, arrived = list(initial), list(initial), []
    n0, k = len(initial), slots
    fits: dict[int, tuple] = {}

    def fit(r):
        if r not in fits:
            view = _view(pool, picks_at[n0 + r * k], arrived[:n0 + r * k])
            plan = cp.plan_committee(view, settings.model, settings.campaign.seed, r)
            fits[r] = (fit_committee(view, features, settings, r), np.concatenate([plan.train_rows, plan.test_rows]))
        return fits[r]

    picks_at: dict[int, list] = {}
    while True:
        while queue and len(sim.running) < slots:
            sim.send(queue.pop(0))
        arrived.append(sim.next_arrival())
        n = len(arrived)
        picks_at[n] = list(picks)
        if window <= set(arrived):
            return _figures(sim, window, arrived)
        if n < n0:
            continue
        r = 0 if n < n0 + 2 * k else (n - n0 - k) // k
        model, fitted_rows = fit(r)
        view = _view(pool, picks, arrived)
        pending = [i for i in picks if i not in set(arrived)]
        t = time.perf_counter()
        decision = steering.decide_on_arrival(view, model, features, settings, n, fitted_rows, pending,
                                              slots - len(pending))
        timings.append(time.perf_counter() - t)
        queue += [int(i) for i in decision.picks]
        picks += [int(i) for i in decision.picks]
        if not queue and not sim.running:
            raise RuntimeError("async run stopped before full recall")


def decision_time_100k(slots: int, n_features: int, members: int, seed: int = 0) -> float:
    """Seconds of one arrival decision: 100,000 structures, 1,000 labelled, slots - 1 pending."""
    from graceq.config import settings_from_dict
    from graceq.model import CommitteeRidge

    rng = np.random.default_rng(seed)
    n, n_lab = 100_000, 1000
    latent = rng.normal(size=(n, 8))
    X = np.abs(latent @ rng.normal(size=(8, n_features))) / 8 + 0.05 * rng.random((n, n_features))
    y = X @ rng.normal(size=n_features) / np.sqrt(n_features) + 0.05 * rng.normal(size=n)
    n_atoms = np.full(n, 32)
    results = {i: ("converged", float(y[i] * 32)) for i in range(n_lab)}
    pending = list(range(n_lab, n_lab + slots - 1))
    view = cp.CampaignView(n_atoms=n_atoms, energy_ff=np.zeros(n), atoms_per_molecule=16,
                           picks=list(range(n_lab)) + pending, results=results)
    settings = settings_from_dict({"campaign": {"pool": "synthetic", "window": 0.5, "n_batch": 1},
                                   "model": {"n_members": members}})
    train, test = np.arange(800), np.arange(800, 1000)
    model = CommitteeRidge(n_members=members, random_state=1).fit(X[train], y[train]).calibrate(X[test], y[test])
    t = time.perf_counter()
    steering.decide_on_arrival(view, model, X, settings, n_lab, np.arange(n_lab), pending, 1)
    return time.perf_counter() - t


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    parser.add_argument("--members", type=int, default=256, help="committee members (default: the campaign default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-100k", action="store_true", help="leave out decision_s_per_arrival_100k")
    args = parser.parse_args(argv)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    cache = Path(tempfile.gettempdir()) / "graceq-bench-cache"
    runs, timings = [], []
    for name in args.pools:
        rel, window, on_bad = POOLS[name]
        path = str(importlib.resources.files("graceq") / "data" / rel)
        pool = load_pool(path, "kJ/mol", on_bad)
        settings = make_settings(path, "kJ/mol", window, 20, 8, args.seed, on_bad)
        settings.model.n_members = args.members
        settings.model.members_per_task = args.members
        features = pool_coordinates(campaign_features(pool, settings, cache))
        window_set = set(int(i) for i in pool.window_structures(window))
        hours = durations_h(len(pool), args.seed)
        for slots in args.slots:
            t = time.perf_counter()
            row = {"pool": name, "n_pool": len(pool), "window": window, "n_window": len(window_set), "slots": slots,
                   "sync": run_sync(pool, features, settings, slots, hours, window_set),
                   "async": run_async(pool, features, settings, slots, hours, window_set, timings)}
            row["compute_s"] = round(time.perf_counter() - t, 1)
            runs.append(row)
            say(json.dumps(row))
    out = {
        "runs": runs,
        "decision_s_per_arrival_sim": round(float(np.mean(timings)), 4) if timings else None,
        "decision_s_per_arrival_100k": None if args.skip_100k else round(
            decision_time_100k(32, features.shape[1], args.members), 3),
        "celery": None,
        "settings": {"n_init": 20, "members": args.members, "durations": "log-normal, median 1 h, sigma 1",
                     "seed": args.seed, "refit_every": "slots"},
    }
    print(json.dumps(out, indent=1) if args.json else out)


if __name__ == "__main__":
    main()
