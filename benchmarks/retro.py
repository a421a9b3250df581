"""Retrospective benchmark: how many reference calls graceq needs on a pool whose answers are known,
and whether its stop can be trusted.

    python benchmarks/retro.py [--pool PATH] [--window 5 [10 15]] [--unit kJ/mol] [--json]
                               [--seeds 0 1 2 ...] [--n-init 20] [--n-batch 10] [--jobs 2]
                               [--on-bad-molecule skip] [--methods graceq seed_recipe ...] [--plot PNG]
    python benchmarks/retro.py --from-json OUT.json --plot PNG    # redraw a saved output
    python benchmarks/retro.py --check-campaign DIR

Runs full replay campaigns (one per seed and method) in-process, through the functions the
coordinator calls (``graceq.campaign.initial_batch``, ``plan_committee``,
``graceq.model.select_ridge_alpha`` / ``fit_members``, ``graceq.campaign.assemble_committee``,
``graceq.campaign.decide``), continuing past each method's stop until every window structure
has been measured. Features are computed once per seed (the radial compression is fitted on the
campaign's seeded sample, as the coordinator does) and cached.

Methods (``methods`` in the JSON):
- ``graceq``: the defaults (``acquisition = "p_window"``, ``stop_rule = "risk"``, risk 0.05);
- ``seed_recipe``: the published method (``acquisition = "ei"``: EI with a Kriging-Believer batch;
  ``stop_rule = "p_conv"``, p_conv >= 0.99);
- ``greedy_predicted_energy``: the same committee, each batch the lowest predicted energies
  (run to full recall only: its stop is not evaluated);
- ``force_field_order``, ``random_order`` (one permutation per seed), ``fps_only`` (farthest point
  sampling over the whole pool from the lowest E_ff): fixed orders, no campaign.

What is measured (energies per molecule):
- ``window structures``: stable pool structures with E_ref <= min(E_ref) + window, min being the
  TRUE minimum of the pool (unstable structures excluded);
- ``calls_to_full_recall``: reference calls made when the last window structure was measured;
  campaign methods pay for whole batches, fixed orders count the position of the last one;
- ``calls_at_stop`` / ``recall_at_stop`` / ``missed_at_stop``: where the method's own rule first
  held, and the window structures measured / not measured then; ``stated_risk_at_stop``: the
  expected number of window structures still unmeasured that the rule stated there (it bounds
  P(at least one missed)); ``stop_reason`` "pool exhausted" when the rule only held once nothing
  was left;
- ``checks``: per window, the early stops, the observed misses summed over seeds against the
  stated risk summed over seeds, and mean calls at stop over mean calls to full recall;
  ``graceq_loses_to_a_baseline``: every seed whose calls to full recall exceed force-field order's
  or greedy's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import os
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
    """Read the pool as a campaign does (graceq.pool.read_pool) and ask the replay engine for every answer.

    ``on_bad_molecule="skip"`` drops structures whose molecules are broken (as the campaign setting
    of that name does); ``n_dropped`` counts them.
    """
    import warnings

    import ase.io

    from graceq.engines import make_engine
    from graceq.pool import read_pool

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
    """The coordinator's committee fit, in-process: plan, lambda by CV, members, and the same
    assembly and calibration as the coordinator (``graceq.campaign.assemble_committee``)."""
    m = settings.model
    plan = cp.plan_committee(view, m, settings.campaign.seed, iteration)
    X = features[plan.train_rows]
    ridge_lambda, _ = select_ridge_alpha(X, plan.y_train, alphas=np.asarray(m.alphas), cv=m.cv)
    step = m.members_per_task
    parts = [fit_members(X, plan.y_train, ridge_lambda, plan.subsets[a:a + step]) for a in range(0, m.n_members, step)]
    return cp.assemble_committee(plan, features, ridge_lambda, np.concatenate([p[0] for p in parts]),
                                 np.concatenate([p[1] for p in parts]))


def _never_stop(settings):
    """A copy of the settings whose stopping rule never fires: the run goes on past the stop, and
    the method's own rule is evaluated on the recorded statistics instead (``cp.stop_reached``)."""
    s = settings.model_copy(deep=True)
    s.campaign.stop_rule = "p_conv"
    s.campaign.p_conv_target = np.inf
    return s


