"""Retrospective benchmark: how many reference calls graceq needs on a pool whose answers are known.

    python benchmarks/retro.py [--pool PATH] [--window 5] [--unit kJ/mol] [--json]
                               [--seeds 0 1 2] [--n-init 20] [--n-batch 10] [--on-bad-molecule skip]
    python benchmarks/retro.py --check-campaign DIR

Runs full replay campaigns (one per seed) and four baselines on the same pool, all in-process and
through the same functions the coordinator calls (``graceq.campaign.initial_batch``,
``plan_committee``, ``graceq.model.select_ridge_alpha`` / ``fit_members`` /
``CommitteeRidge.from_members(...).calibrate``, ``graceq.campaign.decide``), continuing past the
stopping rule until every window structure has been measured. The features are computed once per
seed (the radial compression is fitted on the campaign's seeded sample, as the coordinator does)
and cached in a temporary folder.

What is measured, for graceq and for each baseline (energies per molecule):
- ``window structures``: stable pool structures with E_ref <= min(E_ref) + window, where min is the
  TRUE minimum of the pool (unstable structures excluded);
- ``calls_to_full_recall``: reference calls made when the last window structure was measured.
  Batched methods (graceq, greedy) pay for whole batches; ordered baselines (force-field order,
  random order, FPS) count the position of the last window structure in their order;
- ``calls_at_stop`` / ``recall_at_stop``: the calls made when graceq's stopping rule
  (p_conv >= target) first fired, and the fraction of window structures measured then. For the
  ordered baselines the rule is evaluated along their order every n_batch calls after the first
  n_init, with the same committee fitted on what they measured so far (p_conv is a statement about
  the model and the measured set, so it applies to any sampling order);
- ``p_conv_at_full_recall``: p_conv of the first assessment that sees every window structure.

Baselines: force-field order (lowest E_ff per molecule first), random order (mean over the seeds),
greedy predicted energy (graceq's initial batch and committee, each batch = the n_batch lowest
predicted means), FPS only (farthest point sampling over the whole pool from the lowest E_ff).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graceq import campaign as cp
from graceq.config import settings_from_dict
from graceq.model import CommitteeRidge, fit_members, select_ridge_alpha


def default_pool() -> str:
    return str(importlib.resources.files("graceq") / "data" / "roy264" / "roy264.extxyz")


# -- the pool ---------------------------------------------------------------------------------------
@dataclass
class ReplayPool:
    """A pool with known answers: energies (total per cell) and the replay engine's outcome of each."""

    source: str
    frames: list
    names: np.ndarray
    n_atoms: np.ndarray
    energy_ff: np.ndarray          # total per cell, campaign unit
    outcomes: list                 # (status, E_ref total per cell or None) from the replay engine
    atoms_per_molecule: int
    n_dropped: int = 0             # structures of the file left out (on_bad_molecule = "skip")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def energy_ff_mol(self) -> np.ndarray:
        return cp.per_molecule(self.energy_ff, self.n_atoms, self.atoms_per_molecule)

    @property
    def stable(self) -> np.ndarray:
        return np.array([s == cp.STABLE for s, _ in self.outcomes])

    @property
    def energy_ref_mol(self) -> np.ndarray:
        """Reference energy per molecule (NaN where the reference is not converged)."""
        e = np.array([np.nan if e is None else e for _, e in self.outcomes], dtype=float)
        return cp.per_molecule(e, self.n_atoms, self.atoms_per_molecule)

    def window_structures(self, window: float) -> np.ndarray:
        """Stable structures within `window` (per molecule) of the pool's true reference minimum."""
        e = np.where(self.stable, self.energy_ref_mol, np.inf)
        return np.flatnonzero(e <= e.min() + window)

    def result(self, idx: int) -> tuple[str, float | None]:
        """What the replay engine returns for structure idx: (status, E_ref total per cell)."""
        return self.outcomes[idx]


