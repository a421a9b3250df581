"""The campaign's decisions, with no I/O: given what has been measured, what next?

The coordinator gathers the state from the store, asks these functions, and persists the answer.
Every decision is a deterministic function of the stored state and the campaign's seed, so a
restarted coordinator makes the same next decision.

Energies: the pool's energies are totals per cell in the campaign unit. The model learns the delta
per atom, ``y = (E_ref - E_ff) / N_atoms``; everything the user reads (window, best, mu, sigma,
EI) is per molecule, ``E_cell / N_atoms * atoms_per_molecule`` (DESIGN.md section 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from graceq.acquisition import expected_improvement, kriging_believer
from graceq.config import batch_size
from graceq.convergence import (
    MIN_PROSPECTIVE, ErrorLaw, best_forecaster, convergence_state, error_laws, expected_missed, prospective_errors,
    region_expected_missed,
)
from graceq.model import CommitteeRidge, chronological_split
from graceq.selection import farthest_point_sampling

STABLE = "converged"


class CampaignError(RuntimeError):
    """The campaign cannot go on as set up; the message says why and what to change."""


def per_molecule(energy_cell, n_atoms, atoms_per_molecule: int) -> np.ndarray:
    """Energy per molecule from a total per cell (same unit): E_cell / N_atoms * atoms_per_molecule."""
    return np.asarray(energy_cell, dtype=float) / np.asarray(n_atoms, dtype=float) * atoms_per_molecule


@dataclass
class CampaignView:
    """What the campaign knows at one moment: the pool, the picks in sampling order, the results."""

    n_atoms: np.ndarray                  # atoms per cell, one per pool structure
    energy_ff: np.ndarray                # force-field energy, total per cell, campaign unit
    atoms_per_molecule: int
    picks: list[int]                     # pool indices in the order they were sampled
    results: dict[int, tuple[str, float | None]] = field(default_factory=dict)  # idx -> (status, E_ref per cell)
    # idx -> (mu, raw committee spread) per molecule, predicted before the structure was measured
    # (picks of the initial batch have none): the prospective errors the stop rule is fitted on
    predictions: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def energy_ff_mol(self) -> np.ndarray:
        return per_molecule(self.energy_ff, self.n_atoms, self.atoms_per_molecule)

    @property
    def height(self) -> np.ndarray:
        """Force-field energy per molecule above the pool's lowest (>= 0): where the error law's
        noise may grow (``error_law = "spread_noise_height"``)."""
        e = self.energy_ff_mol
        return e - e.min()

    def stable_rows(self) -> np.ndarray:
        """Labelled structures whose reference minimisation converged, in sampling order."""
        return np.array([i for i in self.picks if self.results.get(i, ("", None))[0] == STABLE], dtype=int)

    def reference_mol(self, rows: np.ndarray) -> np.ndarray:
        return per_molecule([self.results[i][1] for i in rows], self.n_atoms[rows], self.atoms_per_molecule)

    def delta_per_atom(self, rows: np.ndarray) -> np.ndarray:
        """Model target y = (E_ref - E_ff) / N_atoms (campaign unit per atom)."""
        e_ref = np.array([self.results[i][1] for i in rows], dtype=float)
        return (e_ref - self.energy_ff[rows]) / self.n_atoms[rows]

    def unlabelled(self) -> np.ndarray:
        picked = np.zeros(len(self.n_atoms), dtype=bool)
        picked[self.picks] = True
        return np.flatnonzero(~picked)

    def count(self, status: str) -> int:
        return sum(1 for s, _ in self.results.values() if s == status)

    def prospective_errors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Errors E_ref - mu of the measured stable structures, each from the prediction made before
        it was measured, in sampling order, those predictions' raw spreads and the structures'
        force-field heights (``height``)."""
        rows = np.array([i for i in self.stable_rows() if int(i) in self.predictions], dtype=int)
        if len(rows) == 0:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        mu, spread = np.array([self.predictions[int(i)] for i in rows], dtype=float).T
        return prospective_errors(self.reference_mol(rows), mu, spread, self.height[rows])

    def forecasts(self) -> tuple[np.ndarray, dict]:
        """The measured stable structures' reference energies per molecule and, for each, three
        forecasts made before it was measured (``graceq.convergence.FORECASTERS``), as
        name -> (loc, scale): the committee (mean, raw spread), its mean with one scale for all,
        and the force field shifted by the median E_ref - E_ff of the structures measured before
        it in sampling order (the cheap level's own ranking). The most recent half of them, or all
        while fewer than ``2 MIN_PROSPECTIVE`` (the committee learns: old forecasts are not its own)."""
        stable = self.stable_rows()
        e_all = self.reference_mol(stable) if len(stable) else np.zeros(0)
        delta = e_all - self.energy_ff_mol[stable] if len(stable) else np.zeros(0)
        keep = [k for k, i in enumerate(stable) if int(i) in self.predictions and k > 0]
        keep = keep[len(keep) // 2:] if len(keep) // 2 >= MIN_PROSPECTIVE else keep
        if not keep:
            return np.zeros(0), {}
        rows = stable[keep]
        mu, spread = np.array([self.predictions[int(i)] for i in rows], dtype=float).T
        shift = np.array([np.median(delta[:k]) for k in keep])
        ones = np.ones(len(rows))
        return e_all[keep], {"committee": (mu, spread), "committee_mean": (mu, ones),
                             "force_field": (self.energy_ff_mol[rows] + shift, ones)}


def prospective_predictions(pick_table, iterations, lag: int = 1) -> dict[int, tuple[float, float]]:
    """idx -> (mu, raw spread) at the moment each structure was picked, from the store's rows.

    ``pick_table``: (idx, iteration, rank, ei, mu, sigma) rows (sigma calibrated, per molecule);
    ``iterations``: the stored statistics. The picks stored under iteration k were decided by the
    record k - ``lag`` (batch rounds: iteration k-1 picks batch k, lag 1; asynchronous mode:
    decision n stores its picks under n, lag 0), whose calibration factor turns the stored sigma
    back into the committee's raw spread.
    """
    calibration = {int(s["iteration"]): s.get("calibration", s.get("alpha")) for s in iterations}
    out = {}
    for idx, iteration, _rank, _ei, mu, sigma in pick_table:
        factor = calibration.get(int(iteration) - lag)
        if mu is not None and sigma is not None and factor:
            out[int(idx)] = (float(mu), float(sigma) / float(factor))
    return out


#: Total variance of the force-field column of the model's inputs, as a multiple of the
#: descriptor's total variance: 1, block scaling (see :func:`model_inputs`).
FORCE_FIELD_WEIGHT = 1.0


def model_inputs(descriptor: np.ndarray, energy_ff_mol: np.ndarray, model_settings) -> np.ndarray:
    """What the delta model regresses on: the descriptor and, with ``force_field_feature``, one
    more column, the force-field energy of each structure.

    Why. The delta ``E_ref - E_ff`` holds a part proportional to ``E_ff`` itself wherever the two
    levels disagree on the energy scale: a force field that over-binds some packings spreads its
    minima over a range the reference does not have (then ``E_ref - E_ff ~ -b (E_ff - E_0)``,
    ``0 < b < 1``; on ROY-264 the delta's correlation with ``E_ff`` is -0.95). A descriptor of the
    local environments cannot express a term in the force-field energy, which it does not see; it
    learns it only from the deltas of neighbours, and extrapolates it badly to structures whose
    force-field energy lies far from theirs. With ``E_ff`` as an input the ridge is the usual
    delta-learning model ``E_ref = a E_ff + c + f(SOAP)``; the acquisition's force-field
    forecaster (``E_ff`` plus a shift) is its special case ``a = 1, f = 0``.

    Scale. The column is the pool's ``E_ff`` per molecule, standardised over the pool, times
    ``sqrt(FORCE_FIELD_WEIGHT * total variance of the descriptor)``: block scaling, the usual
    convention when two blocks of inputs share one ridge penalty (each block carries the same
    total variance, so neither dominates the penalty). Cross-validated errors on the bundled
    pools change by less than 0.5 % from a weight of 1 to 100 (benchmarks/README.md).
    The column depends on the pool alone, never on results, so a resumed campaign rebuilds it
    exactly. The descriptor itself, not these inputs, measures diversity (farthest-point sampling).
    """
    descriptor = np.asarray(descriptor, dtype=np.float64)
    if not model_settings.force_field_feature:
        return descriptor
    e = np.asarray(energy_ff_mol, dtype=np.float64)
    sd = float(e.std())
    if not np.isfinite(sd) or sd == 0.0:  # one force-field energy for all: nothing to learn from it
        column = np.zeros(len(e))
    else:
        column = (e - e.mean()) / sd * np.sqrt(FORCE_FIELD_WEIGHT * descriptor.var(axis=0).sum())
    return np.hstack([descriptor, column[:, None]])


def initial_batch(features: np.ndarray, energy_ff_mol: np.ndarray, n_init: int) -> np.ndarray:
    """Farthest point sampling of n_init structures, starting from the lowest force-field energy."""
    n = min(n_init, len(features))
    return np.asarray(farthest_point_sampling(features, n, int(np.argmin(energy_ff_mol))), dtype=int)


def committee_seed(seed: int, iteration: int) -> int:
    """The committee's random_state at one iteration: a pure function of the campaign seed."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


@dataclass
class CommitteePlan:
    """What the fit tasks need: training rows and targets, held-out rows, member subsets."""

    train_rows: np.ndarray
    y_train: np.ndarray
    test_rows: np.ndarray
    y_test: np.ndarray
    subsets: np.ndarray
    params: dict


def assemble_committee(plan: CommitteePlan, features: np.ndarray, ridge_lambda: float,
                       coef: np.ndarray, intercept: np.ndarray) -> CommitteeRidge:
    """The iteration's calibrated committee from members fitted elsewhere (the `fit` tasks, or
    in-process in the retrospective benchmark): one assembly for both."""
    model = CommitteeRidge.from_members(
        features[plan.train_rows], plan.y_train, ridge_lambda, plan.subsets, coef, intercept, **plan.params,
    )
    return model.calibrate(features[plan.test_rows], plan.y_test)


def plan_committee(view: CampaignView, model_settings, seed: int, iteration: int) -> CommitteePlan:
    """Chronological 80/20 split of the stable labelled structures and the members' subsets."""
    rows = view.stable_rows()
    y = view.delta_per_atom(rows)
    try:
        train, test = chronological_split(len(rows), model_settings.train_fraction, model_settings.cv)
    except ValueError as exc:
        raise CampaignError(
            f"only {len(rows)} of the {len(view.picks)} structures sent to the reference level converged "
            f"({view.count('unstable')} unstable, {view.count('failed')} failed): too few to fit the "
            f"committee ({exc}). Raise n_init, or check the engine's messages in results/."
        ) from None
    params = dict(
        n_members=model_settings.n_members,
        subsample=model_settings.subsample,
        alphas=np.asarray(model_settings.alphas, dtype=float),
        cv=model_settings.cv,
        random_state=committee_seed(seed, iteration),
    )
    subsets = CommitteeRidge(**params).draw_subsets(len(train))
    return CommitteePlan(rows[train], y[train], rows[test], y[test], subsets, params)


