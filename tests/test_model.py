"""CommitteeRidge against scikit-learn: lambda choice, every member, calibration formula."""

import os

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.utils.estimator_checks import check_estimator

from graceq.model import (DEFAULT_ALPHAS, CommitteeRidge, MemberSystems, chronological_split, fit_members,
                          member_systems, select_ridge_alpha)


def soap_like(rng, n, p, noise, rank=6):
    """Positive, correlated features (like averaged SOAP) and a smooth target plus noise."""
    latent = rng.normal(size=(n, rank))
    X = np.abs(latent @ rng.normal(size=(rank, p))) / rank + 0.05 * rng.random((n, p))
    y = X @ rng.normal(size=p) / np.sqrt(p) + 0.02 * np.sin(latent[:, 0]) + noise * rng.normal(size=n)
    return X, y


# (n, p, noise): dual (p > n) and primal (p < n), smooth and noisy targets
SHAPES = [(60, 150, 0.001), (60, 150, 0.3), (150, 12, 0.001), (150, 12, 0.3), (80, 300, 0.0)]


def test_chronological_split_keeps_order_and_rounds_down():
    train, test = chronological_split(11)
    assert train.tolist() == list(range(8)) and test.tolist() == [8, 9, 10]
    train, test = chronological_split(10)
    assert len(train) == 8 and test.tolist() == [8, 9]
    with pytest.raises(ValueError, match="too few.*label at least 7"):  # floor(4.8) = 4 < 5
        chronological_split(6)
    train, test = chronological_split(7)
    assert len(train) == 5 and len(test) == 2


def test_chronological_split_always_leaves_a_test_structure():
    train, test = chronological_split(6, train_fraction=0.99)
    assert len(train) == 5 and test.tolist() == [5]


@pytest.mark.parametrize("n, p, noise", SHAPES)
def test_select_ridge_alpha_equals_gridsearchcv(n, p, noise):
    X, y = soap_like(np.random.default_rng(n + p), n, p, noise)
    alpha, cv_rmse = select_ridge_alpha(X, y)
    search = GridSearchCV(Ridge(), {"alpha": list(DEFAULT_ALPHAS)}, cv=KFold(5),
                          scoring="neg_root_mean_squared_error").fit(X, y)
    assert alpha == search.best_params_["alpha"]
    np.testing.assert_allclose(cv_rmse, -search.cv_results_["mean_test_score"], rtol=1e-8)


def test_select_ridge_alpha_picks_interior_lambdas():
    """Not every case may end at the top of the grid, or the comparison above proves little."""
    chosen = set()
    for n, p, noise in SHAPES:
        X, y = soap_like(np.random.default_rng(n + p), n, p, noise)
        chosen.add(select_ridge_alpha(X, y)[0])
    assert len(chosen) >= 3


def test_select_ridge_alpha_first_of_equal_scores():
    X, y = soap_like(np.random.default_rng(0), 40, 8, 0.1)
    alpha, cv_rmse = select_ridge_alpha(X, y, alphas=[0.1, 0.1, 0.1])
    assert alpha == 0.1 and np.all(cv_rmse == cv_rmse[0])


@pytest.mark.parametrize("n, p, noise", SHAPES)
@pytest.mark.parametrize("alpha", [1e-10, 1e-3, 10.0])
def test_members_equal_sklearn_ridge(n, p, noise, alpha):
    X, y = soap_like(np.random.default_rng(7 * n + p), n, p, noise)
    model = CommitteeRidge(n_members=40, alphas=[alpha]).fit(X, y)
    assert model.alpha_ == alpha
    for i, rows in enumerate(model.subsets_):
        ref = Ridge(alpha=alpha).fit(X[rows], y[rows])
        scale = np.linalg.norm(ref.coef_)
        assert np.linalg.norm(model.coef_[i] - ref.coef_) <= 1e-8 * scale
        pred = X @ model.coef_[i] + model.intercept_[i]
        np.testing.assert_allclose(pred, ref.predict(X), rtol=1e-8, atol=1e-10 * np.abs(y).max())


