"""The error law whose noise may grow with the force-field height (``error_law =
"spread_noise_height"``), against direct formulas: its fit is the maximum likelihood over the whole
grid (the coarse-to-fine search against every row), it nests the constant noise, it finds a height
term that is there and none that is not, and a campaign states it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from graceq import campaign as cp
from graceq import convergence as conv


def _draw(seed: int, n: int, kappa: float, noise: float = 1.0, df: float = 5.0):
    """Errors of scale sqrt((1.2 s)^2 + noise^2 + (kappa h)^2), a t law of ``df``; spreads and heights."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.5, 3.0, n)
    h = rng.gamma(3.0, 6.0, n)
    r = np.sqrt((1.2 * s) ** 2 + noise ** 2 + (kappa * h) ** 2) * rng.standard_t(df, n)
    return r, s, h


def _loglik(law: conv.ErrorLaw, r, s, h) -> float:
    """The direct formula: scipy.stats.t.logpdf of the residuals under the law's per-structure scale."""
    width = np.sqrt((law.scale * s) ** 2 + law.noise ** 2 + (law.kappa * h) ** 2)
    return float(np.sum(stats.t.logpdf(r / width, law.df) - np.log(width)))


@pytest.mark.parametrize("seed,kappa", [(0, 0.0), (1, 0.05), (2, 0.2), (3, 0.02)])
def test_the_height_law_is_the_maximum_likelihood_over_the_whole_grid(seed, kappa):
    """The slow, obvious reference: for the maximum-likelihood law's degrees of freedom, every row
    of the noise x height grid, each scale by scipy's bounded scalar search on the t log-likelihood.
    The fit is the grid's best row."""
    r, s, h = _draw(seed, 150, kappa)
    (law,) = conv.error_laws(r, s, confidence=0.0, height=h)
    rho = np.asarray(conv.NOISE_GRID) * np.median(s)
    tau = np.asarray(conv.HEIGHT_GRID) * np.median(s) / np.median(h)
    best = -np.inf
    for noise in rho:
        for slope in tau:
            def minus(a):
                return -_loglik(conv.ErrorLaw(df=law.df, scale=np.exp(a), n=len(r), noise=np.exp(a) * noise,
                                              kappa=np.exp(a) * slope), r, s, h)
            fit = optimize.minimize_scalar(minus, bounds=(-10.0, 10.0), method="bounded", options={"xatol": 1e-9})
            best = max(best, -fit.fun)
    assert _loglik(law, r, s, h) == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("seed,n,kappa", [(9, 120, 0.05), (10, 400, 0.08)])
def test_the_height_terms_plausible_interval_is_in_the_set(seed, n, kappa):
    """The confidence set holds the edges of the height term's interval. Reference: a scan of 300
    height terms (log-spaced), each with the likelihood maximised over the noise grid and the df
    grid (scales by the profile's Newton solve, checked against scipy in test_stop_rule.py); the
    largest and smallest kappa of the set match the scan's plausible interval to its resolution.
    Fails when the height term is profiled at its maximum likelihood alone."""
    r, s, h = _draw(seed, n, kappa)
    laws = conv.error_laws(r, s, height=h)
    noises = np.asarray(conv.NOISE_GRID) * np.median(s)
    dfs = np.asarray(conv.DF_GRID)
    tau_grid = np.asarray(conv.HEIGHT_GRID) * np.median(s) / np.median(h)
    scan = np.exp(np.linspace(np.log(tau_grid[1]), np.log(tau_grid[-1]), 300))

    def best(taus):
        out = []
        for tau in taus:
            w = np.sqrt(s[None, :] ** 2 + noises[:, None] ** 2 + (tau * h[None, :]) ** 2)
            zt = r[None, :] / w
            log_a = conv._log_scales(zt ** 2, dfs)
            ll = (np.sum(stats.t.logpdf(zt[:, None, :] / np.exp(log_a)[:, :, None], dfs[None, :, None]), axis=2)
                  - len(r) * log_a - np.sum(np.log(w), axis=1)[:, None])
            i, d = np.unravel_index(np.argmax(ll), ll.shape)
            out.append((ll[i, d], np.exp(log_a[i, d])))
        return out

    grid_best = max(v for v, _ in best(tau_grid))
    cut = grid_best - stats.chi2.ppf(0.95, 1) / 2
    plausible = [tau * a for tau, (v, a) in zip(scan, best(scan)) if v >= cut]
    kappas = [law.kappa for law in laws]
    step = scan[1] / scan[0]
    assert max(kappas) == pytest.approx(max(plausible), rel=2 * (step - 1))
    if best(scan[:1])[0][0] >= cut:      # plausible down to no height term: the set reaches as low
        assert min(kappas) <= min(plausible) * step
    else:
        assert min(kappas) == pytest.approx(min(plausible), rel=2 * (step - 1))