@dataclass
class IterationStats:
    """What one iteration measured and decided (stored as JSON in the iterations table).

    Energies per molecule in the campaign unit. ``ridge_lambda`` is the ridge regulariser chosen by
    cross-validation, ``calibration`` the committee's calibration factor (DESIGN.md 3): never both
    called alpha. ``risk`` is the stated risk: the expected number of window structures still
    unmeasured, which bounds P(at least one is missed), under the least favourable law of the
    model's errors that the prospective errors leave plausible at ``risk_confidence`` (inf while
    fewer than ``graceq.convergence.MIN_PROSPECTIVE`` prospective errors exist);
    ``error_law_df``, ``error_law_scale``, ``error_law_noise`` (energy per molecule) and
    ``error_law_kappa`` (the noise's growth per unit of force-field height) are that law's
    (graceq.convergence).
    """

    iteration: int
    n_labelled: int
    n_train: int
    n_reference_calls: int
    n_unstable: int
    n_failed: int
    ridge_lambda: float
    calibration: float
    calibration_warning: str | None
    test_rmse: float
    best: float
    n_measured: int
    n_expected: float
    residual: float
    p_conv: float
    risk: float
    risk_confidence: float
    error_law_df: float | None
    error_law_scale: float | None
    n_prospective: int
    stop_rule: str
    acquisition: str
    max_ei: float
    n_next: int
    stop: str | None
    n_pending: int = 0          # asynchronous mode: jobs in flight when the decision was made
    forecaster: str | None = None   # p_window: the forecaster whose ranking picked the batch
    error_law_noise: float | None = None    # the law's noise, energy per molecule (None: records before it)
    n_trimmed: int = 0          # batch mode: picks left out of the batch, the stop not needing them (trim_last_batch)
    error_law_kappa: float | None = None    # how the law's noise grows with the force-field height (energy / energy)

    def to_json(self) -> dict:
        out = asdict(self)
        out["risk"] = None if not np.isfinite(self.risk) else self.risk   # JSON has no inf
        return out

    @classmethod
    def from_json(cls, d: dict) -> "IterationStats":
        """From a stored record (records written before the stated risk get risk inf)."""
        names = {f.name for f in fields(cls)}
        d = dict(d)
        d.setdefault("ridge_lambda", d.get("lambda"))
        d.setdefault("calibration", d.get("alpha"))
        d["risk"] = float("inf") if d.get("risk") is None else d["risk"]
        for key, default in (("risk_confidence", 0.95), ("error_law_df", None), ("error_law_scale", None),
                             ("n_prospective", 0),
                             ("stop_rule", "p_conv"), ("acquisition", "ei")):
            d.setdefault(key, default)
        return cls(**{k: v for k, v in d.items() if k in names})

    def error_law(self) -> ErrorLaw | None:
        """The law the risk was stated in (None while no risk is stated)."""
        if self.error_law_df is None or not np.isfinite(self.risk):
            return None
        return ErrorLaw(df=self.error_law_df, scale=self.error_law_scale, n=self.n_prospective,
                        noise=self.error_law_noise or 0.0, kappa=self.error_law_kappa or 0.0)


