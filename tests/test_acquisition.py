"""Expected Improvement against the textbook formula; fast Kriging-Believer against the literal
scikit-learn refit recipe."""

import numpy as np
import pytest
from scipy.stats import norm

from graceq.acquisition import expected_improvement, kriging_believer
from graceq.model import CommitteeRidge


def test_ei_equals_textbook_formula():
    rng = np.random.default_rng(0)
    mu = rng.normal(0, 3, 500)
    sigma = rng.uniform(0.1, 2, 500)
    best, window = -2.0, 1.5
    T = best + window
    z = (T - mu) / sigma
    direct = (T - mu) * norm.cdf(z) + sigma * norm.pdf(z)
    np.testing.assert_allclose(expected_improvement(mu, sigma, best, window), direct,
                               rtol=1e-10, atol=1e-14)


def test_ei_zero_sigma_and_far_tail():
    assert expected_improvement(np.array([-5.0, 5.0]), np.array([0.0, 0.0]), 0.0, 1.0).tolist() == [0, 0]
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for z in [-8.0, -15.0, -30.0]:
        exact = float(z * mpmath.ncdf(z) + mpmath.npdf(z))      # EI / sigma at T - mu = z sigma
        got = expected_improvement(np.array([-z * 2.0]), np.array([2.0]), 0.0, 0.0)[0] / 2.0
        assert got == pytest.approx(exact, rel=1e-9)


def soap_like(rng, n, p, noise, rank=6):
    latent = rng.normal(size=(n, rank))
    X = np.abs(latent @ rng.normal(size=(rank, p))) / rank + 0.05 * rng.random((n, p))
    y = X @ rng.normal(size=p) / np.sqrt(p) + 0.1 * np.sin(latent[:, 0]) + noise * rng.normal(size=n)
    return X, y


# n_labelled, p, noise, alphas: dual (p > n_sub) and primal (p < n_sub), smooth and noisy,
# lambda chosen by CV and forced to both ends of the grid
CASES = [
    (100, 200, 0.01, None),
    (100, 200, 0.5, None),
    (100, 200, 0.05, [1e-10]),
    (100, 200, 0.05, [10.0]),
    (150, 12, 0.01, None),
    (150, 12, 0.5, [1e-10]),
    (150, 12, 0.05, [10.0]),
    (60, 30, 0.1, [1e-10]),            # p > n_sub, but p < n_sub + believed rows
]


def campaign(n_labelled, p, noise, alphas, seed, n_pool=250):
    rng = np.random.default_rng(seed)
    X, y = soap_like(rng, n_labelled + n_pool, p, noise)
    n_train = int(0.8 * n_labelled)
    kw = {} if alphas is None else {"alphas": alphas}
    model = CommitteeRidge(n_members=24, random_state=seed, **kw).fit(X[:n_train], y[:n_train])
    model.calibrate(X[n_train:n_labelled], y[n_train:n_labelled])
    X_pool = X[n_labelled:]
    offset = rng.normal(0.0, 0.3, n_pool)            # force-field energy per molecule
    scale = rng.choice([8.0, 12.0], n_pool)          # atoms per molecule
    energy = offset + scale * model.predict(X_pool)
    best = np.sort(energy)[3]
    window = 0.5 * energy.std()
    return model, X_pool, offset, scale, best, window


@pytest.mark.parametrize("n_labelled, p, noise, alphas", CASES)
def test_fast_kriging_believer_equals_literal(n_labelled, p, noise, alphas):
    model, X_pool, offset, scale, best, window = campaign(n_labelled, p, noise, alphas, seed=p)
    if alphas is not None:
        assert model.alpha_ == alphas[0]
    candidates = np.arange(len(X_pool))[::-1][5:]    # reversed order, a few rows labelled
    args = (model, X_pool, candidates, best, window, 10, offset, scale)
    lit, ei_lit = kriging_believer(*args, method="literal", return_ei=True)
    fast, ei_fast = kriging_believer(*args, method="fast", return_ei=True)
    np.testing.assert_array_equal(fast, lit)
    np.testing.assert_allclose(ei_fast, ei_lit, rtol=1e-6)
    assert np.all(ei_lit > 0)
    assert set(fast.tolist()) <= set(candidates.tolist()) and len(set(fast.tolist())) == 10


def test_believer_changes_the_picks_compared_with_top_ei():
    """The believed points must matter, or the comparison above could not fail."""
    differs = 0
    for n_labelled, p, noise, alphas in CASES:
        model, X_pool, offset, scale, best, window = campaign(n_labelled, p, noise, alphas, seed=p)
        picks = kriging_believer(model, X_pool, np.arange(len(X_pool)), best, window, 10,
                                 offset, scale)
        mu, sd = model.predict(X_pool, return_std=True)
        ei = expected_improvement(offset + scale * mu, scale * sd, best, window)
        differs += not np.array_equal(picks, np.argsort(-ei, kind="stable")[:10])
        assert picks[0] == np.argmax(ei)
    assert differs >= len(CASES) // 2