def test_the_height_law_nests_the_constant_noise_and_finds_the_term_that_is_there():
    """Heights 0 in the grid: the height law's likelihood is never below the constant noise law's. On
    errors drawn without a height term it finds a small one at most; on errors whose noise grows
    by 0.1 per unit of height it finds 0.06-0.16, and the stated risk of high structures grows."""
    r, s, h = _draw(4, 400, 0.0)
    flat = max(conv.error_laws(r, s, confidence=0.0), key=lambda law: _loglik(law, r, s, h))
    (height,) = conv.error_laws(r, s, confidence=0.0, height=h)
    assert _loglik(height, r, s, h) >= _loglik(flat, r, s, h) - 1e-9
    assert height.kappa * np.median(h) < 0.5 * height.noise + 0.5     # no height term to speak of

    r, s, h = _draw(5, 400, 0.1, noise=0.3)
    flat_laws = conv.error_laws(r, s)
    laws = conv.error_laws(r, s, height=h)
    best = max(laws, key=lambda law: _loglik(law, r, s, h))
    assert 0.06 < best.kappa < 0.16
    assert _loglik(best, r, s, h) > max(_loglik(law, r, s, h) for law in flat_laws) + 10   # a real gain
    # far above the threshold and high: the height law states more (the constant noise, fitted on
    # errors mostly of low structures, under-states high ones)
    mu, spread, high = np.full(2000, 40.0), np.full(2000, 1.0), np.full(2000, 60.0)
    assert conv.expected_missed(mu, spread, 5.0, laws, high)[0] > 2 * conv.expected_missed(mu, spread, 5.0, flat_laws)[0]


def test_expected_missed_with_heights_is_the_direct_sum():
    r, s, h = _draw(6, 200, 0.08)
    laws = conv.error_laws(r, s, height=h)
    assert laws and all(law.kappa > 0 for law in laws)
    rng = np.random.default_rng(7)
    mu, spread, height = rng.uniform(-3.0, 40.0, 300), rng.uniform(0.5, 4.0, 300), rng.uniform(0.0, 80.0, 300)
    value, law = conv.expected_missed(mu, spread, 5.0, laws, height)
    direct = [float(np.sum(stats.t.cdf((5.0 - mu) / np.sqrt((lw.scale * spread) ** 2 + lw.noise ** 2
                                                            + (lw.kappa * height) ** 2), lw.df))) for lw in laws]
    assert value == pytest.approx(max(direct), rel=1e-10) and law is laws[int(np.argmax(direct))]
    with pytest.raises(ValueError, match="force-field height"):
        law.p_below(5.0, mu, spread)
    with pytest.raises(ValueError, match=">= 0"):
        conv.error_laws(r, s, height=h - 100.0)


def test_a_campaign_states_the_height_term():
    """The record of a decision carries kappa (and records before it read as 0), and `graceq
    status`'s sentence says it."""
    record = {"iteration": 3, "n_labelled": 80, "n_train": 64, "n_reference_calls": 80, "n_unstable": 0,
              "n_failed": 0, "ridge_lambda": 1e-3, "calibration": 1.4, "calibration_warning": None,
              "test_rmse": 2.0, "best": -1.0, "n_measured": 5, "n_expected": 5.5, "residual": 0.5, "p_conv": 0.91,
              "max_ei": 0.2, "n_next": 10, "stop": None, "risk": 0.04, "risk_confidence": 0.95, "error_law_df": 5.0,
              "error_law_scale": 1.1, "error_law_noise": 2.0, "error_law_kappa": 0.07, "n_prospective": 80,
              "stop_rule": "risk", "acquisition": "p_window"}
    text = cp.risk_statement(record, 0.05, "kJ/mol")
    assert "noise 2 kJ/mol per molecule and 0.07 per unit of force-field height" in text
    stats_ = cp.IterationStats.from_json(record)
    assert stats_.error_law_kappa == 0.07 and cp.IterationStats.from_json(stats_.to_json()) == stats_
    older = {k: v for k, v in record.items() if k != "error_law_kappa"}
    assert "height" not in cp.risk_statement(older, 0.05, "kJ/mol")