def risk_statement(stats: dict, target: float | None = None, unit: str = "") -> str:
    """The stated risk of an iteration's record in words (what `graceq status`, the report and
    the coordinator print); ``unit`` the campaign's energy unit (the law's noise is in it)."""
    record = IterationStats.from_json(stats)
    if not np.isfinite(record.risk):
        return (f"no risk stated yet: {record.n_prospective} of the {MIN_PROSPECTIVE} prospective errors "
                "it is fitted on")
    law = f"t law, df {record.error_law_df:.3g}" if record.error_law_df < 999 else "normal law"
    if record.error_law_noise:
        law += f", noise {record.error_law_noise:.3g}{' ' + unit if unit else ''} per molecule"
    if record.error_law_kappa:
        law += f" and {record.error_law_kappa:.3g} per unit of force-field height"
    goal = "" if target is None else f" (stop at <= {target:g})"
    return (f"P(a window structure is missed) <= {record.risk:.3g}{goal}, with {record.risk_confidence:.0%} "
            f"confidence in the error law ({law}, fitted on {record.n_prospective} prospective predictions)")


@dataclass
class Decision:
    """The outcome of one iteration: its statistics, the pool predictions, and the next batch."""

    stats: IterationStats
    mu: np.ndarray            # predicted reference energy per molecule, every pool structure
    sigma: np.ndarray         # calibrated uncertainty per molecule
    ei: np.ndarray            # EI of every unlabelled structure before the batch (NaN elsewhere)
    picks: np.ndarray         # next batch, in pick order (empty when the campaign stops)
    pick_ei: np.ndarray
    stop: str | None          # "converged", "budget", "pool exhausted" or None