def test_scalar_offset_scale_and_capped_batch():
    model, X_pool, _, _, best, window = campaign(100, 200, 0.05, None, seed=1, n_pool=30)
    candidates = np.array([3, 7, 11, 20])
    for method in ("fast", "literal"):
        picks = kriging_believer(model, X_pool, candidates, best / 10, window / 10, 50,
                                 offset=0.0, scale=1.0, method=method)
        assert sorted(picks.tolist()) == candidates.tolist()
    fast = kriging_believer(model, X_pool, candidates, best / 10, window / 10, 4, method="fast")
    lit = kriging_believer(model, X_pool, candidates, best / 10, window / 10, 4, method="literal")
    np.testing.assert_array_equal(fast, lit)


def test_kriging_believer_rejects_bad_input():
    model, X_pool, _, _, best, window = campaign(100, 200, 0.05, None, seed=2, n_pool=20)
    with pytest.raises(ValueError, match="unknown Kriging-Believer method"):
        kriging_believer(model, X_pool, np.arange(20), best, window, 3, method="exact")
    with pytest.raises(ValueError, match="features"):
        kriging_believer(model, X_pool[:, :5], np.arange(20), best, window, 3)
    with pytest.raises(ValueError, match="offset"):
        kriging_believer(model, X_pool, np.arange(20), best, window, 3, offset=np.zeros(3))
    with pytest.raises(ValueError, match="repeated"):
        kriging_believer(model, X_pool, [1, 1, 2], best, window, 2)
    assert len(kriging_believer(model, X_pool, [], best, window, 3)) == 0


@pytest.mark.parametrize("first_round", [64, 1])
def test_fast_prunes_rows_and_still_equals_literal(first_round, monkeypatch):
    """The exact EI bound must skip most rows (else the fast path is not exercised as designed)
    while the picks stay those of the literal recipe; first_round=1 forces many refresh rounds
    and the lazy sort of the bounds beyond the first few."""
    from graceq import acquisition
    monkeypatch.setattr(acquisition, "_REFRESH_FIRST", first_round)
    model, X_pool, offset, scale, best, window = campaign(100, 200, 0.05, None, seed=9, n_pool=1500)
    args = (model, X_pool, np.arange(len(X_pool)), best, window, 8, offset, scale)
    batch = acquisition._Batch(*args)
    acquisition._kb_fast(model, batch)
    assert 0 < batch.n_refreshed < 0.5 * 7 * len(X_pool)
    lit = kriging_believer(*args, method="literal")
    np.testing.assert_array_equal(batch.picks, lit)


@pytest.mark.parametrize("kept", ["none", "eight"])
@pytest.mark.parametrize("n_labelled, p, noise, alphas", CASES)
def test_memory_bounded_fast_kriging_believer_equals_literal(n_labelled, p, noise, alphas, kept, monkeypatch):
    """Issue 12: the per-member matrices (256 x 2,001^2 doubles at 5,000 labelled) are kept only
    within _KEPT_BYTES; the other members are factorised again at every pick. With none or 8 of
    the 24 members kept, in the dual, the primal and across the switch, the picks stay those of
    the literal recipe."""
    from graceq import acquisition

    n_sub = int(0.5 * int(0.8 * n_labelled))
    per_member = 8 * ((n_sub if n_sub < p + 1 else p) + 1) ** 2
    monkeypatch.setattr(acquisition, "_KEPT_BYTES", 0 if kept == "none" else 8 * per_member)
    model, X_pool, offset, scale, best, window = campaign(n_labelled, p, noise, alphas, seed=p)
    candidates = np.arange(len(X_pool))[::-1][5:]
    args = (model, X_pool, candidates, best, window, 10, offset, scale)
    lit, ei_lit = kriging_believer(*args, method="literal", return_ei=True)
    fast, ei_fast = kriging_believer(*args, method="fast", return_ei=True)
    np.testing.assert_array_equal(fast, lit)
    np.testing.assert_allclose(ei_fast, ei_lit, rtol=1e-6)


def test_kept_and_refactorised_members_solve_the_same_systems(monkeypatch):
    from graceq import acquisition

    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 90))
    subsets = np.array([rng.choice(60, 30, replace=False) for _ in range(6)])
    c = rng.normal(size=(6, 31))
    out = {}
    for budget in (10**9, 3 * 8 * 31**2, 0):
        monkeypatch.setattr(acquisition, "_KEPT_BYTES", budget)
        dual = acquisition._DualMembers(X @ X.T, subsets, 1e-3)
        out[budget] = np.empty_like(c)
        dual.solve(c, out[budget])
        assert dual.kept == {10**9: 6, 0: 0}.get(budget, 3)
    for i, rows in enumerate(subsets):  # the bordered system, solved directly
        M = np.zeros((31, 31))
        M[0, 1:] = M[1:, 0] = 1.0
        M[1:, 1:] = X[rows] @ X[rows].T + 1e-3 * np.eye(30)
        for budget in out:
            np.testing.assert_allclose(out[budget][i], np.linalg.solve(M, c[i]), rtol=1e-8, atol=1e-10)
    Xa = rng.normal(size=(60, 12))
    xa = np.concatenate([[1.0], rng.normal(size=12)])
    for budget in (10**9, 0):
        monkeypatch.setattr(acquisition, "_KEPT_BYTES", budget)
        primal = acquisition._PrimalMembers(Xa, subsets, 0.1, [])
        h = primal.solve(xa)
        primal.believe(xa, h, 1.0 + h @ xa)
        out[("primal", budget)] = primal.solve(xa)
    np.testing.assert_allclose(out[("primal", 0)], out[("primal", 10**9)], rtol=1e-8, atol=1e-12)