@dataclass
class Trace:
    """A sampling order and the assessments made along it."""

    order: list = field(default_factory=list)         # pool indices in sampling order (measured)
    next_picks: list = field(default_factory=list)    # the batch picked last and not measured
    checkpoints: list = field(default_factory=list)   # (calls made, IterationStats of decide())
    iterations_s: list = field(default_factory=list)
    predictions: dict = field(default_factory=dict)   # idx -> (mu, raw spread) when it was picked


def run_campaign(pool: ReplayPool, features: np.ndarray, settings, max_iterations: int | None = None,
                 stop_when=None) -> Trace:
    """Run a replay campaign in-process with the coordinator's decisions (``cp.decide`` with the
    settings' acquisition), continuing past its stopping rule. ``features``: the descriptor (the
    model's inputs are built from it as the coordinator builds them, ``cp.model_inputs``).

    Each pick's prediction (mean and raw committee spread, made before it is measured) is kept, as
    the coordinator keeps it in the picks table, so that the stop rule sees the same prospective
    errors. Runs until `stop_when(trace)` is true, `max_iterations` iterations are done, or the
    pool is exhausted.
    """
    c = settings.campaign
    apm = pool.atoms_per_molecule
    trace = Trace(order=[int(i) for i in cp.initial_batch(features, pool.energy_ff_mol, c.n_init)])
    features = cp.model_inputs(features, pool.energy_ff_mol, settings.model)  # what the model regresses on
    free_run = _never_stop(settings)
    predictions = trace.predictions
    iteration, stopped = 0, False
    while True:
        start = time.perf_counter()
        view = cp.CampaignView(n_atoms=pool.n_atoms, energy_ff=pool.energy_ff, atoms_per_molecule=apm,
                               picks=list(trace.order), results={i: pool.result(i) for i in trace.order},
                               predictions=dict(predictions))
        model = fit_committee(view, features, settings, iteration)
        # the method's own settings until its rule holds (their batches are the campaign's: the last one
        # may be trimmed to what the stop needs), then a rule that never fires, on to full recall
        decision = cp.decide(view, model, features, free_run if stopped else settings, iteration)
        if decision.stop is not None and not stopped:
            stopped = True
            decision = cp.decide(view, model, features, free_run, iteration)
        picks = decision.picks
        spread = decision.sigma / decision.stats.calibration
        for i in picks:
            predictions[int(i)] = (float(decision.mu[i]), float(spread[i]))
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


# -- the figures --------------------------------------------------------------------------------------
def calls_to_full_recall(order, window_set, checkpoints=None) -> int | None:
    """Reference calls made when the last window structure was measured; with ``checkpoints``
    (a batched method) the calls made when the batch holding it was sent, since a batch is paid in full."""
    position = {idx: k for k, idx in enumerate(order)}
    last = max(position.get(int(i), len(order) + 10**9) for i in window_set) + 1
    if last > len(order):
        return None
    if checkpoints is None:
        return last
    return min((calls for calls, _ in checkpoints if calls >= last), default=len(order))


