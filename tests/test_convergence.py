"""Convergence estimate against direct sums with scipy.stats.norm."""

import numpy as np
import pytest
from scipy.stats import norm

from graceq.convergence import convergence_state, cumulative_count, energy_density


def pool(seed=0, n=300):
    rng = np.random.default_rng(seed)
    mu = rng.normal(10.0, 6.0, n)
    sigma = rng.uniform(0.2, 3.0, n)
    sigma[:5] = 0.0                                     # exactly known structures
    return mu, sigma


def test_convergence_state_equals_direct_sum():
    mu, sigma = pool()
    measured = np.array([-1.0, 0.5, 2.0, 4.9, 5.1, 30.0])
    best, window = -1.0, 6.0
    T = best + window
    residual = 0.0
    for m, s in zip(mu, sigma):
        residual += (1.0 if m <= T else 0.0) if s == 0 else norm.cdf(T, loc=m, scale=s)
    n_measured = sum(1 for e in measured if e <= T)
    state = convergence_state(mu, sigma, measured, best, window)
    assert state["threshold"] == T
    assert state["n_measured"] == n_measured == 4
    assert state["residual"] == pytest.approx(residual, rel=1e-12)
    assert state["n_expected"] == pytest.approx(n_measured + residual, rel=1e-12)
    assert state["p_conv"] == pytest.approx(n_measured / (n_measured + residual), rel=1e-12)


def test_convergence_step_function_and_empty_pool():
    state = convergence_state([1.0, 3.0], [0.0, 0.0], [0.0], 0.0, 2.0)
    assert state["residual"] == 1.0 and state["n_expected"] == 2.0 and state["p_conv"] == 0.5
    state = convergence_state([], [], [0.0, 1.0], 0.0, 2.0)
    assert state["residual"] == 0.0 and state["p_conv"] == 1.0
    state = convergence_state([], [], [], 0.0, 2.0)
    assert state["p_conv"] == 1.0
    with pytest.raises(ValueError, match="window"):
        convergence_state([1.0], [1.0], [], 0.0, 0.0)
    with pytest.raises(ValueError, match="std"):
        convergence_state([1.0], [-1.0], [], 0.0, 1.0)


def test_energy_density_and_cumulative_count_equal_direct_sums():
    mu, sigma = pool(1, 50)
    grid = np.linspace(-20, 40, 37)
    density = np.array([sum(norm.pdf(g, m, s) for m, s in zip(mu, sigma) if s > 0) for g in grid])
    count = np.array([sum(((m <= g) * 1.0 if s == 0 else norm.cdf(g, m, s))
                          for m, s in zip(mu, sigma)) for g in grid])
    np.testing.assert_allclose(energy_density(mu, sigma, grid), density, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(cumulative_count(mu, sigma, grid), count, rtol=1e-12)


def test_energy_density_integrates_to_the_number_of_structures():
    mu, sigma = pool(2, 40)
    grid = np.linspace(-60, 80, 20001)
    total = np.trapezoid(energy_density(mu, sigma, grid), grid)
    assert total == pytest.approx(np.sum(sigma > 0), rel=1e-6)
    assert cumulative_count(mu, sigma, grid)[-1] == pytest.approx(40, rel=1e-9)
