"""Convergence of a campaign: how many window structures are still expected (DESIGN.md 6).

Every unlabelled pool structure gets a normal density of its reference energy (mean ``mu``,
std ``sigma``, energy per molecule); their sum is the predicted energy density of the pool.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def _check(mu, sigma):
    mu = np.asarray(mu, dtype=np.float64).ravel()
    sigma = np.asarray(sigma, dtype=np.float64).ravel()
    if mu.shape != sigma.shape:
        raise ValueError(f"mu and sigma differ in length: {mu.shape} vs {sigma.shape}")
    if np.any(sigma < 0) or not np.all(np.isfinite(mu)) or not np.all(np.isfinite(sigma)):
        raise ValueError("predicted energies must be finite and their std >= 0")
    return mu, sigma


def _normal_cdf(x, mu, sigma):
    """P(E <= x) for E ~ N(mu, sigma^2); a step function (E <= x) where sigma == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cdf = ndtr((x - mu) / sigma)
    return np.where(sigma > 0, cdf, (mu <= x).astype(np.float64))


def convergence_state(mu, sigma, measured, best: float, window: float) -> dict:
    """Return the convergence estimate with T = best + window (energies per molecule):

    - ``n_measured``: labelled stable structures with reference energy <= T (``measured``);
    - ``residual``: sum over unlabelled structures of Phi((T - mu_i) / sigma_i), the expected
      number of window structures not found yet (a step function where sigma_i == 0);
    - ``n_expected`` = n_measured + residual;  ``p_conv`` = n_measured / n_expected
      (1.0 when nothing is expected at all);  ``threshold`` = T.
    """
    mu, sigma = _check(mu, sigma)
    measured = np.asarray(measured, dtype=np.float64).ravel()
    if window <= 0:
        raise ValueError(f"the energy window must be > 0, got {window}")
    threshold = float(best) + float(window)
    n_measured = int(np.sum(measured <= threshold))
    residual = float(np.sum(_normal_cdf(threshold, mu, sigma)))
    n_expected = n_measured + residual
    p_conv = 1.0 if n_expected == 0 else n_measured / n_expected
    return {"threshold": threshold, "n_measured": n_measured, "residual": residual,
            "n_expected": float(n_expected), "p_conv": float(p_conv)}


def energy_density(mu, sigma, grid) -> np.ndarray:
    """Return the predicted number of structures per energy unit at each ``grid`` energy: the sum
    of normal densities N(mu_i, sigma_i) (structures with sigma == 0 are left out: a delta)."""
    mu, sigma = _check(mu, sigma)
    grid = np.asarray(grid, dtype=np.float64)
    keep = sigma > 0
    mu, sigma = mu[keep], sigma[keep]
    out = np.zeros(grid.shape)
    flat = out.reshape(-1)
    g = grid.reshape(-1)
    for lo in range(0, len(mu), 4096):      # bounds the (grid, block) temporary
        z = (g[:, None] - mu[None, lo:lo + 4096]) / sigma[None, lo:lo + 4096]
        flat += np.sum(np.exp(-0.5 * z * z) * _INV_SQRT_2PI / sigma[None, lo:lo + 4096], axis=1)
    return out


def cumulative_count(mu, sigma, grid) -> np.ndarray:
    """Return the expected number of structures with energy <= each ``grid`` energy
    (sum of normal CDFs; a step where sigma == 0)."""
    mu, sigma = _check(mu, sigma)
    grid = np.asarray(grid, dtype=np.float64)
    g = grid.reshape(-1)
    out = np.zeros(g.shape)
    for lo in range(0, len(mu), 4096):
        out += np.sum(_normal_cdf(g[:, None], mu[None, lo:lo + 4096], sigma[None, lo:lo + 4096]), axis=1)
    return out.reshape(grid.shape)