def load_pool(path: str, unit: str, on_bad_molecule: str = "error") -> ReplayPool:
    """Read the pool as a campaign does (graceq.io.read_pool) and ask the replay engine for every answer.

    ``on_bad_molecule="skip"`` drops structures whose molecules are broken (as the campaign setting
    of that name does); ``n_dropped`` counts them.
    """
    import warnings

    import ase.io

    from graceq.engines import make_engine
    from graceq.io import read_pool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped structures are counted below
        pool = read_pool(path, unit, on_bad_molecule=on_bad_molecule)
    n_file = len(ase.io.read(path, ":")) if on_bad_molecule == "skip" else len(pool)
    engine = make_engine({"engine": "replay"}, pool.unit, pool.source)
    outcomes = []
    for atoms, name in zip(pool.frames, pool.names):
        r = engine.run(atoms, str(name))
        outcomes.append((r.status, None if r.energy is None else float(r.energy)))
    if not any(s == cp.STABLE for s, _ in outcomes):
        raise SystemExit(f"{path}: no structure has a usable reference energy (energy_ref); nothing to replay")
    return ReplayPool(
        source=str(path), frames=list(pool.frames), names=np.asarray(pool.names, dtype=object),
        n_atoms=np.asarray(pool.n_atoms, dtype=int), energy_ff=np.asarray(pool.energy_ff, dtype=float),
        outcomes=outcomes, atoms_per_molecule=int(pool.atoms_per_molecule), n_dropped=n_file - len(pool),
    )


def campaign_features(pool: ReplayPool, settings, cache_dir: Path | None = None) -> np.ndarray:
    """Features of the pool as the coordinator computes them (fit sample drawn with the campaign seed).

    Cached as .npy under `cache_dir`, keyed by the pool file, the descriptor settings and the seed.
    """
    from graceq.features import CompressedSoap, species_of

    d = settings.descriptor
    digest = hashlib.sha256(Path(pool.source).read_bytes())
    digest.update((d.model_dump_json() + f"seed={settings.campaign.seed}").encode())
    key = digest.hexdigest()[:16]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"features-{key}.npy"
        if cache.exists():
            return np.load(cache)
    n = len(pool)
    rng = np.random.default_rng(settings.campaign.seed)
    sample = np.sort(rng.choice(n, size=min(d.fit_sample, n), replace=False))
    soap = CompressedSoap(
        species=species_of(pool.frames), n_max=d.n_max, l_max=d.l_max, cutoff=d.cutoff, smoothing=d.smoothing,
        gaussian_width=d.gaussian_width, scaling_rate=d.scaling_rate, scaling_scale=d.scaling_scale,
        scaling_exponent=d.scaling_exponent, n_compressed=d.n_compressed,
    ).fit([pool.frames[i] for i in sample])
    features = soap.transform(pool.frames)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, features)
    return features


# -- one campaign, in-process -----------------------------------------------------------------------
def fit_committee(view: cp.CampaignView, features: np.ndarray, settings, iteration: int) -> CommitteeRidge:
    """The coordinator's committee fit, in-process: plan, lambda by CV, members, calibration."""
    m = settings.model
    plan = cp.plan_committee(view, m, settings.campaign.seed, iteration)
    X = features[plan.train_rows]
    alpha, _ = select_ridge_alpha(X, plan.y_train, alphas=np.asarray(m.alphas), cv=m.cv)
    step = m.members_per_task
    parts = [fit_members(X, plan.y_train, alpha, plan.subsets[a:a + step]) for a in range(0, m.n_members, step)]
    model = CommitteeRidge.from_members(
        X, plan.y_train, alpha, plan.subsets, np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]), **plan.params,
    )
    return model.calibrate(features[plan.test_rows], plan.y_test)


def _never_stop(settings):
    """A copy of the settings whose stopping rule never fires (the run continues to full recall)."""
    s = settings.model_copy(deep=True)
    s.campaign.p_conv_target = np.inf
    return s


def _assess_only(settings, n_calls: int):
    """A copy of the settings whose budget is spent: decide() assesses but picks nothing."""
    s = _never_stop(settings)
    s.campaign.budget = n_calls
    return s


@dataclass
class Trace:
    """A sampling order and the assessments made along it."""

    order: list = field(default_factory=list)         # pool indices in sampling order (measured)
    next_picks: list = field(default_factory=list)    # the batch picked last and not measured
    checkpoints: list = field(default_factory=list)   # (calls made, stats of decide())
    iterations_s: list = field(default_factory=list)