def figures(trace: Trace, window_set: np.ndarray, campaign_settings, n_pool: int) -> dict:
    """calls_to_full_recall, calls_at_stop, recall_at_stop, stated_risk_at_stop, missed_at_stop.

    The stop is the first assessment at which the method's own rule (``cp.stop_reached`` with
    ``campaign_settings``) holds, or the assessment that finds the pool exhausted.
    ``stop_reason``: "rule", or "pool exhausted" when the rule held only once nothing was left.
    """
    full = calls_to_full_recall(trace.order, window_set, trace.checkpoints)
    wanted = set(int(i) for i in window_set)
    out = {"calls_to_full_recall": full, "calls_at_stop": None, "recall_at_stop": None,
           "stated_risk_at_stop": None, "missed_at_stop": None, "stop_reason": None,
           "p_conv_at_full_recall": None}
    for calls, stats in trace.checkpoints:
        if out["calls_at_stop"] is None and (cp.stop_reached(stats, campaign_settings) or calls >= n_pool):
            missed = len(wanted - set(trace.order[:calls]))
            out.update(calls_at_stop=calls, recall_at_stop=round(1 - missed / len(wanted), 4),
                       missed_at_stop=missed, stop_reason="rule" if calls < n_pool else "pool exhausted",
                       stated_risk_at_stop=None if not np.isfinite(stats.risk) else round(stats.risk, 4))
        if full is not None and out["p_conv_at_full_recall"] is None and calls >= full:
            out["p_conv_at_full_recall"] = round(stats.p_conv, 4)
    return out


def missed_history(trace: Trace, window_set) -> list[int]:
    """Window structures not yet measured at each of a campaign's assessments (``calls_history``)."""
    wanted = set(int(i) for i in window_set)
    return [len(wanted - set(trace.order[:c])) for c, _ in trace.checkpoints]


def missed_curve(order, window_set) -> list[int]:
    """Window structures not yet measured after 0, 1, ..., len(order) calls of a fixed order."""
    hit = np.isin(np.asarray(order, dtype=int), np.asarray(window_set, dtype=int))
    return (len(window_set) - np.concatenate([[0], np.cumsum(hit)])).astype(int).tolist()


