"""The stated risk as the largest over the whole likelihood region of the error law
(``convergence.region_expected_missed``), against a brute-force reference: every point of a dense
grid of laws (df, scale, noise[, kappa]) whose log-likelihood, by scipy.stats.t, is within
chi2_1(0.95) / 2 of the maximum (found by scipy from several starts), its risk summed by
scipy.stats.t.cdf. The function's law must be inside that region, its risk the direct sum, and at
least the grid's largest; and on errors whose noise grows with the height, it must state more than
the laws along the df path do (the failure that motivated it)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from graceq import convergence as conv

CUT = stats.chi2.ppf(0.95, 1) / 2.0


def _loglik(df, a, noise, kappa, r, s, h):
    w = np.sqrt((a * s) ** 2 + noise ** 2 + (kappa * h) ** 2)
    return float(np.sum(stats.t.logpdf(r, df, scale=w)))


def _risk(df, a, noise, kappa, mu, sp, hu, threshold):
    w = np.sqrt((a * sp) ** 2 + noise ** 2 + (kappa * hu) ** 2)
    return float(np.sum(stats.t.cdf((threshold - mu) / w, df)))


def _max_loglik(r, s, h, with_kappa):
    """Reference maximum likelihood: Nelder-Mead from a spread of starts in (log df, log a, noise, kappa)."""
    best = -np.inf
    for df0 in (2.0, 5.0, 30.0):
        for noise0 in (0.1, 1.0):
            x0 = [np.log(df0), 0.0, noise0] + ([0.02] if with_kappa else [])

            def minus(x):
                kappa = abs(x[3]) if with_kappa else 0.0
                return -_loglik(np.exp(np.clip(x[0], 0, np.log(1000))), np.exp(x[1]), abs(x[2]), kappa, r, s, h)
            fit = optimize.minimize(minus, x0, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-9,
                                                                              "maxiter": 20000})
            best = max(best, -fit.fun)
    return best


def _draw(seed, n, kappa, n_free=300):
    """Errors with spreads s (uniform 0.5-3), t noise of 5 df, scale sqrt((1.2 s)^2 + 1 + (kappa h)^2),
    heights h (gamma, mean 18); unmeasured structures above a threshold of 0, as a campaign leaves them."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.5, 3.0, n)
    h = rng.gamma(3.0, 6.0, n) * 0.5                  # the measured structures are the low ones
    r = np.sqrt((1.2 * s) ** 2 + 1.0 + (kappa * h) ** 2) * rng.standard_t(5.0, n)
    mu = rng.uniform(4.0, 30.0, n_free)
    sp = rng.uniform(0.3, 2.0, n_free)
    hu = rng.gamma(3.0, 6.0, n_free) * 1.5            # the unmeasured ones higher
    return r, s, h, mu, sp, hu


def test_the_largest_risk_over_the_region_matches_a_brute_force_grid():
    """The law without heights (``error_law = "spread_and_noise"``): 40 x 40 x 40 grid of (df, scale,
    noise) around the maximum."""
    r, s, h, mu, sp, hu = _draw(0, 80, 0.0)
    h = np.zeros_like(h)
    laws = conv.error_laws(r, s)
    value, law = conv.region_expected_missed(mu, sp, 0.0, laws, (r, s, None))
    top = _max_loglik(r, s, h, False)
    # inside the region, and the stated value is the direct sum at its law
    assert _loglik(law.df, law.scale, law.noise, 0.0, r, s, h) >= top - CUT - 1e-6
    assert value == pytest.approx(_risk(law.df, law.scale, law.noise, 0.0, mu, sp, hu, 0.0), rel=1e-9)
    # never below the laws along the df path
    assert value >= conv.expected_missed(mu, sp, 0.0, laws)[0]
    dfs = np.exp(np.linspace(np.log(1.0), np.log(60.0), 40))
    scales = np.exp(np.linspace(np.log(0.3), np.log(3.0), 40))
    noises = np.linspace(0.0, 3.0, 40)
    grid_best = 0.0
    for df in dfs:
        for a in scales:
            w = np.sqrt((a * s[None, :]) ** 2 + noises[:, None] ** 2)
            ll = np.sum(stats.t.logpdf(r[None, :], df, scale=w), axis=1)
            for noise in noises[ll >= top - CUT]:
                grid_best = max(grid_best, _risk(df, a, noise, 0.0, mu, sp, hu, 0.0))
    assert grid_best > 0
    assert value >= 0.99 * grid_best
    assert value <= 1.25 * grid_best      # the grid's sup is close to the region's