def stop_reached(stats: IterationStats, campaign_settings) -> bool:
    """Whether the statistics meet the campaign's stopping rule (not the budget or the pool)."""
    if campaign_settings.stop_rule == "p_conv":
        return stats.p_conv >= campaign_settings.p_conv_target
    return stats.risk <= campaign_settings.risk


def stop_holds(stats: dict, settings, n_pool: int) -> bool:
    """Whether an iteration's recorded stop still stands under (possibly edited) settings.

    A user who wants a few more batches after the stop lowers ``risk`` (or raises
    ``p_conv_target``, or ``budget``); the campaign then decides that iteration again and goes on.
    """
    c = settings.campaign
    record = IterationStats.from_json(stats)
    if record.stop == "converged":
        return stop_reached(record, c)
    if record.stop == "budget":
        return record.n_reference_calls >= (c.budget or n_pool)
    return record.stop is not None


# The acquisitions whose later picks in a batch come from a committee that believes the earlier
# ones: members are refitted on candidate rows, so their weights leave the span of the measured rows.
BELIEVES_WITHIN_BATCH = frozenset({"ei"})


def _acquire(name: str, model, features, view: CampaignView, unlabelled, mu, gap, ei, best, window, n,
             spread=None, law=None):
    """The next n picks, their EI, and the forecaster that ranked them.

    ``p_window`` takes the n structures most likely to lie in the window: the expected number of
    window structures a batch finds is the sum of its members' probabilities, so the top n
    maximise it. The probability is that of the forecaster of the reference energy that has
    forecast the measured structures best so far (``graceq.convergence.best_forecaster``): the
    committee (its probability under ``law``, the error law the stop is stated in, of raw
    ``spread``; the standardised gap (T - mu) / spread when the law has no noise), its mean alone
    (rank by mu), or the force field (rank by E_ff). Where the committee's spread says nothing
    about its errors, or the cheap level already ranks better than the model, the campaign sees
    it in its own measurements and exploits that ranking; until ``MIN_PROSPECTIVE`` forecasts
    exist it ranks by the committee. ``greedy``: the n lowest predicted energies; ``ei``: the
    Kriging-Believer batch.
    """
    if name == "ei":
        picks, pick_ei = kriging_believer(
            model, features, unlabelled, best, window, n,
            offset=view.energy_ff_mol, scale=view.atoms_per_molecule, method="fast", return_ei=True,
        )
        return np.asarray(picks, dtype=int), np.asarray(pick_ei, dtype=float), None
    forecaster = None
    if name == "greedy":
        order = np.argsort(mu[unlabelled], kind="stable")
    else:
        energy, forecasts = view.forecasts()
        forecaster = (best_forecaster(energy, forecasts)[0] if forecasts else None) or "committee"
        if forecaster == "committee" and law is not None and (law.noise > 0 or law.kappa > 0):
            # the probabilities the stop is stated in (ties, where they round to 0 or 1: by the gap)
            p = law.p_below(best + window, mu[unlabelled], spread[unlabelled], view.height[unlabelled])
            order = np.lexsort((-gap[unlabelled], -p))
        else:
            key = {"committee": lambda: -gap[unlabelled], "committee_mean": lambda: mu[unlabelled],
                   "force_field": lambda: view.energy_ff_mol[unlabelled]}[forecaster]()
            order = np.argsort(key, kind="stable")
    picks = unlabelled[order[:n]]
    return picks.astype(int), ei[picks], forecaster


