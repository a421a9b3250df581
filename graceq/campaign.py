"""The campaign's decisions, with no I/O: given what has been measured, what next?

The coordinator gathers the state from the store, asks these functions, and persists the answer.
Every decision is a deterministic function of the stored state and the campaign's seed, so a
restarted coordinator makes the same next decision.

Energies: the pool's energies are totals per cell in the campaign unit. The model learns the delta
per atom, ``y = (E_ref - E_ff) / N_atoms``; everything the user reads (window, best, mu, sigma,
EI) is per molecule, ``E_cell / N_atoms * atoms_per_molecule`` (DESIGN.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graceq.acquisition import expected_improvement, kriging_believer
from graceq.config import batch_size
from graceq.convergence import convergence_state
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

    @property
    def energy_ff_mol(self) -> np.ndarray:
        return per_molecule(self.energy_ff, self.n_atoms, self.atoms_per_molecule)

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
class Decision:
    """The outcome of one iteration: its statistics, the pool predictions, and the next batch."""

    stats: dict
    mu: np.ndarray            # predicted reference energy per molecule, every pool structure
    sigma: np.ndarray         # calibrated uncertainty per molecule
    ei: np.ndarray            # EI of every unlabelled structure before the batch (NaN elsewhere)
    picks: np.ndarray         # next batch, in pick order (empty when the campaign stops)
    pick_ei: np.ndarray
    stop: str | None          # "converged", "budget", "pool exhausted" or None


def stop_holds(stats: dict, settings, n_pool: int) -> bool:
    """Whether an iteration's recorded stop still stands under (possibly edited) settings.

    A user who wants a few more batches after p_conv first reached its target raises
    ``p_conv_target`` or ``budget``; the campaign then decides that iteration again and goes on.
    """
    c = settings.campaign
    if stats.get("stop") == "converged":
        return stats["p_conv"] >= c.p_conv_target
    if stats.get("stop") == "budget":
        return stats["n_reference_calls"] >= (c.budget or n_pool)
    return stats.get("stop") is not None


def decide(view: CampaignView, model: CommitteeRidge, features: np.ndarray, settings, iteration: int) -> Decision:
    """Assess the fitted committee, test convergence, and pick the next Kriging-Believer batch."""
    c = settings.campaign
    apm = view.atoms_per_molecule
    e_ff_mol = view.energy_ff_mol
    y_hat, y_sd = model.predict(features, return_std=True)
    mu = e_ff_mol + apm * y_hat
    sigma = apm * y_sd

    stable = view.stable_rows()
    measured = view.reference_mol(stable)
    best = float(measured.min())
    unlabelled = view.unlabelled()
    conv = convergence_state(mu[unlabelled], sigma[unlabelled], measured, best, c.window)
    ei = np.full(len(mu), np.nan)
    ei[unlabelled] = expected_improvement(mu[unlabelled], sigma[unlabelled], best, c.window)

    n_calls = len(view.picks)
    budget = c.budget or len(mu)
    stop = None
    if conv["p_conv"] >= c.p_conv_target:
        stop = "converged"
    elif n_calls >= budget:
        stop = "budget"
    elif len(unlabelled) == 0:
        stop = "pool exhausted"

    picks = np.array([], dtype=int)
    pick_ei = np.array([], dtype=float)
    if stop is None:
        n = min(batch_size(c.n_batch, len(mu)), budget - n_calls, len(unlabelled))
        picks, pick_ei = kriging_believer(
            model, features, unlabelled, best, c.window, n,
            offset=e_ff_mol, scale=apm, method="fast", return_ei=True,
        )
        picks = np.asarray(picks, dtype=int)
        pick_ei = np.asarray(pick_ei, dtype=float)

    stats = {
        "iteration": iteration,
        "n_labelled": int(len(stable)),
        "n_train": int(len(model.y_train_)),
        "n_reference_calls": int(n_calls),
        "n_unstable": view.count("unstable"),
        "n_failed": view.count("failed"),
        "lambda": float(model.alpha_),
        "alpha": float(model.calibration_),
        "calibration_warning": getattr(model, "calibration_warning_", None),
        "test_rmse": float(model.test_rmse_) * apm,
        "best": best,
        "n_measured": int(conv["n_measured"]),
        "n_expected": float(conv["n_expected"]),
        "residual": float(conv["residual"]),
        "p_conv": float(conv["p_conv"]),
        "max_ei": float(np.nanmax(ei)) if len(unlabelled) else 0.0,
        "n_next": int(len(picks)),
        "stop": stop,
    }
    return Decision(stats, mu, sigma, ei, picks, pick_ei, stop)