def test_with_heights_the_region_states_more_than_the_df_path_and_matches_the_grid():
    """Errors whose noise grows with the height, measured low, the unmeasured high: the heaviest
    plausible height term with a lighter tail states more than any law of the df path. Reference:
    an 18^4 grid of (df, scale, noise, kappa)."""
    r, s, h, mu, sp, hu = _draw(5, 150, 0.15)
    mu = mu + 16.0                                     # far above the threshold: the tail decides
    laws = conv.error_laws(r, s, height=h)
    path, _ = conv.expected_missed(mu, sp, 0.0, laws, hu)
    value, law = conv.region_expected_missed(mu, sp, 0.0, laws, (r, s, h), height=hu)
    top = _max_loglik(r, s, h, True)
    assert _loglik(law.df, law.scale, law.noise, law.kappa, r, s, h) >= top - CUT - 1e-6
    assert value == pytest.approx(_risk(law.df, law.scale, law.noise, law.kappa, mu, sp, hu, 0.0), rel=1e-9)
    assert value > 1.3 * path
    grid_best = 0.0
    for df in np.exp(np.linspace(np.log(1.5), np.log(60.0), 18)):
        for a in np.exp(np.linspace(np.log(0.5), np.log(2.5), 18)):
            for noise in np.linspace(0.0, 2.5, 18):
                kappas = np.linspace(0.0, 0.5, 18)
                w = np.sqrt((a * s[None, :]) ** 2 + noise ** 2 + (kappas[:, None] * h[None, :]) ** 2)
                ll = np.sum(stats.t.logpdf(r[None, :], df, scale=w), axis=1)
                for kappa in kappas[ll >= top - CUT]:
                    grid_best = max(grid_best, _risk(df, a, noise, kappa, mu, sp, hu, 0.0))
    assert grid_best > path                # the reference sees the same gap
    assert value >= 0.99 * grid_best


def test_the_spread_law_keeps_its_noise_at_zero():
    """``error_law = "spread"``: the region is over df and scale only."""
    r, s, h, mu, sp, hu = _draw(2, 60, 0.0)
    laws = conv.error_laws(r, s, noise=False)
    value, law = conv.region_expected_missed(mu, sp, 0.0, laws, (r, s, None), noise=False)
    assert law.noise == 0.0 and law.kappa == 0.0
    assert value >= conv.expected_missed(mu, sp, 0.0, laws)[0]


def test_a_large_pool_is_searched_on_a_sample_and_summed_whole(monkeypatch):
    """With more unmeasured structures than ``REGION_SAMPLE`` the search sums over a stratified
    sample; the stated value is still the exact sum at the law found, and within 2 % of the search
    over every structure."""
    r, s, h, _, _, _ = _draw(3, 100, 0.0)
    rng = np.random.default_rng(4)
    mu, sp = rng.uniform(4.0, 40.0, 20000), rng.uniform(0.3, 2.0, 20000)
    laws = conv.error_laws(r, s)
    sampled, law = conv.region_expected_missed(mu, sp, 0.0, laws, (r, s, None))
    assert sampled == pytest.approx(float(np.sum(law.p_below(0.0, mu, sp))), rel=1e-12)
    monkeypatch.setattr(conv, "REGION_SAMPLE", 10 ** 6)
    whole, _ = conv.region_expected_missed(mu, sp, 0.0, laws, (r, s, None))
    assert sampled == pytest.approx(whole, rel=0.02)


def test_no_law_no_statement():
    assert conv.region_expected_missed([1.0], [1.0], 0.0, [], (np.zeros(0), np.zeros(0), None)) == (float("inf"), None)


def test_on_a_large_pool_the_df_path_ranked_on_the_sample_keeps_its_exact_maximum():
    """With more unmeasured structures than ``REGION_SAMPLE`` the laws of the df path are ranked on
    the search's sample and only the largest are summed whole: the floor must still be the exact
    maximum over the path (:func:`expected_missed` over every law), and the statement at least it."""
    for seed in range(4):
        r, s, h, _, _, _ = _draw(10 + seed, 600, 0.0)
        rng = np.random.default_rng(seed)
        mu, sp = rng.uniform(2.0, 40.0, 20000), rng.uniform(0.3, 2.0, 20000)
        laws = conv.error_laws(r, s)
        assert len(laws) >= 4
        exact, law = conv.expected_missed(mu, sp, 0.0, laws)
        assert conv._path_maximum_on_sample(mu, sp, 0.0, laws, None)[:2] == (exact, law)
        assert conv.region_expected_missed(mu, sp, 0.0, laws, (r, s, None))[0] >= exact