def run_campaign(pool: ReplayPool, features: np.ndarray, settings, policy: str = "graceq",
                 max_iterations: int | None = None, stop_when=None) -> Trace:
    """Run a replay campaign in-process with the coordinator's decisions.

    policy "graceq": Kriging-Believer EI batches (decide()); "greedy": the same committee, each batch
    the n_batch unlabelled structures of lowest predicted mean. Runs until `stop_when(trace)` is
    true, `max_iterations` iterations are done, or the pool is exhausted; the stopping rule is only
    recorded (stats["p_conv"]), never obeyed.
    """
    c = settings.campaign
    apm = pool.atoms_per_molecule
    trace = Trace(order=[int(i) for i in cp.initial_batch(features, pool.energy_ff_mol, c.n_init)])
    free_run = _never_stop(settings)
    iteration = 0
    while True:
        start = time.perf_counter()
        view = cp.CampaignView(n_atoms=pool.n_atoms, energy_ff=pool.energy_ff, atoms_per_molecule=apm,
                               picks=list(trace.order), results={i: pool.result(i) for i in trace.order})
        model = fit_committee(view, features, settings, iteration)
        run_settings = free_run if policy == "graceq" else _assess_only(settings, len(trace.order))
        decision = cp.decide(view, model, features, run_settings, iteration)
        picks = decision.picks
        if policy == "greedy":
            unlabelled = view.unlabelled()
            n = min(c.n_batch, len(unlabelled))
            picks = unlabelled[np.argsort(decision.mu[unlabelled], kind="stable")[:n]]
        trace.checkpoints.append((len(trace.order), decision.stats))
        trace.iterations_s.append(time.perf_counter() - start)
        iteration += 1
        trace.next_picks = [int(i) for i in picks]
        if len(picks) == 0 or (max_iterations is not None and iteration >= max_iterations):
            break
        if stop_when is not None and stop_when(trace):
            break
        trace.order += trace.next_picks
        trace.next_picks = []
    return trace


def assess_order(pool: ReplayPool, features: np.ndarray, settings, order: np.ndarray, until: int) -> Trace:
    """Evaluate the stopping rule along a fixed sampling order, every n_batch calls after n_init.

    At each checkpoint the committee is fitted on the structures measured so far (in that order),
    exactly as in a campaign; stops after the first checkpoint at or past `until` calls at which the
    rule has fired (or at the end of the pool).
    """
    c = settings.campaign
    trace = Trace(order=[int(i) for i in order])
    target = c.p_conv_target
    fired = False
    for iteration, calls in enumerate(range(c.n_init, len(order) + c.n_batch, c.n_batch)):
        calls = min(calls, len(order))
        picks = list(trace.order[:calls])
        view = cp.CampaignView(n_atoms=pool.n_atoms, energy_ff=pool.energy_ff,
                               atoms_per_molecule=pool.atoms_per_molecule, picks=picks,
                               results={i: pool.result(i) for i in picks})
        try:
            model = fit_committee(view, features, settings, iteration)
        except ValueError:  # too few stable structures for the chronological split yet
            continue
        stats = cp.decide(view, model, features, _assess_only(settings, calls), iteration).stats
        trace.checkpoints.append((calls, stats))
        fired = fired or stats["p_conv"] >= target
        if (calls >= until and fired) or calls == len(order):
            break
    return trace


# -- the figures --------------------------------------------------------------------------------------
def figures(trace: Trace, window_set: np.ndarray, target: float, batched: bool, n_pool: int | None = None) -> dict:
    """calls_to_full_recall, calls_at_stop, recall_at_stop, p_conv_at_full_recall of one trace.

    ``stop_reason`` is "p_conv" when the rule fired with structures left to measure, "pool
    exhausted" when it only fired once every structure was measured (p_conv = 1 trivially), None
    when it never fired along the trace.
    """
    position = {idx: k for k, idx in enumerate(trace.order)}
    last = max(position.get(int(i), len(trace.order) + 10**9) for i in window_set) + 1
    full = None
    if last <= len(trace.order):
        full = last
        if batched:  # a batch is paid in full: the calls made when the batch holding `last` was sent
            full = min((calls for calls, _ in trace.checkpoints if calls >= last), default=len(trace.order))
    found = set(int(i) for i in window_set)
    out = {"calls_to_full_recall": full, "calls_at_stop": None, "recall_at_stop": None,
           "p_conv_at_full_recall": None, "stop_reason": None}
    for calls, stats in trace.checkpoints:
        if out["calls_at_stop"] is None and stats["p_conv"] >= target:
            out["calls_at_stop"] = calls
            out["recall_at_stop"] = round(len(found & set(trace.order[:calls])) / len(found), 4)
            out["stop_reason"] = "pool exhausted" if n_pool is not None and calls >= n_pool else "p_conv"
        if full is not None and out["p_conv_at_full_recall"] is None and calls >= full:
            out["p_conv_at_full_recall"] = round(stats["p_conv"], 4)
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 2) if values else None