def plot(out: dict, path: str | Path) -> Path:
    """The benchmark as a figure: window structures still unmeasured against reference calls, one
    panel per window. Campaign methods: the median over seeds (line) and the range (band), their
    mean stop (dotted vertical line); fixed orders (force field, farthest points) as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = out.get("windows") or {str(out["window"]): out}
    fig, axes = plt.subplots(1, len(windows), figsize=(6.0 * len(windows), 4.5), squeeze=False)
    names = {"graceq": "graceq (defaults)", "seed_recipe": "seed recipe (EI + KB + p_conv)",
             "greedy_predicted_energy": "greedy (lowest predicted)",
             "graceq_force_field_feature": "graceq + force-field input"}
    for ax, (window, r) in zip(axes[0], windows.items()):
        methods = r["methods"]
        for k, (name, label) in enumerate(names.items()):
            runs = [p for p in methods.get(name, {}).get("per_seed", []) if p.get("missed_history")]
            if not runs:
                continue
            grid = np.arange(0, max(p["calls_history"][-1] for p in runs) + 1)
            # a batch's results count once the whole batch is measured: steps at the checkpoints
            curves = np.array([np.asarray([_n_window(r)] + p["missed_history"])[
                np.searchsorted([0] + p["calls_history"], grid, side="right") - 1] for p in runs])
            color = f"C{k}"
            ax.step(grid, np.median(curves, axis=0), where="post", color=color, label=f"{label}, {len(runs)} seeds")
            ax.fill_between(grid, curves.min(axis=0), curves.max(axis=0), step="post", color=color, alpha=0.2, lw=0)
            stop = methods[name].get("calls_at_stop")
            if stop:
                ax.axvline(stop, color=color, ls=":", lw=1.2)
        for name, label, style in (("force_field_order", "force-field order", "k--"),
                                   ("fps_only", "farthest points only", "k:")):
            curve = methods.get(name, {}).get("missed_history")
            if curve:
                ax.step(np.arange(len(curve)), curve, style, where="post", lw=1, label=label)
        pool = Path(out.get("pool", ""))
        ax.set_title(f"{pool.parent.name}/{pool.name}, window {float(window):g} {out.get('unit', '')} "
                     f"({_n_window(r)} structures)")
        ax.set_xlabel("reference calls")
        ax.set_ylabel("window structures not yet measured")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.legend(fontsize=7, loc="upper right")
    fig.text(0.01, 0.005, "lines: median over seeds; bands: range; dotted verticals: mean calls at the stop",
             fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Write a benchmark's figure to ``path`` (its folder made if missing), close it; the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _n_window(result: dict) -> int:
    return int(result["n_window_structures"])


def _mean(values):
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 2) if values else None


def summarise(per_seed: list[dict]) -> dict:
    keys = ("calls_to_full_recall", "calls_at_stop", "recall_at_stop", "p_conv_at_full_recall")
    out = {k: _mean([r.get(k) for r in per_seed]) for k in keys}
    out["per_seed"] = per_seed
    return out


def make_settings(pool_path: str, unit: str, window: float, n_init: int, n_batch: int, seed: int,
                  on_bad_molecule: str = "error", model: dict | None = None, **campaign):
    """The campaign settings of the benchmark: the defaults, with the pool's unit, window and
    batches (and any other [campaign] key, e.g. the seed recipe's acquisition and stop rule, and
    [model] keys in ``model``)."""
    return settings_from_dict({"campaign": {"pool": str(pool_path), "unit": unit, "window": window,
                                            "n_init": n_init, "n_batch": n_batch, "seed": seed,
                                            "on_bad_molecule": on_bad_molecule, **campaign},
                               "model": dict(model or {})})


#: the methods run as campaigns: [campaign] settings (and [model] ones under "model") on top of the defaults
CAMPAIGN_METHODS = {
    "graceq": {},                                                           # the defaults
    "seed_recipe": {"acquisition": "ei", "stop_rule": "p_conv",             # EI + KB + p_conv on the
                    "model": {"force_field_feature": False}},               # seed's descriptor alone
    "greedy_predicted_energy": {"acquisition": "greedy", "trim_last_batch": False},  # whole batches
    # the defaults with the force-field energy as one more input of the delta model (opt-in; not run
    # unless named in --methods)
    "graceq_force_field_feature": {"model": {"force_field_feature": True}},
    # the defaults with the stop's error law of the committee's spread alone (the default before
    # 2026-12-07; not run unless named in --methods)
    "graceq_spread_law": {"error_law": "spread"},
    # the defaults with a noise that may grow with the force-field height (opt-in)
    "graceq_height_law": {"error_law": "spread_noise_height"},
    # the defaults with 99 % confidence in the error law (risk_confidence): what it costs to hold
    # 95 % on a few hundred prospective errors, where Wilks' cut at 95 % covers less (README)
    "graceq_confidence_99": {"risk_confidence": 0.99},
}
#: the methods run when --methods is not given
DEFAULT_METHODS = ("graceq", "seed_recipe", "greedy_predicted_energy")


def run_to_recall_and_stop(pool: ReplayPool, features, window_set, settings) -> tuple[Trace, dict]:
    """One campaign, run until every window structure is measured and its own rule has held: the
    trace and its ``figures``."""
    def done(trace):
        fig = figures(trace, window_set, settings.campaign, len(pool))
        return fig["calls_to_full_recall"] is not None and fig["calls_at_stop"] is not None

    trace = run_campaign(pool, features, settings, stop_when=done)
    return trace, figures(trace, window_set, settings.campaign, len(pool))


def run_method(pool: ReplayPool, features, window_set, settings) -> dict:
    """One campaign of one method and seed, to full recall and its own stop; its figures."""
    t = time.perf_counter()
    trace, fig = run_to_recall_and_stop(pool, features, window_set, settings)
    fig.update(iterations=len(trace.checkpoints), time_s=round(time.perf_counter() - t, 1),
               calls_history=[c for c, _ in trace.checkpoints], missed_history=missed_history(trace, window_set),
               risk_history=[None if not np.isfinite(s.risk) else round(s.risk, 4) for _, s in trace.checkpoints],
               p_conv_history=[round(s.p_conv, 4) for _, s in trace.checkpoints],
               forecaster_history=[s.forecaster for _, s in trace.checkpoints])
    return fig


def floor_calls(p_window, risk: float) -> int:
    """Fewest calls after which ``sum_{unmeasured} P(in window) <= risk`` can hold, given each
    structure's probability ``p_window`` of lying in the window: leave unmeasured the largest set
    whose probabilities sum to at most ``risk`` (the smallest ones first), measure the rest."""
    p = np.sort(np.asarray(p_window, dtype=np.float64))
    return int(len(p) - np.searchsorted(np.cumsum(p), risk, side="right"))


def stop_floor(pool: ReplayPool, features: np.ndarray, window: float, risk: float = 0.05, folds: int = 10,
               alphas=np.logspace(-8, 2, 21)) -> dict:
    """The earliest stop that any rule honest at ``risk`` could make with these model inputs
    (``features``: ``cp.model_inputs`` of the descriptor) and a ridge delta model, even knowing
    what no campaign knows: each stable structure predicted by a
    ridge fitted on the other (folds-1)/folds of the pool (10-fold cross-validation: far more
    training data than a campaign has when it stops), and the TRUE law of those predictions'
    errors (their empirical distribution over the whole pool). With P_i = P(E_i <= T) under that
    law and T = true minimum + window, a rule stating ``sum_{unmeasured} P_i <= risk`` must have
    measured at least :func:`floor_calls` structures. A mean stop far above full recall on a
    landscape whose floor is also far above it is the landscape's (and the model's) doing, not the
    rule's. The floor holds for rules whose error law is the same for every structure; a rule
    whose per-structure spreads really tell good predictions from bad ones could go below it:
    ``calls_spread_law`` is the floor of such a rule (errors standardised by the spread of a
    64-member committee fitted on the other folds), and the ``..._without_largest_error`` figures
    say how much of either floor a single structure holds. ``calls_height_law`` is the floor of a
    rule whose error scale also grows with the structure's force-field height above the pool's
    force-field minimum, ``sqrt(spread^2 + (kappa h)^2)`` (strained, high-lying minima are where
    two levels of theory part most): the lowest over kappa in 10^-3 to 1 (31 log-spaced values),
    a floor no such rule could beat even knowing the best kappa.
    Energies per molecule; unstable structures are left out (a campaign must rule them out too, so
    leaving them out only lowers the floor).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    idx = np.flatnonzero(pool.stable)
    apm = pool.atoms_per_molecule
    e_ref = pool.energy_ref_mol[idx]
    e_ff = pool.energy_ff_mol[idx]
    y = (e_ref - e_ff) / apm
    y_cv = cross_val_predict(RidgeCV(alphas=alphas), features[idx], y, cv=KFold(folds, shuffle=True, random_state=0))
    mu = e_ff + apm * y_cv
    threshold = e_ref.min() + window

    def floor(errors, gap):
        """Floor with the empirical law of ``errors`` applied to each structure's ``gap`` (same scale)."""
        law = np.sort(errors)
        return floor_calls(np.searchsorted(law, gap, side="right") / len(law), risk)

    # the same with each error standardised by the spread of a committee fitted on the other folds
    # (the law the campaign's rule uses), and both without the single largest negative error:
    # how much of the floor one structure holds
    spread = np.empty(len(idx))
    for train, test in KFold(folds, shuffle=True, random_state=0).split(idx):
        committee = CommitteeRidge(n_members=64, random_state=0).fit(features[idx][train], y[train])
        spread[test] = apm * committee.predict(features[idx][test], return_std=True)[1]
    errors = e_ref - mu
    worst = int(np.argmin(errors / spread))
    rest = np.arange(len(idx)) != worst
    height = e_ff - e_ff.min()
    by_kappa = []
    for kappa in np.logspace(-3, 0, 31):
        scale = np.sqrt(spread ** 2 + (kappa * height) ** 2)
        by_kappa.append((floor(errors / scale, (threshold - mu) / scale), float(kappa)))
    height_calls, height_kappa = min(by_kappa)
    return {"calls": floor(errors, threshold - mu), "of": int(len(idx)), "risk": risk,
            "cv_rmse_per_molecule": round(float(np.sqrt(np.mean(errors ** 2))), 2),
            "error_percentiles_0_1_50_99_100": [round(float(v), 1) for v in np.percentile(errors, [0, 1, 50, 99, 100])],
            "calls_without_largest_error": floor(errors[np.arange(len(idx)) != int(np.argmin(errors))], threshold - mu),
            "calls_spread_law": floor(errors / spread, (threshold - mu) / spread),
            "calls_spread_law_without_largest_error": floor((errors / spread)[rest], (threshold - mu) / spread),
            "calls_height_law": {"calls": height_calls, "kappa": round(height_kappa, 4)},
            "largest_standardised_error": {"structure": pool.names[idx[worst]], "error": round(float(errors[worst]), 1),
                                           "spread": round(float(spread[worst]), 2)}}