def picks_the_stop_needs(risk: float, p_picks, target: float) -> int:
    """How many of a batch's picks (in pick order) the stop needs: the fewest k >= 1 after which the
    stated risk of the structures left, if the first k picks come back as predicted, is at most
    ``target``: ``risk - sum_{j<k} p_j <= target``, ``p_j`` pick j's probability of the window under
    the law the risk is stated in; all of them when no prefix gets there.

    The argument: the stop is tested after each batch on the unmeasured structures' summed
    probability of the window. Once the first k picks would bring that sum to ``target``, the picks
    after them hold at most ``target`` expected window structures between them (their probabilities
    are part of the sum left), so sending them spends calls that neither the stop nor the search
    needs. If the k come back other than predicted (a window structure, a heavier error law), the
    rule does not fire and the next batch goes on: the trim costs a round of wall time, never a
    structure.
    """
    p = np.asarray(p_picks, dtype=np.float64)
    if len(p) == 0:
        return 0
    enough = np.flatnonzero(risk - np.cumsum(p) <= target)
    return int(enough[0]) + 1 if len(enough) else len(p)


def decide(view: CampaignView, model: CommitteeRidge, features: np.ndarray, settings, iteration: int,
           pick: bool = True, law: ErrorLaw | None = None) -> Decision:
    """Assess the fitted committee, state the risk, test the stop, and pick the next batch
    (``pick`` False: the assessment and the stop only, no picks; ``stats.n_next`` is then 0).

    ``law``: the error law to state the risk in and rank by, instead of the largest over the
    likelihood region of the prospective errors (an asynchronous decision's picks reuse the law
    its check, on the same errors, found: :func:`graceq.steering.decide_on_arrival`)."""
    c = settings.campaign
    apm = view.atoms_per_molecule
    e_ff_mol = view.energy_ff_mol
    y_hat, y_sd = model.predict(features, return_std=True)
    mu = e_ff_mol + apm * y_hat
    sigma = apm * y_sd
    spread = sigma / model.calibration_      # the committee's raw spread, per molecule

    stable = view.stable_rows()
    measured = view.reference_mol(stable)
    best = float(measured.min())
    threshold = best + c.window
    unlabelled = view.unlabelled()
    conv = convergence_state(mu[unlabelled], sigma[unlabelled], measured, best, c.window)
    residual, residual_spread, residual_height = view.prospective_errors()
    height = view.height
    with_noise, law_height = c.error_law != "spread", residual_height if c.error_law == "spread_noise_height" else None
    if law is None:
        laws = error_laws(residual, residual_spread, c.risk_confidence, noise=with_noise, height=law_height)
        risk, law = region_expected_missed(mu[unlabelled], spread[unlabelled], threshold, laws,
                                           (residual, residual_spread, law_height), c.risk_confidence,
                                           height[unlabelled], noise=with_noise)
    else:
        risk, _ = expected_missed(mu[unlabelled], spread[unlabelled], threshold, [law], height[unlabelled])
    ei = np.full(len(mu), np.nan)
    ei[unlabelled] = expected_improvement(mu[unlabelled], sigma[unlabelled], best, c.window)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = (threshold - mu) / spread

    stats = IterationStats(
        iteration=iteration,
        n_labelled=int(len(stable)),
        n_train=int(len(model.y_train_)),
        n_reference_calls=int(len(view.picks)),
        n_unstable=view.count("unstable"),
        n_failed=view.count("failed"),
        ridge_lambda=float(model.alpha_),
        calibration=float(model.calibration_),
        calibration_warning=getattr(model, "calibration_warning_", None),
        test_rmse=float(model.test_rmse_) * apm,
        best=best,
        n_measured=int(conv["n_measured"]),
        n_expected=float(conv["n_expected"]),
        residual=float(conv["residual"]),
        p_conv=float(conv["p_conv"]),
        risk=float(risk),
        risk_confidence=float(c.risk_confidence),
        error_law_df=None if law is None else law.df,
        error_law_scale=None if law is None else law.scale,
        error_law_noise=None if law is None else law.noise,
        error_law_kappa=None if law is None else law.kappa,
        n_prospective=len(residual),
        stop_rule=c.stop_rule,
        acquisition=c.acquisition,
        max_ei=float(np.nanmax(ei)) if len(unlabelled) else 0.0,
        n_next=0,
        stop=None,
    )
    budget = c.budget or len(mu)
    if stop_reached(stats, c):
        stats.stop = "converged"
    elif stats.n_reference_calls >= budget:
        stats.stop = "budget"
    elif len(unlabelled) == 0:
        stats.stop = "pool exhausted"

    picks = np.array([], dtype=int)
    pick_ei = np.array([], dtype=float)
    if stats.stop is None and pick:
        n = min(batch_size(c.n_batch, len(mu)), budget - stats.n_reference_calls, len(unlabelled))
        picks, pick_ei, stats.forecaster = _acquire(c.acquisition, model, features, view, unlabelled, mu, gap,
                                                    ei, best, c.window, n, spread, law)
        if c.stop_rule == "risk" and c.mode == "batch" and c.trim_last_batch and law is not None:
            keep = picks_the_stop_needs(risk, law.p_below(threshold, mu[picks], spread[picks], height[picks]), c.risk)
            stats.n_trimmed = int(len(picks) - keep)
            picks, pick_ei = picks[:keep], pick_ei[:keep]
    stats.n_next = int(len(picks))
    return Decision(stats, mu, sigma, ei, picks, pick_ei, stats.stop)