def summarise(per_seed: list[dict]) -> dict:
    keys = ("calls_to_full_recall", "calls_at_stop", "recall_at_stop", "p_conv_at_full_recall")
    out = {k: _mean([r[k] for r in per_seed]) for k in keys}
    out["per_seed"] = per_seed
    return out


def make_settings(pool_path: str, unit: str, window: float, n_init: int, n_batch: int, seed: int,
                  on_bad_molecule: str = "error"):
    """The campaign settings of the benchmark: the defaults, with the pool's unit, window and batches."""
    return settings_from_dict({"campaign": {"pool": str(pool_path), "unit": unit, "window": window,
                                            "n_init": n_init, "n_batch": n_batch, "seed": seed,
                                            "on_bad_molecule": on_bad_molecule}})


def benchmark(pool_path: str, window: float, unit: str, seeds: list[int], n_init: int, n_batch: int,
              cache_dir: Path, progress=print, on_bad_molecule: str = "error") -> dict:
    """All the figures of the benchmark as one JSON-ready dict."""
    started = time.perf_counter()
    pool = load_pool(pool_path, unit, on_bad_molecule)
    window_set = pool.window_structures(window)
    n_window = len(window_set)
    methods: dict[str, list] = {"graceq": [], "greedy_predicted_energy": [], "random_order": []}
    timing = {}
    features_by_seed = {}
    for seed in seeds:
        settings = make_settings(pool_path, unit, window, n_init, n_batch, seed, on_bad_molecule)
        target = settings.campaign.p_conv_target
        t = time.perf_counter()
        features = features_by_seed[seed] = campaign_features(pool, settings, cache_dir)
        timing.setdefault("features_s", []).append(round(time.perf_counter() - t, 1))

        def recalled(trace):
            return set(int(i) for i in window_set) <= set(trace.order) and any(
                s["p_conv"] >= target for _, s in trace.checkpoints)

        for policy, name in (("graceq", "graceq"), ("greedy", "greedy_predicted_energy")):
            t = time.perf_counter()
            trace = run_campaign(pool, features, settings, policy, stop_when=recalled)
            fig = figures(trace, window_set, target, batched=True, n_pool=len(pool))
            fig.update(seed=seed, iterations=len(trace.checkpoints),
                       p_conv_history=[round(s["p_conv"], 4) for _, s in trace.checkpoints],
                       calls_history=[c for c, _ in trace.checkpoints])
            if policy == "graceq":
                fig["first_picks"] = trace.order[: n_init + n_batch]
            methods[name].append(fig)
            timing.setdefault(f"{name}_s", []).append(round(time.perf_counter() - t, 1))
            progress(f"seed {seed} {name}: {json.dumps({k: fig[k] for k in list(fig)[:5]})}")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(pool))
        t = time.perf_counter()
        full = figures(Trace(order=order.tolist()), window_set, target, batched=False)["calls_to_full_recall"]
        fig = figures(assess_order(pool, features, settings, order, full), window_set, target, batched=False,
                      n_pool=len(pool))
        fig.update(seed=seed)
        methods["random_order"].append(fig)
        timing.setdefault("random_order_s", []).append(round(time.perf_counter() - t, 1))
        progress(f"seed {seed} random: {fig}")

    settings = make_settings(pool_path, unit, window, n_init, n_batch, seeds[0], on_bad_molecule)
    target = settings.campaign.p_conv_target
    features = features_by_seed[seeds[0]]
    result = {k: summarise(v) for k, v in methods.items()}
    for name, order in (
        ("force_field_order", np.argsort(pool.energy_ff_mol, kind="stable")),
        ("fps_only", cp.initial_batch(features, pool.energy_ff_mol, len(pool))),
    ):
        t = time.perf_counter()
        full = figures(Trace(order=list(map(int, order))), window_set, target, batched=False)["calls_to_full_recall"]
        fig = figures(assess_order(pool, features, settings, order, full), window_set, target, batched=False,
                      n_pool=len(pool))
        result[name] = dict(fig, committee_seed=seeds[0])
        timing[f"{name}_s"] = round(time.perf_counter() - t, 1)
        progress(f"{name}: {fig}")

    g = result["graceq"]
    ff = result["force_field_order"]
    missing = [r for r in g["per_seed"] if r["recall_at_stop"] is not None and r["recall_at_stop"] < 1.0]
    return {
        "pool": str(pool_path),
        "n_pool": len(pool),
        "n_unstable": int((~pool.stable).sum()),
        "n_dropped_bad_molecules": pool.n_dropped,
        "unit": unit,
        "energy_basis": "per molecule",
        "window": window,
        "n_window_structures": n_window,
        "n_init": n_init,
        "n_batch": n_batch,
        "p_conv_target": target,
        "seeds": seeds,
        "committee": {"n_members": settings.model.n_members, "subsample": settings.model.subsample},
        "methods": {k: result[k] for k in ("graceq", "force_field_order", "random_order",
                                           "greedy_predicted_energy", "fps_only")},
        "calls_saved_vs_force_field_at_full_recall": (
            None if g["calls_to_full_recall"] is None or ff["calls_to_full_recall"] is None
            else round(ff["calls_to_full_recall"] - g["calls_to_full_recall"], 2)),
        "graceq_stopped_with_window_structure_missing": {
            "seeds": [r["seed"] for r in missing],
            "recall_at_stop": [r["recall_at_stop"] for r in missing],
        },
        "graceq_stopped_only_when_pool_exhausted_seeds": [
            r["seed"] for r in g["per_seed"] if r["stop_reason"] != "p_conv"],
        "notes": (
            f"n_init {n_init}, n_batch {n_batch}; campaigns in-process with graceq.campaign decisions, "
            "continued past the stopping rule to full recall; graceq and greedy pay whole batches; random "
            "order: mean over seeds; force-field order and FPS: committee of the first seed for p_conv"),
        "timing_s": dict(timing, total=round(time.perf_counter() - started, 1)),
    }