def test_subsets_are_without_replacement_seeded_and_shared_with_draw_subsets():
    X, y = soap_like(np.random.default_rng(1), 41, 10, 0.1)
    model = CommitteeRidge(n_members=30, subsample=0.5, random_state=3).fit(X, y)
    assert model.subsets_.shape == (30, 20)          # round(20.5) = 20
    for rows in model.subsets_:
        assert len(np.unique(rows)) == len(rows)
    np.testing.assert_array_equal(model.draw_subsets(41), model.subsets_)
    other = CommitteeRidge(n_members=30, random_state=4).draw_subsets(41)
    assert not np.array_equal(other, model.subsets_)


def test_from_members_equals_fit_with_members_fitted_in_slices():
    X, y = soap_like(np.random.default_rng(2), 70, 120, 0.2)
    model = CommitteeRidge(n_members=20, random_state=5).fit(X, y)
    template = CommitteeRidge(n_members=20, random_state=5)
    subsets = template.draw_subsets(len(X))
    alpha, cv_rmse = select_ridge_alpha(X, y)
    parts = [fit_members(X, y, alpha, subsets[lo:lo + 7]) for lo in range(0, 20, 7)]
    coef = np.vstack([c for c, _ in parts])
    intercept = np.concatenate([b for _, b in parts])
    rebuilt = CommitteeRidge.from_members(X, y, alpha, subsets, coef, intercept,
                                          cv_rmse=cv_rmse, n_members=20, random_state=5)
    assert rebuilt.alpha_ == model.alpha_
    np.testing.assert_allclose(rebuilt.coef_, model.coef_, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rebuilt.intercept_, model.intercept_, rtol=1e-12)
    np.testing.assert_allclose(rebuilt.predict(X), model.predict(X), rtol=1e-12)
    np.testing.assert_array_equal(rebuilt.cv_rmse_, model.cv_rmse_)
    with pytest.raises(ValueError, match="n_members"):
        CommitteeRidge.from_members(X, y, alpha, subsets[:5], coef[:5], intercept[:5], n_members=20)


def test_calibration_equals_formula_and_scales_std_only():
    rng = np.random.default_rng(3)
    X, y = soap_like(rng, 120, 60, 0.3)
    model = CommitteeRidge(n_members=32).fit(X[:90], y[:90])
    mean_before, std_before = model.predict(X[90:], return_std=True)
    model.calibrate(X[90:], y[90:])
    members = np.array([[X[k] @ model.coef_[i] + model.intercept_[i] for i in range(32)]
                        for k in range(90, 120)])
    ybar = members.mean(axis=1)
    sigma = members.std(axis=1, ddof=1)
    alpha2 = -1 / 32 + (32 - 3) / (32 - 1) * np.mean((y[90:] - ybar) ** 2 / sigma ** 2)
    assert alpha2 > 0
    assert model.calibration_ == pytest.approx(np.sqrt(alpha2), rel=1e-12)
    assert model.calibration_warning_ is None
    assert model.test_rmse_ == pytest.approx(np.sqrt(np.mean((y[90:] - ybar) ** 2)), rel=1e-12)
    mean_after, std_after = model.predict(X[90:], return_std=True)
    np.testing.assert_allclose(mean_after, mean_before, rtol=1e-14)
    np.testing.assert_allclose(std_after, np.sqrt(alpha2) * std_before, rtol=1e-12)


def test_calibration_guard_when_alpha_squared_is_not_positive():
    rng = np.random.default_rng(4)
    X, y = soap_like(rng, 100, 30, 0.3)
    model = CommitteeRidge(n_members=16).fit(X[:80], y[:80])
    perfect = model.predict(X[80:])                 # zero residual -> alpha^2 = -1/m
    model.calibrate(X[80:], perfect)
    assert model.calibration_alpha2_ == pytest.approx(-1 / 16)
    assert model.calibration_ == pytest.approx(0.25)
    assert "floored" in model.calibration_warning_
    assert model.test_rmse_ == pytest.approx(0.0, abs=1e-12)


def test_calibration_rejects_identical_members():
    X, y = soap_like(np.random.default_rng(5), 40, 5, 0.1)
    model = CommitteeRidge(n_members=4, subsample=1.0).fit(X, y)
    with pytest.raises(ValueError, match="zero committee spread"):
        model.calibrate(X[:5], y[:5])


def test_scikit_learn_estimator_checks():
    failed = [r for r in check_estimator(CommitteeRidge(n_members=4), on_fail=None)
              if r["status"] == "failed"]
    assert failed == []