#: bins of the stated risk for the calibration table (expected number of window structures missed)
RISK_BINS = (0.0, 0.05, 0.2, 1.0, 5.0, float("inf"))


def calibration(runs: list[dict]) -> list[dict]:
    """The stated risk against the misses actually observed, over every assessment of every run:
    per bin of stated risk, the assessments, their mean stated risk, the mean number of window
    structures then unmeasured, and the fraction of assessments with at least one unmeasured.
    Honest statements have mean missed <= mean stated (it is an expectation) and, since it also
    bounds P(a miss), a fraction with a miss below it."""
    pairs = [(r, m) for run in runs for r, m in zip(run.get("risk_history", []), run.get("missed_history", []))
             if r is not None]
    out = []
    for lo, hi in zip(RISK_BINS[:-1], RISK_BINS[1:]):
        sel = [(r, m) for r, m in pairs if lo <= r < hi]
        if sel:
            out.append({"stated_from": lo, "stated_to": hi, "assessments": len(sel),
                        "mean_stated": round(float(np.mean([r for r, _ in sel])), 4),
                        "mean_missed": round(float(np.mean([m for _, m in sel])), 4),
                        "fraction_with_a_miss": round(float(np.mean([m > 0 for _, m in sel])), 4)})
    return out


def _seed_runs(pool, pool_path, window_sets, unit, n_init, n_batch, seed, cache_dir, on_bad_molecule, methods):
    """Every campaign method of one seed, for every window: {window: {method: figures}}.

    Greedy's picks do not depend on the window (the lowest predicted energies), so it runs once,
    to full recall of the widest window; its stop is not evaluated.
    """
    from threadpoolctl import threadpool_limits

    out = {w: {} for w in window_sets}
    with threadpool_limits(int(os.environ.get("GRACEQ_RETRO_THREADS", "0")) or None):
        base = make_settings(pool_path, unit, min(window_sets), n_init, n_batch, seed, on_bad_molecule)
        features = campaign_features(pool, base, cache_dir)
        for name in methods:
            if name == "greedy_predicted_energy":
                settings = make_settings(pool_path, unit, max(window_sets), n_init, n_batch, seed, on_bad_molecule,
                                         **CAMPAIGN_METHODS[name])
                every = np.unique(np.concatenate(list(window_sets.values())))
                t = time.perf_counter()
                trace = run_campaign(pool, features, settings,
                                     stop_when=lambda tr: calls_to_full_recall(tr.order, every) is not None)
                for window, window_set in window_sets.items():
                    out[window][name] = {"calls_to_full_recall": calls_to_full_recall(
                        trace.order, window_set, trace.checkpoints), "seed": seed,
                        "time_s": round(time.perf_counter() - t, 1),
                        "calls_history": [c for c, _ in trace.checkpoints],
                        "missed_history": missed_history(trace, window_set)}
                    print(f"seed {seed} window {window} {name}: full recall "
                          f"{out[window][name]['calls_to_full_recall']}", file=sys.stderr, flush=True)
                continue
            for window, window_set in window_sets.items():
                settings = make_settings(pool_path, unit, window, n_init, n_batch, seed, on_bad_molecule,
                                         **CAMPAIGN_METHODS[name])
                out[window][name] = dict(run_method(pool, features, window_set, settings), seed=seed)
                fig = out[window][name]
                print(f"seed {seed} window {window} {name}: full recall {fig['calls_to_full_recall']}, stop "
                      f"{fig['calls_at_stop']} (recall {fig['recall_at_stop']}, stated risk "
                      f"{fig['stated_risk_at_stop']}), {fig['time_s']} s", file=sys.stderr, flush=True)
    return out


