"""Ridge committee delta-model (DESIGN.md section 3).

The target is the per-atom correction ``y = (E_ref - E_ff) / N_atoms`` (energy per atom, in the
campaign's energy unit) and the features are the averaged SOAP vectors of the force-field
structures.  :class:`CommitteeRidge` is a scikit-learn regressor: lambda is chosen once on the
train set by 5-fold cross-validation, then ``n_members`` ridge models (same lambda, intercept
fitted, unpenalised) are trained on random half-subsets of the train set; the committee mean is
the prediction and the calibrated committee spread is its uncertainty.

Every member is *exactly* ``sklearn.linear_model.Ridge(alpha).fit`` on its rows; the code here
only arranges the linear algebra so that it is done once (one factorisation per CV fold for all
lambdas; all members from one Gram matrix).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from scipy.linalg import solve_triangular
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.model_selection import KFold
from sklearn.utils.validation import check_is_fitted, check_X_y, validate_data
import threadpoolctl
from threadpoolctl import ThreadpoolController

# A tuple (not an array) so that scikit-learn can compare it with a parameter in repr/clone.
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-10, 1, 12))

# One look for the BLAS libraries (threadpool_limits() looks again at every call: milliseconds
# per call, which add up over the thousands of small fits of an asynchronous campaign).
_THREADPOOLS = ThreadpoolController()


_BLAS_LOCK = threading.Lock()
_BLAS_HELD: dict = {"blocks": 0, "limiter": None}


def _forget_blas_blocks_in_child():
    """A forked child holds none of its parent's blocks, and a lock that another thread of the
    parent held at the fork would never be released in the child."""
    global _BLAS_LOCK
    _BLAS_LOCK = threading.Lock()
    _BLAS_HELD.update(blocks=0, limiter=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_blas_blocks_in_child)


def _release_blas_control():
    """Let any thread set OpenBLAS's thread count next.

    threadpoolctl 3.8 lets only one thread at a time change OpenBLAS's process-wide setting (the
    first to set it, until its own limit block ends or it exits) and silently ignores the others.
    one_blas_thread's sets and restores are already serialised by _BLAS_LOCK, so each of them may
    come from a different thread: without this, a restore from a thread other than the one that set
    the limit is dropped while that thread lives, and the process stays at one BLAS thread.
    Earlier threadpoolctl versions have no controlling thread and nothing to release.
    """
    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@contextmanager
def one_blas_thread():
    """Single-threaded BLAS within a block (batched small solves: more threads only spin).

    BLAS libraries have one thread setting per process, so the blocks of all threads share one
    limit: set when the first block starts, restored when the last one ends (whichever threads
    those are). Each thread's own threadpoolctl limit would restore the setting it found on entry,
    and blocks that overlap in two threads (the coordinator's fit thread and its decisions) would
    then leave the process at one BLAS thread for good.
    """
    with _BLAS_LOCK:
        if _BLAS_HELD["blocks"] == 0:
            _release_blas_control()
            _BLAS_HELD["limiter"] = _THREADPOOLS.limit(limits=1)
            _release_blas_control()
        _BLAS_HELD["blocks"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            if _BLAS_HELD["blocks"] > 0:            # 0: a block entered before a fork, left in the child
                _BLAS_HELD["blocks"] -= 1
                if _BLAS_HELD["blocks"] == 0:
                    _release_blas_control()
                    _BLAS_HELD["limiter"].restore_original_limits()
                    _release_blas_control()
                    _BLAS_HELD["limiter"] = None


_THREADS: dict[int, ThreadPoolExecutor] = {}  # one pool per process: a forked child has none of its parent's threads


def _threads() -> ThreadPoolExecutor:
    pool = _THREADS.get(os.getpid())
    if pool is None:
        _THREADS.clear()
        pool = _THREADS[os.getpid()] = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    return pool


def in_slices(func, n_items):
    """Run func(lo, hi) over slices of an axis (members, or pool rows) in parallel threads: numpy
    releases the GIL, and each item's arithmetic is unchanged, so the results are bit-identical
    to one call. For memory-bound products that one core cannot saturate, and for the members'
    batched solves (one BLAS thread each)."""
    pool = _threads()
    n = pool._max_workers
    bounds = np.linspace(0, n_items, n + 1).astype(int)
    list(pool.map(lambda k: func(bounds[k], bounds[k + 1]), range(n)))


# Members solved together per batched LAPACK call: bounds the (chunk, n_sub, n_sub) work array.
_MEMBER_CHUNK = 32


def _n_train(n_labelled, train_fraction):
    # 1e-9 absorbs float products such as 0.57 * 100 = 56.99999999999999
    return min(int(np.floor(train_fraction * n_labelled + 1e-9)), n_labelled - 1)


def chronological_split(n_labelled: int, train_fraction: float = 0.8, cv: int = 5):
    """Return ``(train_idx, test_idx)``: the first ``train_fraction`` of the labelled structures
    in sampling order train the model, the most recent ones test and calibrate it (no shuffle).

    Rounding: ``n_train = floor(train_fraction * n_labelled)``, then clipped so that at least one
    structure is left for the test set.  Raises ``ValueError`` if that leaves fewer than ``cv``
    train structures (5-fold cross-validation of lambda needs at least ``cv`` of them).
    """
    n_labelled = int(n_labelled)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = _n_train(n_labelled, train_fraction)
    if n_train < cv:
        need = next(k for k in range(cv + 1, 100 * cv + 100) if _n_train(k, train_fraction) >= cv)
        raise ValueError(
            f"{n_labelled} labelled structures are too few for a chronological "
            f"{train_fraction:.0%}/{1 - train_fraction:.0%} split with {cv}-fold cross-validation: "
            f"the train set would hold {max(n_train, 0)} structures (need >= {cv}) and the test set "
            f">= 1; label at least {need} structures first")
    order = np.arange(n_labelled)
    return order[:n_train], order[n_train:]


def _ridge_path_predictions(X_fit, y_fit, X_eval, alphas):
    """Return predictions ``(n_eval, n_alphas)`` of intercept-fitted ridge models, one per alpha,
    from one eigendecomposition (dual Gram if p > n, else primal X^T X, as scikit-learn's
    cholesky solver chooses).  Eigenvalues are clipped at 0 (round-off can make them slightly
    negative)."""
    x_mean = X_fit.mean(axis=0)
    y_mean = y_fit.mean()
    Xc = X_fit - x_mean
    yc = y_fit - y_mean
    Xe = X_eval - x_mean
    n, p = Xc.shape
    if p > n:
        s, U = np.linalg.eigh(Xc @ Xc.T)
        proj = (Xe @ Xc.T) @ U          # eval rows in the eigenbasis of the dual
        rhs = U.T @ yc
    else:
        s, U = np.linalg.eigh(Xc.T @ Xc)
        proj = Xe @ U
        rhs = U.T @ (Xc.T @ yc)
    s = np.clip(s, 0.0, None)
    return proj @ (rhs[:, None] / (s[:, None] + np.asarray(alphas)[None, :])) + y_mean


def select_ridge_alpha(X, y, alphas=DEFAULT_ALPHAS, cv: int = 5):
    """Return ``(alpha, cv_rmse)``: the ridge lambda with the lowest mean fold RMSE and the mean
    fold RMSE of every lambda (units of ``y``).

    Same choice as ``GridSearchCV(Ridge(), {"alpha": alphas}, cv=KFold(cv),
    scoring="neg_root_mean_squared_error")``: folds in order (no shuffle), intercept fitted, score
    averaged over folds, ties go to the first lambda of the grid.  One factorisation per fold
    serves all lambdas.
    """
    X, y = check_X_y(X, y, dtype=np.float64, y_numeric=True)
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if np.any(alphas <= 0):
        raise ValueError(f"ridge alphas must be > 0, got {alphas}")
    if X.shape[0] < cv:
        raise ValueError(f"n_samples = {X.shape[0]} train structures are too few for "
                         f"{cv}-fold cross-validation of the ridge lambda")
    fold_rmse = []
    for train, test in KFold(cv).split(X):
        pred = _ridge_path_predictions(X[train], y[train], X[test], alphas)
        fold_rmse.append(np.sqrt(np.mean((y[test][:, None] - pred) ** 2, axis=0)))
    cv_rmse = np.mean(fold_rmse, axis=0)
    return float(alphas[int(np.argmin(cv_rmse))]), cv_rmse


def fit_members(X, y, alpha: float, subsets):
    """Return ``(coef (m, p), intercept (m,))`` of ridge models ``Ridge(alpha).fit(X[s], y[s])``,
    one per row of ``subsets`` (int array (m, n_sub)), solved in batches.

    Dual (centred Gram of the member's rows) when p > n_sub, primal (centred X^T X) otherwise, as
    scikit-learn does.  Features are first shifted by the mean of all rows, which changes no
    member (the intercept absorbs it) but keeps the Gram matrix well conditioned.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    subsets = np.atleast_2d(np.asarray(subsets, dtype=np.intp))
    m, n_sub = subsets.shape
    n, p = X.shape
    shift = X.mean(axis=0)
    Xs = X - shift
    dual = p > n_sub
    if dual:
        return _fit_members_dual(Xs, y, alpha, subsets, shift)
    coef = np.empty((m, p))
    intercept = np.empty(m)
    eye = np.eye(p)

    def chunk(lo, hi):
        idx = subsets[lo:hi]
        Xm = Xs[idx]                                        # (c, n_sub, p)
        x_mean = Xm.mean(axis=1)                            # (c, p)
        ym = y[idx]
        y_mean = ym.mean(axis=1)
        yc = ym - y_mean[:, None]
        Xc = Xm - x_mean[:, None, :]
        A = np.matmul(Xc.transpose(0, 2, 1), Xc) + alpha * eye   # matmul: BLAS, where einsum is not
        w = np.linalg.solve(A, np.matmul(Xc.transpose(0, 2, 1), yc[:, :, None]))[:, :, 0]
        coef[lo:hi] = w
        # intercept in the caller's (unshifted) coordinates
        intercept[lo:hi] = y_mean - np.einsum("cp,cp->c", x_mean + shift, w)

    _chunked(chunk, m)
    return coef, intercept


def _chunked(chunk, m):
    """chunk(lo, hi) over the members in blocks of ``_MEMBER_CHUNK``, the blocks shared among
    threads, one BLAS thread each (batched small solves: more BLAS threads only spin). Each member's
    arithmetic is that of a sequential loop, so the result does not depend on the thread count."""
    def run(first, last):
        for lo in range(first, last, _MEMBER_CHUNK):
            chunk(lo, min(lo + _MEMBER_CHUNK, last))

    blocks = -(-m // _MEMBER_CHUNK)
    with one_blas_thread():
        in_slices(lambda a, b: run(a * _MEMBER_CHUNK, min(b * _MEMBER_CHUNK, m)), blocks)


def _fit_members_dual(Xs, y, alpha, subsets, shift):
    """``fit_members`` in the dual (p > n_sub), on features already shifted by ``shift``.

    Member i solves ``(Kc_i + lambda I) a_i = yc_i`` with Kc_i the doubly centred Gram matrix of
    its rows; its weights are ``w_i = sum_n a_in (x_n - xbar_i)``. Those sums are done for all
    members at once as two (members x rows) x (rows x features) products, with each member's
    dual coefficients and row weights scattered onto the rows it uses, rather than by copying
    every member's rows (members x n_sub x p floats): the same numbers, at matrix-product speed.
    """
    m, n_sub = subsets.shape
    n = len(Xs)
    gram = Xs @ Xs.T
    eye = np.eye(n_sub)
    scattered = np.zeros((m, n))                            # a_i on member i's rows
    row_weights = np.zeros((m, n))                          # 1 / n_sub on member i's rows
    members = np.arange(m)[:, None]
    row_weights[members, subsets] = 1.0 / n_sub
    y_mean = y[subsets].mean(axis=1)

    def chunk(lo, hi):
        idx = subsets[lo:hi]
        yc = y[idx] - y_mean[lo:hi, None]
        K = gram[idx[:, :, None], idx[:, None, :]]          # (c, n_sub, n_sub)
        K = K - K.mean(axis=1, keepdims=True)
        K = K - K.mean(axis=2, keepdims=True)               # centred Gram of the member's rows
        dual_coef = np.linalg.solve(K + alpha * eye, yc[:, :, None])[:, :, 0]
        scattered[members[lo:hi], idx] = dual_coef

    _chunked(chunk, m)
    x_mean = row_weights @ Xs                               # (m, p) mean shifted row of each member
    coef = scattered @ Xs - scattered.sum(axis=1)[:, None] * x_mean
    # intercept in the caller's (unshifted) coordinates
    intercept = y_mean - np.einsum("cp,cp->c", x_mean + shift, coef)
    return coef, intercept


# Bytes of member factors that asynchronous steering keeps from one fit to the next decisions
# (``MemberSystems``: n_sub (n_sub + 2) doubles a member; 0.3 GB for 256 members at 1,000 labelled);
# the members beyond it are refitted at every decision, as before the bordered update. A coordinator
# with memory to spare sets GRACEQ_STEERING_KEPT_MIB higher.
_STEERING_KEPT_BYTES = int(float(os.environ.get("GRACEQ_STEERING_KEPT_MIB", 512)) * 2**20)


class MemberSystems:
    """Every member's ridge system, factorised once per fit, so that rows added to all members cost
    a bordered solve instead of a refit (asynchronous steering adds rows at every arrival).

    A ridge member with a fitted intercept solves, in the dual, ``(K + lambda I) a + b 1 = y`` and
    ``1^T a = 0`` (K: Gram matrix of its rows, shifted by any fixed vector; ``w = sum_n a_n x_n``,
    b the intercept in the shifted coordinates): the stationarity conditions of
    ``|y - X w - b|^2 + lambda |w|^2``, the problem ``Ridge(lambda).fit`` solves. With
    ``A = K + lambda I = L L^T`` (Cholesky), rows E added to the member border A with
    ``B = K_SE`` and ``C = K_EE + lambda I``; with ``G = L^-1 B`` and ``S = C - G^T G`` the
    bordered system ``[[A, B], [B^T, C]] u = v`` is solved by ``u2 = S^-1 (v2 - G^T L^-1 v1)``,
    ``u1 = L^-T (L^-1 v1 - G u2)``, for v = (y, 1); then ``b = 1.u_y / 1.u_1`` and
    ``a = u_y - b u_1``. Cost per member: n_sub^2 k for the k added rows, against n_sub^3 for a refit.

    The factors of the first ``kept`` members are held (``n_sub (n_sub + 2)`` doubles each; as
    many as ``GRACEQ_STEERING_KEPT_MIB`` allows, all 256 up to about 1,000 labelled); the others
    are refitted on their enlarged rows (:func:`fit_members`). The shift is the mean of the fit's
    train rows in whatever coordinates the rows are given (the features, or exact coordinates of
    a subspace that holds them: the Gram matrices are the same).
    """

    def __init__(self, X_train, y_train, alpha: float, subsets, kept: int | None = None):
        X = np.asarray(X_train, dtype=np.float64)
        self.alpha = float(alpha)
        self.y_train = np.asarray(y_train, dtype=np.float64)
        self.subsets = np.atleast_2d(np.asarray(subsets, dtype=np.intp))
        m, n_sub = self.subsets.shape
        self.kept = m if kept is None else int(min(m, kept))
        Xs = X - X.mean(axis=0)
        gram = Xs @ Xs.T
        self.L = np.empty((self.kept, n_sub, n_sub))
        self.t = np.empty((self.kept, n_sub, 2))   # L^-1 (y_S, 1), the right-hand sides' first halves
        self.columns: dict[int, np.ndarray] = {}   # pool row -> its column of G = L^-1 B, (kept, n_sub)
        rhs = np.stack([self.y_train[self.subsets[:self.kept]], np.ones((self.kept, n_sub))], axis=2)
        diagonal = np.arange(n_sub)

        def chunk(lo, hi):
            idx = self.subsets[lo:hi]
            A = gram[idx[:, :, None], idx[:, None, :]]
            A[:, diagonal, diagonal] += self.alpha
            self.L[lo:hi] = np.linalg.cholesky(A)
            for i in range(lo, hi):
                self.t[i] = solve_triangular(self.L[i], rhs[i], lower=True, check_finite=False)

        _chunked(chunk, self.kept)

    @staticmethod
    def member_bytes(n_sub: int) -> int:
        return 8 * n_sub * (n_sub + 2)

    def border(self, X_train, X_extra, rows=None) -> "Bordered":
        """The members' systems bordered by the rows ``X_extra`` (added to every member), with the
        train rows ``X_train`` in the same coordinates as ``X_extra``. ``rows``: the added rows'
        pool indices, whose columns of ``G`` are then kept for the next borderings (a row's column
        is made of dot products, the same in any coordinates that hold the rows): an asynchronous
        decision adds the results since the fit and the pending jobs, all but one or two of which
        the previous decision added too."""
        return Bordered(self, np.asarray(X_train, dtype=np.float64), np.asarray(X_extra, dtype=np.float64), rows)


class Bordered:
    """:class:`MemberSystems` bordered by k rows: the members refitted on their rows plus the first
    ``j <= k`` added rows, for any labels of those (the Schur complement of the first j rows is
    the leading block of the k rows' one)."""

    def __init__(self, systems: MemberSystems, X_train: np.ndarray, X_extra: np.ndarray, rows=None):
        self.systems = systems
        self.X_train, self.X_extra = X_train, X_extra
        shift = X_train.mean(axis=0)
        self.X = np.vstack([X_train, X_extra]) - shift     # every row, shifted: the weights are sums of these
        self.shift = shift
        n, k = len(X_train), len(X_extra)
        self.n_train, self.k = n, k
        C = self.X[n:] @ self.X[n:].T + systems.alpha * np.eye(k)
        kept, n_sub = systems.kept, systems.subsets.shape[1]
        rows = None if rows is None else [int(r) for r in rows]
        known = systems.columns if rows is not None else {}
        new = [c for c in range(k) if rows is None or rows[c] not in known]
        cross = self.X[:n] @ self.X[n:][new].T             # (n_train, new)
        fresh = np.empty((kept, n_sub, len(new)))
        self.G = np.empty((kept, n_sub, k))
        self.S = np.empty((kept, k, k))

        def chunk(lo, hi):
            for i in range(lo, hi):
                fresh[i] = solve_triangular(systems.L[i], cross[systems.subsets[i]], lower=True, check_finite=False)

        if new:
            _chunked(chunk, kept)
        for c, column in zip(new, np.moveaxis(fresh, 2, 0)):
            if rows is not None:
                known[rows[c]] = np.ascontiguousarray(column)
            self.G[:, :, c] = column
        for c in set(range(k)) - set(new):
            self.G[:, :, c] = known[rows[c]]

        def schur(lo, hi):
            G = self.G[lo:hi]
            self.S[lo:hi] = C - np.matmul(G.transpose(0, 2, 1), G)

        _chunked(schur, kept)

    def members(self, y_extra, j: int | None = None):
        """``(coef (m, p), intercept (m,))`` of the members refitted on their rows plus the first
        ``j`` added rows (all k by default) labelled ``y_extra`` (length j), in the caller's
        (unshifted) coordinates."""
        j = self.k if j is None else int(j)
        y_extra = np.asarray(y_extra, dtype=np.float64).ravel()
        if len(y_extra) != j:
            raise ValueError(f"{len(y_extra)} labels for {j} added rows")
        sy = self.systems
        m, n_sub = sy.subsets.shape
        kept = sy.kept
        G, S, t = self.G[:, :, :j], self.S[:, :j, :j], sy.t
        v2 = np.stack([np.broadcast_to(y_extra, (kept, j)), np.ones((kept, j))], axis=2)      # (kept, j, 2)
        u2 = np.linalg.solve(S, v2 - np.matmul(G.transpose(0, 2, 1), t)) if j else v2
        u1 = np.empty((kept, n_sub, 2))

        def chunk(lo, hi):
            for i in range(lo, hi):
                u1[i] = solve_triangular(sy.L[i], t[i] - G[i] @ u2[i], lower=True, trans="T", check_finite=False)

        _chunked(chunk, kept)
        total = u1.sum(axis=1) + u2.sum(axis=1)                                               # (kept, 2)
        b = total[:, 0] / total[:, 1]
        scattered = np.zeros((kept, self.n_train + j))
        scattered[np.arange(kept)[:, None], sy.subsets[:kept]] = u1[:, :, 0] - b[:, None] * u1[:, :, 1]
        scattered[:, self.n_train:] = u2[:, :, 0] - b[:, None] * u2[:, :, 1]
        coef = np.empty((m, self.X.shape[1]))
        intercept = np.empty(m)
        coef[:kept] = scattered @ self.X[:self.n_train + j]
        intercept[:kept] = b - coef[:kept] @ self.shift
        if kept < m:  # the members whose factors are not kept: refitted on their enlarged rows
            added = np.broadcast_to(np.arange(self.n_train, self.n_train + j), (m - kept, j))
            coef[kept:], intercept[kept:] = fit_members(
                np.vstack([self.X_train, self.X_extra[:j]]), np.concatenate([sy.y_train, y_extra]), sy.alpha,
                np.hstack([sy.subsets[kept:], added]))
        return coef, intercept


def member_systems(model: "CommitteeRidge") -> MemberSystems | None:
    """The fitted committee's :class:`MemberSystems`, built at the first call and kept with the
    committee (None when not one member's factors fit in ``GRACEQ_STEERING_KEPT_MIB``)."""
    cached = getattr(model, "_member_systems", False)
    if cached is False:
        kept = min(len(model.subsets_), _STEERING_KEPT_BYTES // MemberSystems.member_bytes(model.subsets_.shape[1]))
        cached = MemberSystems(model.X_train_, model.y_train_, model.alpha_, model.subsets_, kept) if kept else None
        model._member_systems = cached
    return cached


class CommitteeRidge(RegressorMixin, BaseEstimator):
    """Committee of ridge models on random subsamples (Imbalzano et al. 2021), calibrated.

    Parameters
    ----------
    n_members : number of ridge models in the committee (n_res).
    subsample : fraction of the train set each member sees (drawn without replacement).
    alphas : lambda grid searched by 5-fold CV on the whole train set; one lambda for all members.
    cv : number of CV folds (in order, no shuffle).
    random_state : seed of ``np.random.default_rng`` that draws the members' subsets.

    Attributes after ``fit``: ``alpha_``, ``cv_rmse_`` (per grid lambda), ``subsets_`` (m, n_sub),
    ``coef_`` (m, p), ``intercept_`` (m,), ``X_train_``, ``y_train_``, ``calibration_`` (1.0 until
    :meth:`calibrate`).  After ``calibrate``: ``calibration_``, ``calibration_alpha2_`` (raw
    estimate), ``calibration_warning_`` (None or why the floor was used), ``test_rmse_``.
    """

    def __init__(self, n_members=256, subsample=0.5, alphas=DEFAULT_ALPHAS, cv=5, random_state=0):
        self.n_members = n_members
        self.subsample = subsample
        self.alphas = alphas
        self.cv = cv
        self.random_state = random_state

    def _n_sub(self, n_train):
        n_sub = max(2, int(round(self.subsample * n_train)))
        if n_sub > n_train:
            raise ValueError(f"subsample={self.subsample} of {n_train} train structures gives "
                             f"{n_sub} rows per member; need at least 2 train structures")
        return n_sub

    def draw_subsets(self, n_train: int) -> np.ndarray:
        """Return the members' train-row subsets ``(n_members, n_sub)`` (each sorted), drawn
        without replacement from ``default_rng(random_state)``;
        ``n_sub = max(2, round(subsample * n_train))`` (Python's round: halves go to even)."""
        if self.n_members < 2:
            raise ValueError(f"a committee needs n_members >= 2, got {self.n_members}")
        n_sub = self._n_sub(n_train)
        rng = np.random.default_rng(self.random_state)
        return np.stack([np.sort(rng.choice(n_train, n_sub, replace=False))
                         for _ in range(self.n_members)])

    def fit(self, X, y):
        """Choose lambda by CV on ``(X, y)``, draw the subsets and fit every member."""
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        alpha, cv_rmse = select_ridge_alpha(X, y, self.alphas, self.cv)
        subsets = self.draw_subsets(X.shape[0])
        coef, intercept = fit_members(X, y, alpha, subsets)
        self._set_fitted(X, y, alpha, subsets, coef, intercept, cv_rmse)
        return self

    @classmethod
    def from_members(cls, X, y, alpha, subsets, coef, intercept, *, cv_rmse=None, **params):
        """Return a fitted committee assembled from members fitted elsewhere (e.g. by distributed
        ``fit_members`` calls on slices of ``draw_subsets``); equals ``fit`` on the same data."""
        model = cls(**params)
        X, y = check_X_y(X, y, dtype=np.float64, y_numeric=True)
        subsets = np.asarray(subsets, dtype=np.intp)
        coef = np.asarray(coef, dtype=np.float64)
        intercept = np.asarray(intercept, dtype=np.float64)
        m = model.n_members
        if subsets.shape[0] != m or coef.shape != (m, X.shape[1]) or intercept.shape != (m,):
            raise ValueError(f"members do not match n_members={m} and {X.shape[1]} features: "
                             f"subsets {subsets.shape}, coef {coef.shape}, intercept {intercept.shape}")
        model._set_fitted(X, y, float(alpha), subsets, coef, intercept,
                          None if cv_rmse is None else np.asarray(cv_rmse))
        return model

    def _set_fitted(self, X, y, alpha, subsets, coef, intercept, cv_rmse):
        self.__dict__.pop("_member_systems", None)   # member_systems' factors belong to one fit
        self.alpha_ = alpha
        self.cv_rmse_ = cv_rmse
        self.subsets_ = subsets
        self.coef_ = coef
        self.intercept_ = intercept
        self.X_train_ = X
        self.y_train_ = y
        self.n_features_in_ = X.shape[1]
        self.calibration_ = 1.0
        self.calibration_alpha2_ = None
        self.calibration_warning_ = None
        self.test_rmse_ = None

    def predict_members(self, X) -> np.ndarray:
        """Return every member's (uncalibrated) prediction, shape ``(n_samples, n_members)``."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_.T + self.intercept_

    def calibrate(self, X_test, y_test):
        """Set ``calibration_`` = alpha from the test set (DESIGN.md 3):
        ``alpha^2 = -1/m + (m-3)/(m-1) * mean[(y - ybar)^2 / sigma^2]`` with the uncalibrated
        committee mean ``ybar`` and std ``sigma`` (ddof=1).

        If ``alpha^2 <= 0`` (the committee spread is far larger than its errors) alpha is floored
        at ``1/sqrt(m)``: that is the resolution of the bias-corrected estimator (its -1/m term)
        and lies above the uncorrected estimate ``sqrt(mean[...])``, so the uncertainty is kept
        conservative instead of collapsing; ``calibration_warning_`` says so.
        """
        X_test, y_test = check_X_y(X_test, y_test, dtype=np.float64, y_numeric=True)
        pred = self.predict_members(X_test)
        m = pred.shape[1]
        y_bar = pred.mean(axis=1)
        sigma = pred.std(axis=1, ddof=1)
        if np.any(sigma <= 0):
            raise ValueError(f"{int(np.sum(sigma <= 0))} test structures have zero committee "
                             "spread (all members agree exactly), calibration is undefined; use "
                             "subsample < 1 so that members differ")
        alpha2 = -1.0 / m + (m - 3) / (m - 1) * np.mean((y_test - y_bar) ** 2 / sigma ** 2)
        self.calibration_alpha2_ = float(alpha2)
        if alpha2 <= 0:
            self.calibration_ = 1.0 / np.sqrt(m)
            self.calibration_warning_ = (
                f"calibration alpha^2 = {alpha2:.3g} <= 0 on {len(y_test)} test structures "
                f"(committee spread much larger than its errors); alpha floored at "
                f"1/sqrt(n_members) = {self.calibration_:.3g}")
        else:
            self.calibration_ = float(np.sqrt(alpha2))
            self.calibration_warning_ = None
        self.test_rmse_ = float(np.sqrt(np.mean((y_test - y_bar) ** 2)))
        return self

    def predict(self, X, return_std=False):
        """Return the committee mean (and with ``return_std`` the calibrated std
        ``calibration_ * std(ddof=1)``), in the units of ``y``."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        coef_mean, intercept_mean = self.coef_.mean(axis=0), self.intercept_.mean()
        if not return_std:
            return X @ coef_mean + intercept_mean
        # one product for the mean and every member's deviation from it (the deviations' weights are
        # the members' less their mean): the mean of the members' predictions and their std, without
        # a pass over the (n_samples, n_members) predictions for each
        out = X @ np.vstack([self.coef_ - coef_mean, coef_mean]).T
        out += np.append(self.intercept_ - intercept_mean, intercept_mean)
        deviation = out[:, :-1]
        spread = np.sqrt(np.einsum("ij,ij->i", deviation, deviation) / (len(self.coef_) - 1))
        return out[:, -1].copy(), self.calibration_ * spread