def check_campaign(campaign_dir: str, cache_dir: Path | None = None) -> dict:
    """Replay a real campaign's finished iterations in-process and compare picks and statistics.

    For a campaign made by `graceq demo` or `graceq run` (replay engine): recomputes the features,
    runs as many iterations as the campaign finished, and reports whether every pick (in order)
    and p_conv of every iteration agree.
    """
    import sqlite3

    from graceq.config import load_settings

    root = Path(campaign_dir)
    settings = load_settings(root / "settings.toml")
    with sqlite3.connect(root / "state.sqlite") as db:
        picks = [idx for (idx,) in db.execute("SELECT idx FROM picks ORDER BY iteration, rank")]
        stored = [json.loads(s) for (s,) in db.execute("SELECT stats FROM iterations ORDER BY iteration")]
    pool = load_pool(settings.campaign.pool, settings.campaign.unit, settings.campaign.on_bad_molecule)
    features = campaign_features(pool, settings, cache_dir)
    campaign_features_file = root / "artifacts" / "features.npy"
    same_features = None
    if campaign_features_file.exists():
        same_features = bool(np.allclose(features, np.load(campaign_features_file), rtol=1e-9, atol=1e-12))
    trace = run_campaign(pool, features, settings, "graceq", max_iterations=len(stored))
    mine = trace.order + trace.next_picks
    return {
        "campaign": str(root.resolve()),
        "iterations_compared": len(stored),
        "picks_compared": len(picks),
        "same_features": same_features,
        "same_picks": mine == picks,
        "first_difference": next((k for k, (a, b) in enumerate(zip(mine, picks)) if a != b), None),
        "p_conv": [[round(s["p_conv"], 6) for _, s in trace.checkpoints], [round(s["p_conv"], 6) for s in stored]],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default=default_pool(), help="extxyz pool with energy_ff and energy_ref")
    parser.add_argument("--window", type=float, default=5.0, help="energy window per molecule, in --unit")
    parser.add_argument("--unit", default="kJ/mol")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-init", type=int, default=20)
    parser.add_argument("--n-batch", type=int, default=10)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "graceq-retro-cache"),
                        help="folder for cached features")
    parser.add_argument("--on-bad-molecule", choices=("error", "skip"), default="error",
                        help="skip: drop structures with broken molecules, as the campaign setting does")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--check-campaign", metavar="DIR",
                        help="instead: replay the finished iterations of the campaign in DIR and compare picks")
    args = parser.parse_args(argv)
    if args.check_campaign:
        print(json.dumps(check_campaign(args.check_campaign, Path(args.cache))))
        return
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    out = benchmark(args.pool, args.window, args.unit, args.seeds, args.n_init, args.n_batch, Path(args.cache),
                    progress=say, on_bad_molecule=args.on_bad_molecule)
    print(json.dumps(out, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