def benchmark(pool_path: str, windows: list[float], unit: str, seeds: list[int], n_init: int, n_batch: int,
              cache_dir: Path, progress=print, on_bad_molecule: str = "error", jobs: int = 1,
              methods=DEFAULT_METHODS) -> dict:
    """All the figures of the benchmark, one JSON-ready dict per window."""
    from joblib import Parallel, delayed

    started = time.perf_counter()
    pool = load_pool(pool_path, unit, on_bad_molecule)
    window_sets = {w: pool.window_structures(w) for w in windows}
    if jobs > 1:
        os.environ.setdefault("GRACEQ_RETRO_THREADS", "1")
    runs = Parallel(n_jobs=jobs, verbose=0)(
        delayed(_seed_runs)(pool, pool_path, window_sets, unit, n_init, n_batch, seed, cache_dir,
                            on_bad_molecule, methods) for seed in seeds)
    ff_order = np.argsort(pool.energy_ff_mol, kind="stable")
    first = make_settings(pool_path, unit, windows[0], n_init, n_batch, seeds[0], on_bad_molecule)
    descriptor = campaign_features(pool, first, cache_dir)
    fps_order = cp.initial_batch(descriptor, pool.energy_ff_mol, len(pool))
    results = {}
    for window, window_set in window_sets.items():
        per_method = {name: [r[window][name] for r in runs] for name in methods}
        result = {name: summarise(v) for name, v in per_method.items()}
        result["force_field_order"] = {"calls_to_full_recall": calls_to_full_recall(ff_order.tolist(), window_set),
                                       "missed_history": missed_curve(ff_order, window_set)}
        result["fps_only"] = {"calls_to_full_recall": calls_to_full_recall(list(map(int, fps_order)), window_set),
                              "missed_history": missed_curve(fps_order, window_set),
                              "committee_seed": seeds[0]}
        randoms = [calls_to_full_recall(np.random.default_rng(s).permutation(len(pool)).tolist(), window_set)
                   for s in seeds]
        result["random_order"] = {"calls_to_full_recall": _mean(randoms), "per_seed": randoms}
        g = result.get("graceq", {"calls_to_full_recall": None, "per_seed": []})
        ff_full = result["force_field_order"]["calls_to_full_recall"]
        loses = []
        for k, r in enumerate(g["per_seed"]):
            greedy = per_method["greedy_predicted_energy"][k]["calls_to_full_recall"] if "greedy_predicted_energy" in per_method else None
            if r["calls_to_full_recall"] is None or r["calls_to_full_recall"] > ff_full or (
                    greedy is not None and r["calls_to_full_recall"] > greedy):
                loses.append({"seed": r["seed"], "graceq": r["calls_to_full_recall"], "force_field_order": ff_full,
                              "greedy": greedy})
        checks = {}
        for name in ("graceq", "seed_recipe", "graceq_force_field_feature"):
            if name in per_method:
                rs = per_method[name]
                checks[name] = {
                    "early_stops": [r["seed"] for r in rs if r["recall_at_stop"] is not None and r["recall_at_stop"] < 1],
                    "observed_missed_total": int(sum(r["missed_at_stop"] or 0 for r in rs)),
                    "runs_with_a_miss": int(sum(1 for r in rs if (r["missed_at_stop"] or 0) > 0)),
                    "stated_risk_total": round(float(sum(r["stated_risk_at_stop"] or 0 for r in rs)), 4),
                    "stop_over_full_recall": (None if not result[name]["calls_at_stop"] or not result[name]["calls_to_full_recall"]
                                              else round(result[name]["calls_at_stop"] / result[name]["calls_to_full_recall"], 3)),
                }
        campaign_runs = [r for name in ("graceq", "seed_recipe") if name in per_method for r in per_method[name]]
        results[str(window)] = {
            "window": window,
            "n_window_structures": len(window_set),
            "stop_floor": stop_floor(pool, cp.model_inputs(descriptor, pool.energy_ff_mol, first.model), window),
            **({"stop_floor_force_field_feature": stop_floor(pool, cp.model_inputs(
                descriptor, pool.energy_ff_mol, first.model.model_copy(update={"force_field_feature": True})), window)}
               if "graceq_force_field_feature" in methods else {}),
            "methods": result,
            "calls_saved_vs_force_field_at_full_recall": (
                None if g["calls_to_full_recall"] is None else round(ff_full - g["calls_to_full_recall"], 2)),
            "graceq_loses_to_a_baseline": loses,
            "checks": checks,
            "calibration": calibration(campaign_runs),
        }
        progress(f"window {window}: {json.dumps({k: v for k, v in results[str(window)].items() if k != 'methods'})}")
    return {
        "pool": str(pool_path),
        "n_pool": len(pool),
        "n_unstable": int((~pool.stable).sum()),
        "n_dropped_bad_molecules": pool.n_dropped,
        "unit": unit,
        "energy_basis": "per molecule",
        "n_init": n_init,
        "n_batch": n_batch,
        "seeds": seeds,
        "windows": results,
        "notes": (
            f"n_init {n_init}, n_batch {n_batch}; campaigns in-process with graceq.campaign decisions, continued "
            "past their stop to full recall; graceq, seed_recipe and greedy pay whole batches; stated risk = the "
            "expected number of window structures unmeasured at the stop (bounds P(at least one missed))"),
        "timing_s": round(time.perf_counter() - started, 1),
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
    trace = run_campaign(pool, features, settings, max_iterations=len(stored))
    mine = trace.order + trace.next_picks
    return {
        "campaign": str(root.resolve()),
        "iterations_compared": len(stored),
        "picks_compared": len(picks),
        "same_features": same_features,
        "same_picks": mine == picks,
        "first_difference": next((k for k, (a, b) in enumerate(zip(mine, picks)) if a != b), None),
        "p_conv": [[round(s.p_conv, 6) for _, s in trace.checkpoints], [round(s["p_conv"], 6) for s in stored]],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default=default_pool(), help="extxyz pool with energy_ff and energy_ref")
    parser.add_argument("--window", type=float, nargs="+", default=[5.0],
                        help="energy window(s) per molecule, in --unit (several: one pool load, one feature set per seed)")
    parser.add_argument("--unit", default="kJ/mol")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-init", type=int, default=20)
    parser.add_argument("--n-batch", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(CAMPAIGN_METHODS),
                        help="campaign methods to run (the ordered baselines need no campaign and always run)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (one BLAS thread each)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "graceq-retro-cache"),
                        help="folder for cached features")
    parser.add_argument("--on-bad-molecule", choices=("error", "skip"), default="error",
                        help="skip: drop structures with broken molecules, as the campaign setting does")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--plot", metavar="PNG", help="also draw the unmeasured window structures against calls")
    parser.add_argument("--from-json", metavar="FILE", help="instead of running: draw --plot from a saved JSON output")
    parser.add_argument("--check-campaign", metavar="DIR",
                        help="instead: replay the finished iterations of the campaign in DIR and compare picks")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot PNG")
        print(plot(json.loads(Path(args.from_json).read_text()), args.plot))
        return
    if args.check_campaign:
        print(json.dumps(check_campaign(args.check_campaign, Path(args.cache))))
        return
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    out = benchmark(args.pool, args.window, args.unit, args.seeds, args.n_init, args.n_batch, Path(args.cache),
                    progress=say, on_bad_molecule=args.on_bad_molecule, jobs=args.jobs, methods=args.methods)
    if len(args.window) == 1:  # one window: its figures at the top level (methods.graceq ...)
        out.update(out.pop("windows")[str(args.window[0])])
    print(json.dumps(out, indent=None if args.json else 1))
    if args.plot:
        say(f"figure: {plot(out, args.plot)}")


if __name__ == "__main__":
    main()