def test_members_fitted_in_a_forked_child_after_the_parent_used_its_threads():
    """The thread pool is per process: a child forked after the parent fitted (a Celery prefork
    pool, a multiprocessing benchmark) starts its own instead of waiting on threads it has not got."""
    import multiprocessing

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 80)), rng.normal(size=60)
    subsets = np.stack([np.sort(rng.choice(60, 30, replace=False)) for _ in range(70)])
    expected = fit_members(X, y, 0.1, subsets)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        coef, intercept = pool.apply_async(fit_members, (X, y, 0.1, subsets)).get(timeout=60)
    np.testing.assert_array_equal(coef, expected[0])
    np.testing.assert_array_equal(intercept, expected[1])


@pytest.mark.parametrize("p", [12, 90])  # fewer features than a member's rows, and more
def test_bordered_member_systems_equal_scikit_learn_refits_with_the_rows_added(p):
    """Rows added to every member by a bordered solve of the fit's factorised systems: each member
    is ``Ridge(lambda).fit`` on its rows plus the first j added rows, for every j (the leading
    blocks), in the features or any coordinates that hold the rows (here: rotated and shifted)."""
    rng = np.random.default_rng(11)
    X, y = soap_like(rng, 80, p, 0.3)
    model = CommitteeRidge(n_members=12, random_state=2).fit(X[:50], y[:50])
    systems = member_systems(model)
    assert member_systems(model) is systems                      # built once per fit
    assert member_systems(CommitteeRidge(n_members=12, random_state=2).fit(X[:50], y[:50]).fit(X[:40], y[:40])
                          ).L.shape[1] == 20                     # a refit drops the previous fit's
    rotation = np.linalg.qr(rng.normal(size=(p, p)))[0]
    for coords in (lambda A: A, lambda A: (A - 3.0) @ rotation):
        border = systems.border(coords(X[:50]), coords(X[50:62]))
        for j in (0, 5, 12):
            coef, intercept = border.members(y[50:50 + j], j)
            for i, subset in enumerate(model.subsets_):
                ridge = Ridge(alpha=model.alpha_).fit(np.vstack([coords(X[:50])[subset], coords(X[50:50 + j])]),
                                                      np.concatenate([y[:50][subset], y[50:50 + j]]))
                np.testing.assert_allclose(coef[i], ridge.coef_, rtol=1e-6, atol=1e-9)
                assert intercept[i] == pytest.approx(ridge.intercept_, abs=1e-8)
    with pytest.raises(ValueError, match="labels"):
        border.members(y[50:53], 5)
    # the columns of rows bordered before are kept (by pool row) and reused: rows 50..57 again, 70 new
    systems.border(X[:50], X[50:58], rows=range(50, 58))
    rows = [52, 70, 50, 57]
    assert set(systems.columns) == set(range(50, 58))
    coef, intercept = systems.border(X[:50] @ rotation, X[rows] @ rotation, rows=rows).members(y[rows])
    assert set(systems.columns) == set(range(50, 58)) | {70}
    for i, subset in enumerate(model.subsets_):
        ridge = Ridge(alpha=model.alpha_).fit(np.vstack([X[:50][subset], X[rows]]) @ rotation,
                                              np.concatenate([y[:50][subset], y[rows]]))
        np.testing.assert_allclose(coef[i], ridge.coef_, rtol=1e-6, atol=1e-9)
        assert intercept[i] == pytest.approx(ridge.intercept_, abs=1e-8)


def test_member_systems_keep_the_factors_their_memory_budget_allows_and_refit_the_rest(monkeypatch):
    """Within ``GRACEQ_STEERING_KEPT_MIB`` the first members' factors are kept; the others are
    refitted at every decision: the committee is the same (scikit-learn's), whichever way."""
    from graceq import model as model_module

    rng = np.random.default_rng(12)
    X, y = soap_like(rng, 60, 25, 0.3)
    monkeypatch.setattr(model_module, "_STEERING_KEPT_BYTES", 3 * MemberSystems.member_bytes(15) + 1)
    partly = CommitteeRidge(n_members=8, random_state=4).fit(X[:30], y[:30])    # n_sub 15: 3 of 8 kept
    systems = member_systems(partly)
    assert systems.kept == 3 and systems.L.shape == (3, 15, 15)
    coef, intercept = systems.border(X[:30], X[30:36]).members(y[30:36])
    for i, subset in enumerate(partly.subsets_):
        ridge = Ridge(alpha=partly.alpha_).fit(np.vstack([X[:30][subset], X[30:36]]),
                                               np.concatenate([y[:30][subset], y[30:36]]))
        np.testing.assert_allclose(coef[i], ridge.coef_, rtol=1e-6, atol=1e-9)
        assert intercept[i] == pytest.approx(ridge.intercept_, abs=1e-8)
    monkeypatch.setattr(model_module, "_STEERING_KEPT_BYTES", MemberSystems.member_bytes(15) - 1)
    assert member_systems(CommitteeRidge(n_members=8).fit(X[:30], y[:30])) is None    # not one member fits