def test_a_campaign_fits_the_height_term_on_its_own_prospective_errors():
    """A small landscape whose unlearnable noise grows with the force-field height (0.2 + 0.2 h
    kJ/mol per molecule): after eight rounds, the decision under ``error_law =
    "spread_noise_height"`` fits kappa > 0 on the campaign's prospective errors (their heights are
    the picks' own). On the same committee it gives the high half of the structures left more
    share of the probability of the window than the constant noise does (the laws of maximum
    likelihood): the noise the constant law spreads over all of them belongs to the high ones."""
    from conftest import load_retro
    from graceq.config import settings_from_dict

    retro = load_retro()
    rng = np.random.default_rng(8)
    n = 400
    X = rng.normal(size=(n, 6))
    e_ff = rng.gamma(3.0, 4.0, n)
    e_ref = e_ff + X @ np.array([2.0, -1.0, 0.5, 0.0, 1.0, -0.5]) + (0.2 + 0.2 * (e_ff - e_ff.min())) * rng.normal(size=n)
    pool = retro.ReplayPool(
        source="synthetic", frames=[], names=np.array([f"s{i}" for i in range(n)], dtype=object),
        n_atoms=np.full(n, 10), energy_ff=e_ff, outcomes=[("converged", float(e)) for e in e_ref],
        atoms_per_molecule=10)
    settings = settings_from_dict({"campaign": {"pool": "synthetic", "window": 5.0, "n_init": 20, "n_batch": 10,
                                                "error_law": "spread_noise_height"}, "model": {"n_members": 32}})
    trace = retro.run_campaign(pool, X, settings, max_iterations=8)
    view = cp.CampaignView(n_atoms=pool.n_atoms, energy_ff=pool.energy_ff, atoms_per_molecule=10,
                           picks=list(trace.order), results={i: pool.result(i) for i in trace.order},
                           predictions=dict(trace.predictions))
    inputs = cp.model_inputs(X, pool.energy_ff_mol, settings.model)
    model = retro.fit_committee(view, inputs, settings, 8)
    decisions = {}
    for law in ("spread_noise_height", "spread_and_noise"):
        settings.campaign.error_law = law
        decisions[law] = cp.decide(view, model, inputs, settings, 8, pick=False)
    height, flat = (decisions[k].stats for k in ("spread_noise_height", "spread_and_noise"))
    assert height.error_law_kappa > 0 and flat.error_law_kappa == 0
    assert height.n_prospective == flat.n_prospective == 70      # 90 measured, 20 of them the initial batch
    left = view.unlabelled()
    high = view.height[left] > np.median(view.height[left])
    d = decisions["spread_noise_height"]
    spread = d.sigma[left] / height.calibration

    def p(law):
        return law.p_below(height.best + 5.0, d.mu[left], spread, view.height[left])

    def stated(s):
        return conv.ErrorLaw(df=s.error_law_df, scale=s.error_law_scale, n=s.n_prospective, noise=s.error_law_noise,
                             kappa=s.error_law_kappa)

    # the shape at the maximum likelihood (the stated laws are the largest risks over each law's
    # confidence region, which widen every structure's width)
    r, s, h = view.prospective_errors()
    (ml_height,), (ml_flat,) = conv.error_laws(r, s, 0.0, height=h), conv.error_laws(r, s, 0.0)
    assert ml_height.kappa > 0
    share = {k: np.sum(p(law)[high]) / np.sum(p(law)) for k, law in (("height", ml_height), ("flat", ml_flat))}
    assert share["height"] > share["flat"]
    assert height.risk == pytest.approx(float(np.sum(p(stated(height)))), rel=1e-9)
    # `graceq status` says so under the default law, and names the law that lets the noise grow
    from graceq import report

    settings.campaign.error_law = "spread_and_noise"
    line = report.height_sentence(view.prospective_errors(), settings)
    growth = conv.height_growth(r, s, h)
    assert growth.p_value < report.HEIGHT_P and f"likelihood ratio {growth.statistic:.1f} over 70" in line
    assert 'error_law = "spread_noise_height"' in line
    settings.campaign.error_law = "spread_noise_height"
    assert report.height_sentence(view.prospective_errors(), settings) is None  # already the law that grows


@pytest.mark.parametrize("seed,kappa", [(5, 0.0), (6, 0.3), (7, 0.03)])
def test_height_growth_is_the_likelihood_ratio_of_the_two_laws_at_their_maxima(seed, kappa):
    """The slow, obvious reference: each law's maximum likelihood by Nelder-Mead from a grid of
    starts on the direct formula (scipy.stats.t.logpdf); the statistic is twice their difference,
    the p-value half the chi2_1 tail (kappa = 0 is the boundary of the height law's space)."""
    r, s, h = _draw(seed, 120, kappa)
    growth = conv.height_growth(r, s, h)

    def maximum(with_kappa: bool) -> float:
        def neg(x):
            df = float(np.clip(np.exp(x[0]), 1.0, conv.DF_GRID[-1]))
            law = conv.ErrorLaw(df=df, scale=float(np.exp(x[1])), n=len(r), noise=abs(float(x[2])),
                                kappa=abs(float(x[3])) if with_kappa else 0.0)
            return -_loglik(law, r, s, h)

        best = -np.inf
        for df in (2.0, 5.0, 30.0):
            for noise in (0.3, 1.0, 3.0):
                for k in ((0.0, 0.05, 0.2) if with_kappa else (0.0,)):
                    fit = optimize.minimize(neg, [np.log(df), np.log(1.2), noise, k], method="Nelder-Mead",
                                            options={"maxiter": 6000, "xatol": 1e-9, "fatol": 1e-11})
                    best = max(best, -fit.fun)
        return best

    statistic = max(2.0 * (maximum(True) - maximum(False)), 0.0)
    assert growth.n == 120
    assert growth.statistic == pytest.approx(statistic, abs=2e-3)
    assert growth.p_value == pytest.approx(0.5 * stats.chi2.sf(growth.statistic, 1), rel=1e-12)
    if kappa >= 0.3:
        assert growth.p_value < 1e-3 and growth.kappa > 0
    assert conv.height_growth(r[:conv.MIN_PROSPECTIVE - 1], s[:19], h[:19]) is None
    assert conv.height_growth(r, s, np.full(len(r), 3.0)) is None          # no spread in the heights
    assert conv.height_growth(np.zeros(len(r)), s, h) is None              # the predictions were the answers