def test_committee_mean_and_std_are_those_of_the_members_predictions():
    rng = np.random.default_rng(13)
    X, y = soap_like(rng, 200, 40, 0.3)
    model = CommitteeRidge(n_members=24).fit(X[:120], y[:120]).calibrate(X[120:150], y[120:150])
    members = np.array([[X[k] @ model.coef_[i] + model.intercept_[i] for i in range(24)] for k in range(200)])
    mean, std = model.predict(X, return_std=True)
    np.testing.assert_allclose(mean, members.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, model.calibration_ * members.std(axis=1, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(model.predict(X), mean, rtol=1e-12, atol=1e-12)


_OVERLAPPING_BLOCKS = """
import threading
from threadpoolctl import ThreadpoolController
from graceq.model import one_blas_thread

controller = ThreadpoolController()


def blas_threads():
    return max([info["num_threads"] for info in controller.select(user_api="blas").info()], default=0)


before = blas_threads()
a_in, b_in, a_out, b_out, a_again = (threading.Event() for _ in range(5))
seen = {}


def first():
    with one_blas_thread():
        a_in.set()
        b_in.wait(10)
    a_out.set()
    b_out.wait(10)                      # alive while B's block ends
    with one_blas_thread():             # a block after B's, B still alive
        seen["later inside"] = blas_threads()
    seen["later after"] = blas_threads()
    a_again.set()


def second():
    a_in.wait(10)
    with one_blas_thread():
        b_in.set()
        a_out.wait(10)
        seen["inside"] = blas_threads()
    seen["after"] = blas_threads()
    b_out.set()
    a_again.wait(10)                    # alive while A's second block runs


threads = [threading.Thread(target=first), threading.Thread(target=second)]
for t in threads:
    t.start()
for t in threads:
    t.join(30)
print(before, seen["inside"], seen["after"], seen["later inside"], seen["later after"], blas_threads())
"""


def test_blocks_of_single_threaded_blas_in_two_threads_give_the_threads_back_when_both_end():
    """The coordinator's fit thread and its decisions each run blocks of single-threaded BLAS. BLAS
    has one thread setting per process: when the blocks overlap (A starts, B starts, A ends, B
    ends), B must still run on one thread after A's end, and the setting must come back to what it
    was when B ends, not stay at the 1 that B found on entry. threadpoolctl 3.8 lets only one live
    thread change OpenBLAS's setting and ignores the others: B's restore while A lives, and A's
    later block while B lives, must still take effect. In a fresh interpreter, so that no earlier
    test holds a limit."""
    import subprocess
    import sys

    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _OVERLAPPING_BLOCKS], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    before, inside, after, later_inside, later_after, final = (int(v) for v in out.stdout.split())
    if before < 2:
        pytest.skip(f"BLAS runs {before} thread(s) here: nothing to limit")
    assert (inside, after, later_inside, later_after, final) == (1, before, 1, before, before)


_FORK_WHILE_HELD = """
import os, signal, threading, time
import graceq.model as model

held, release = threading.Event(), threading.Event()


def holder():
    with model._BLAS_LOCK:          # another thread is inside one_blas_thread's bookkeeping at the fork
        held.set()
        release.wait(30)


threading.Thread(target=holder, daemon=True).start()
held.wait(10)
pid = os.fork()
if pid == 0:
    with model.one_blas_thread():
        pass
    os._exit(0)
for _ in range(200):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    status = -1
release.set()
print(status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_holds_the_blas_bookkeeping_does_not_deadlock():
    """A Celery prefork child (or any fork) may be made while another thread of the parent is
    inside one_blas_thread's lock: the child gets its own lock and no blocks, and its first
    block runs (within 10 s) instead of waiting forever for a thread that does not exist there."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FORK_WHILE_HELD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 0, "the forked child deadlocked on the parent's BLAS lock"
