"""Expected Improvement and Kriging-Believer batches (DESIGN.md section 5).

Energies seen by the acquisition are per molecule: ``E = offset + scale * y`` where ``y`` is the
committee's per-atom correction (``offset`` = force-field energy per molecule, ``scale`` = atoms per
molecule), and the calibrated uncertainty is ``|scale| * calibration * std(ddof=1)``.

Two implementations of the Kriging-Believer batch select the same structures:

- ``literal``: after every pick, append the pick with its believed label (the committee mean) to
  every member's rows and refit every member with ``sklearn.linear_model.Ridge`` (DESIGN.md 5 as
  written).  Cost: n_batch x n_members ridge fits.
- ``fast``: no refit.  A ridge member with unpenalised intercept is the solution of the bordered
  dual system ``[[0, 1^T], [1, K + lambda I]] [b; a] = [0; y]``; a believed point borders it with
  one row and column, so the member's prediction anywhere changes by
  ``kappa_i(x, z) * (t - f_i(z)) / s_i`` with ``kappa_i(x, z) = k(x, z) - c_x^T M_i^{-1} c_z``
  and the Schur complement ``s_i = k(z, z) + lambda - c_z^T M_i^{-1} c_z`` (``c_x`` = [1, k(x, rows
  of member i)]).  The changes are folded into every member's dual coefficients (all members at
  once, small batched products), so the exact member predictions of a pool row are one product
  of its pool x train Gram row with them.  Only rows that can still win are evaluated: ``kappa_i``
  is member i's posterior (ordinary-kriging) covariance, so by Cauchy-Schwarz a row's member
  predictions move by at most ``sqrt(kappa_i(x, x) * sum_l dev_il^2 / s_il)`` since its last exact
  evaluation (``kappa_i(x, x)`` only shrinks as points are believed, and is bounded by the
  squared distance to the member's mean row + lambda / n_sub); that bounds the committee std,
  the exact committee mean of every row costs one pool x features matrix-vector product per pick,
  and a row is recomputed (its Gram row computed once, then cached) only when its EI upper bound
  reaches the best exact EI of the pick.  The picks are those of the unpruned update, ties to the
  earliest candidate; no pool x train x members product is ever formed.
  The dual is well conditioned while a member's rows are affinely independent (at most p + 1);
  beyond that (few features, p < n_sub + n_batch) the update continues in the primal with
  Sherman-Morrison on ``[1 X]^T [1 X] + diag(0, lambda, ...)``, for every pool row.
  Memory: each member's matrix (``(1 + n_sub)^2`` doubles in the dual, ``(p + 1)^2`` in the
  primal; 8 GB for 256 members at 5,000 labelled) is kept only within ``_KEPT_BYTES``
  (``GRACEQ_KB_KEPT_MIB``, default 512 MiB); the other members are factorised again (Cholesky)
  at every pick, one member per thread at a time: the same picks, in bounded memory, for more
  time per pick.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.special import erfcx, ndtr
from sklearn.linear_model import Ridge
from graceq.model import in_slices, one_blas_thread

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
# Pool rows per block in set-up products (bounds temporaries to _BLOCK x n_train floats).
_BLOCK = 8192
# Rows refreshed in the first round when the EI bound cannot exclude them (doubles per round).
_REFRESH_FIRST = 64
# Relative margin added to the summed kriging variances against round-off (keeps the bound safe).
_VARIANCE_MARGIN = 1e-6
# Bytes of per-member matrices (bordered dual or primal inverses, 8 (1 + n_sub)^2 or 8 (p + 1)^2
# bytes per member) kept between picks; members beyond it are factorised again at every pick, one
# member per thread at a time. Bounds the coordinator's peak memory (256 members x 2,001^2 doubles
# = 8 GB at 5,000 labelled structures otherwise) at the price of time per pick; a machine with
# memory to spare sets GRACEQ_KB_KEPT_MIB higher (benchmarks/README.md has the trade-off).
_KEPT_BYTES = int(float(os.environ.get("GRACEQ_KB_KEPT_MIB", 512)) * 2**20)
# Bytes of the temporary matrices of one batched inversion (per thread).
_CHUNK_BYTES = 16 * 2**20


def expected_improvement(mu, sigma, best: float, window: float) -> np.ndarray:
    """Return EI for minimisation with target ``T = best + window`` (same energy unit as ``mu``):
    ``EI = (T - mu) Phi(Z) + sigma phi(Z)``, ``Z = (T - mu) / sigma``, and 0 where sigma == 0.

    For Z < 0 the equivalent form ``sigma exp(-Z^2/2) [1/sqrt(2 pi) + Z/2 erfcx(-Z/sqrt 2)]`` is
    used: the direct form cancels two nearly equal terms far above the window, this one keeps
    full relative precision there (both forms are the same function).
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    gap = (best + window) - mu
    ei = np.zeros(np.broadcast(mu, sigma).shape)
    pos = np.broadcast_to(sigma > 0, ei.shape)
    g = np.broadcast_to(gap, ei.shape)[pos]
    s = np.broadcast_to(sigma, ei.shape)[pos]
    z = g / s
    val = np.empty_like(z)
    hi = z >= 0
    val[hi] = g[hi] * ndtr(z[hi]) + s[hi] * _INV_SQRT_2PI * np.exp(-0.5 * z[hi] ** 2)
    lo = ~hi
    zl = z[lo]
    val[lo] = s[lo] * np.exp(-0.5 * zl ** 2) * (_INV_SQRT_2PI + 0.5 * zl * erfcx(-zl / np.sqrt(2.0)))
    ei[pos] = np.maximum(val, 0.0)
    return ei


def _per_row(value, n_pool, name):
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n_pool, float(arr))
    if arr.shape != (n_pool,):
        raise ValueError(f"{name} must be a scalar or one value per pool row ({n_pool}), "
                         f"got shape {arr.shape}")
    return arr


class _Batch:
    """Shared bookkeeping of one Kriging-Believer batch: energies, EI and picks."""

    def __init__(self, model, X_pool, candidates, best, window, n_batch, offset, scale):
        X_pool = np.asarray(X_pool, dtype=np.float64)
        if X_pool.ndim != 2 or X_pool.shape[1] != model.coef_.shape[1]:
            raise ValueError(f"pool features have shape {X_pool.shape}, the model expects "
                             f"{model.coef_.shape[1]} features per structure")
        self.cand = np.asarray(candidates, dtype=np.intp).ravel()
        if len(np.unique(self.cand)) != len(self.cand):
            raise ValueError("candidates contain repeated pool indices")
        if len(self.cand) and (self.cand.min() < 0 or self.cand.max() >= len(X_pool)):
            raise ValueError(f"candidate indices must lie in [0, {len(X_pool)})")
        n_pool = X_pool.shape[0]
        everything = len(self.cand) == n_pool and np.array_equal(self.cand, np.arange(n_pool))
        self.X = X_pool if everything else X_pool[self.cand]   # no copy of a large pool
        self.offset = _per_row(offset, n_pool, "offset")[self.cand]
        self.scale = _per_row(scale, n_pool, "scale")[self.cand]
        self.best, self.window = float(best), float(window)
        self.n_batch = min(int(n_batch), len(self.cand))
        self.cal = float(model.calibration_)
        self.open = np.ones(len(self.cand), dtype=bool)
        self.picks, self.ei = [], []
        self.n_refreshed = 0        # fast method: candidate rows recomputed exactly after the first pick

    def ei_of(self, rows, F):
        """EI of candidate rows ``rows`` given their member predictions ``F`` (rows, m)."""
        return self.ei_from(rows, F.mean(axis=1), F.std(axis=1, ddof=1))

    def ei_from(self, rows, mean, std):
        """EI of candidate rows from the uncalibrated committee mean and std (units of y)."""
        mu = self.offset[rows] + self.scale[rows] * mean
        sd = np.abs(self.scale[rows]) * self.cal * std
        return expected_improvement(mu, sd, self.best, self.window)

    def take(self, row, ei):
        self.open[row] = False
        self.picks.append(int(self.cand[row]))
        self.ei.append(float(ei))

    def result(self, return_ei):
        picks = np.asarray(self.picks, dtype=np.intp)
        return (picks, np.asarray(self.ei)) if return_ei else picks


def _argmax_open(ei, open_mask):
    score = np.where(open_mask, ei, -np.inf)
    row = int(np.argmax(score))
    return row, score[row]


def _kb_literal(model, b):
    X_tr, y_tr, alpha = model.X_train_, model.y_train_, model.alpha_
    coef, intercept = model.coef_.copy(), model.intercept_.copy()
    believed_X, believed_y = [], []
    for _ in range(b.n_batch):
        F = b.X @ coef.T + intercept
        row, ei = _argmax_open(b.ei_of(slice(None), F), b.open)
        b.take(row, ei)
        believed_X.append(b.X[row])
        believed_y.append(F[row].mean())
        if len(b.picks) == b.n_batch:
            break
        with one_blas_thread():      # small fits: 2 BLAS threads spin and run 20x slower under load
            for i, rows in enumerate(model.subsets_):
                ridge = Ridge(alpha=alpha).fit(np.vstack([X_tr[rows], believed_X]),
                                               np.concatenate([y_tr[rows], believed_y]))
                coef[i], intercept[i] = ridge.coef_, ridge.intercept_
    return b


class _PrimalMembers:
    """Solves with every member's primal matrix ``A_i = [1 X_i]^T [1 X_i] + diag(0, lambda, ...)``
    (X_i: member i's shifted rows, then the believed rows, which every member shares).

    The inverses of the first members are kept while they fit in ``_KEPT_BYTES`` and updated by
    Sherman-Morrison as points are believed; the other members' ``A_i`` are formed and
    Cholesky-factorised again at every solve (memory of one member per thread, more time).
    """

    def __init__(self, Xt, subsets, alpha, believed):
        self.Xt, self.subsets, self.alpha = Xt, subsets, alpha
        m, p = len(subsets), Xt.shape[1]
        self.believed = [row for row in believed]
        self.kept = int(min(m, _KEPT_BYTES // (8 * (p + 1) ** 2)))
        self.Ainv = np.empty((self.kept, p + 1, p + 1))

        def invert(first, last):
            for i in range(first, last):
                self.Ainv[i] = np.linalg.inv(self._matrix(i))

        with one_blas_thread():
            in_slices(invert, self.kept)

    def _matrix(self, i):
        rows = self.Xt[self.subsets[i]]
        if self.believed:
            rows = np.concatenate([rows, np.asarray(self.believed)])
        Xa = np.concatenate([np.ones((len(rows), 1)), rows], axis=1)
        A = Xa.T @ Xa
        A[1:, 1:] += self.alpha * np.eye(A.shape[0] - 1)
        return A

    def solve(self, xa):
        """Return ``A_i^{-1} xa`` for every member i, shape (m, p + 1)."""
        from scipy.linalg import cho_factor, cho_solve

        m = len(self.subsets)
        h = np.empty((m, len(xa)))
        h[:self.kept] = self.Ainv @ xa

        def streamed(first, last):
            for i in range(first, last):
                h[self.kept + i] = cho_solve(cho_factor(self._matrix(self.kept + i), check_finite=False), xa,
                                             check_finite=False)

        with one_blas_thread():
            in_slices(streamed, m - self.kept)
        return h

    def believe(self, xa, h, s):
        """Add the believed row ``xa = [1, x - shift]`` to every member (h, s: from `solve`)."""
        k = self.kept
        self.Ainv -= h[:k, :, None] * (h[:k] / s[:k, None])[:, None, :]
        self.believed.append(xa[1:].copy())


def _primal_loop(b, F, shift, members, row=None):
    """Finish the batch with primal Sherman-Morrison updates of every member and of every pool
    row (no pruning: used when the features are fewer than a member's rows, so p is small).
    ``F``: current member predictions of all candidates; ``members``: a `_PrimalMembers`;
    ``row``: a pick already taken whose update is still due."""
    while True:
        if row is None:
            row, best_ei = _argmax_open(b.ei_of(slice(None), F), b.open)
            b.take(row, best_ei)
        if len(b.picks) == b.n_batch:
            return b
        f_z = F[row].copy()
        dev = f_z.mean() - f_z                          # believed label minus each member
        xa = np.concatenate([[1.0], b.X[row] - shift])
        h = members.solve(xa)                           # (m, p+1)
        s = 1.0 + h @ xa
        step = h[:, 0] - shift @ h[:, 1:].T             # (x - shift) . h = x . h - shift . h
        for lo in range(0, len(F), _BLOCK):             # no shifted copy of the pool
            F[lo:lo + _BLOCK] += (b.X[lo:lo + _BLOCK] @ h[:, 1:].T + step) * (dev / s)
        members.believe(xa, h, s)
        row = None




def _kb_fast(model, b):
    X_tr, alpha, subsets = model.X_train_, model.alpha_, model.subsets_
    m, n_sub = subsets.shape
    n_train, p = X_tr.shape
    F0 = b.X @ model.coef_.T + model.intercept_          # same start as the literal recipe
    shift = X_tr.mean(axis=0)                           # translation changes no member, helps conditioning
    Xt = X_tr - shift
    # The dual (bordered Gram) system is well conditioned while a member's rows are affinely
    # independent (at most p + 1 of them), the primal one once they are at least p + 1: dual while
    # rows <= p + 1, then the primal for good.
    if n_sub >= p + 1:
        return _primal_loop(b, F0, shift, _PrimalMembers(Xt, subsets, alpha, []))
    n_cand = len(b.cand)
    n_dual = min(b.n_batch, p + 1 - n_sub)              # believed rows the dual can take
    d0 = 1 + n_sub
    dual = _DualMembers(Xt @ Xt.T, subsets, alpha)      # bordered systems before any belief
    member_idx = np.arange(m)[:, None]
    in_member = np.zeros((m, n_train))
    in_member[member_idx, subsets] = 1.0 / n_sub
    U = _kriging_variance_bound(b.X, shift, in_member @ Xt, alpha / n_sub)
    del in_member
    # Member i now predicts F0_i(x) + theta_i . [1, k(x, train rows), k(x, believed rows)]
    # (k: dot products of shifted features); theta holds the dual-coefficient changes.
    theta = np.zeros((1 + n_train + n_dual, m))
    Zq = np.zeros((n_dual, p))                          # believed rows, shifted
    Ulr = np.zeros((m, d0 + n_dual, n_dual))            # M^{-1} = pad(Minv0) + Ulr diag(1/s) Ulr^T
    sinv = np.zeros((m, n_dual))
    Qcum = np.zeros((n_dual + 1, m))                    # cumulative squared innovation / Schur
    mean0 = F0.mean(axis=1)
    mean_u = mean0.copy()                               # exact committee mean of every row
    std0 = F0.std(axis=1, ddof=1)
    mean_at, dnorm = mean_u.copy(), std0 * np.sqrt(m - 1)  # at each row's last exact refresh
    stale_since = np.zeros(n_cand, dtype=np.intp)
    ei0 = b.ei_from(slice(None), mean_u, std0)
    gram_rows = _GramRowCache(b.X, shift, Xt)
    n_believed = 0

    def refresh(rows):
        """Exact member predictions of candidate rows now."""
        rows = np.atleast_1d(rows)
        K = gram_rows(rows)
        F = F0[rows] + theta[0] + K @ theta[1:1 + n_train]
        if n_believed:
            F += (b.X[rows] - shift) @ Zq[:n_believed].T @ theta[1 + n_train:1 + n_train + n_believed]
        return F

    # per pick: small products and matrix-vector products only, where BLAS threads just spin
    with one_blas_thread():
        for j in range(b.n_batch):
            if j == 0:
                row, best_ei = _argmax_open(ei0, b.open)
                f_z = F0[row].copy()
            else:
                row, best_ei, f_z = _pruned_argmax(b, j, refresh, U, Qcum, mean_u, mean_at, dnorm,
                                                   stale_since, m)
            b.take(row, best_ei)
            if j == b.n_batch - 1:
                break
            if n_sub + j >= p + 1:                      # the next row would break affine independence
                # members' primal weights from their dual changes, then every row exactly
                W = model.coef_ + theta[1:1 + n_train].T @ Xt + theta[1 + n_train:1 + n_train + j].T @ Zq[:j]
                c0 = model.intercept_ + theta[0] - (W - model.coef_) @ shift
                F = np.empty((n_cand, m))
                for lo in range(0, n_cand, _BLOCK):
                    F[lo:lo + _BLOCK] = b.X[lo:lo + _BLOCK] @ W.T + c0
                del dual, Ulr
                return _primal_loop(b, F, shift, _PrimalMembers(Xt, subsets, alpha, Zq[:j]), row=row)
            dev = f_z.mean() - f_z                      # believed label minus each member
            zq = b.X[row] - shift
            d = d0 + j
            c = np.empty((m, d))                        # [1, k(rows of member i, z)]
            c[:, 0] = 1.0
            c[:, 1:d0] = gram_rows(np.array([row]))[0][subsets]
            c[:, d0:d] = Zq[:j] @ zq
            g = np.zeros((m, d))                        # M_i^{-1} c_i

            dual.solve(c[:, :d0], g[:, :d0])
            if j:
                V = Ulr[:, :d, :j]
                g += np.matmul(V, (np.matmul(c[:, None, :], V)[:, 0, :] * sinv[:, :j])[:, :, None])[:, :, 0]
            s = zq @ zq + alpha - np.einsum("mi,mi->m", c, g)   # Schur complement = kappa(z,z) + lambda
            beta = dev / s
            Ulr[:, :d, j] = g
            Ulr[:, d, j] = -1.0
            sinv[:, j] = 1.0 / s
            # kappa_i(x, z) = [1, k(x, train), k(x, believed), k(x, z)] . [-g_i, +1]: member i's
            # dual coefficients move by beta_i times that
            bg = beta[:, None] * g
            theta[0] -= bg[:, 0]
            theta[1 + subsets, member_idx] -= bg[:, 1:d0]
            theta[1 + n_train:1 + n_train + j] -= bg[:, d0:d].T
            theta[1 + n_train + j] += beta
            Zq[j] = zq
            n_believed = j + 1
            Qcum[j + 1] = Qcum[j] + dev ** 2 / s
            tbar = theta[:1 + n_train + n_believed].mean(axis=1)
            v = Xt.T @ tbar[1:1 + n_train] + Zq[:n_believed].T @ tbar[1 + n_train:]
            c_mean = tbar[0] - shift @ v

            def update_mean(first, last):               # exact committee mean of every row
                mean_u[first:last] = mean0[first:last] + b.X[first:last] @ v + c_mean

            in_slices(update_mean, n_cand)
    return b


class _DualMembers:
    """Solves with every member's bordered dual matrix ``M_i = [[0, 1^T], [1, K_i + lambda I]]``
    (K_i: Gram matrix of member i's shifted rows, a block of ``G``) before any belief.

    The inverses of the first members are kept while they fit in ``_KEPT_BYTES``; the others are
    factorised again at every solve (Cholesky of ``K_i + lambda I``, then the border by its Schur
    complement), one member per thread at a time, so that memory stays bounded.
    """

    def __init__(self, G, subsets, alpha):
        m, n_sub = subsets.shape
        d0 = n_sub + 1
        self.subsets, self.alpha = subsets, alpha
        self.kept = int(min(m, _KEPT_BYTES // (8 * d0 * d0)))
        self.G = G if self.kept < m else None
        self.Minv0 = np.empty((self.kept, d0, d0))

        step = max(1, min(32, _CHUNK_BYTES // (8 * d0 * d0)))

        def invert(first, last):
            for lo in range(first, last, step):
                idx = subsets[lo:min(lo + step, last)]
                M = np.zeros((len(idx), d0, d0))
                M[:, 0, 1:] = 1.0
                M[:, 1:, 0] = 1.0
                M[:, 1:, 1:] = G[idx[:, :, None], idx[:, None, :]] + alpha * np.eye(n_sub)
                self.Minv0[lo:lo + len(idx)] = np.linalg.inv(M)

        with one_blas_thread():                      # batched small LAPACK calls: threads only spin
            in_slices(invert, self.kept)

    def solve(self, c, out):
        """``out[i] = M_i^{-1} c[i]`` for every member i (c, out: (m, 1 + n_sub))."""
        from scipy.linalg import cho_factor, cho_solve

        k = self.kept

        def kept(lo, hi):
            out[lo:hi] = np.matmul(self.Minv0[lo:hi], c[lo:hi, :, None])[:, :, 0]

        def streamed(first, last):
            for i in range(k + first, k + last):
                idx = self.subsets[i]
                K = self.G[np.ix_(idx, idx)]
                K[np.diag_indices_from(K)] += self.alpha
                uv = cho_solve(cho_factor(K, lower=True, check_finite=False),
                               np.column_stack([np.ones(len(idx)), c[i, 1:]]), check_finite=False)
                # [[0, 1^T], [1, K]] [x0; x] = [c0; c]: x = v - u x0, 1^T x = c0 (u = K^-1 1, v = K^-1 c)
                x0 = (uv[:, 1].sum() - c[i, 0]) / uv[:, 0].sum()
                out[i, 0] = x0
                out[i, 1:] = uv[:, 1] - uv[:, 0] * x0

        in_slices(kept, k)
        in_slices(streamed, len(self.subsets) - k)


class _GramRowCache:
    """Rows of the pool x train Gram matrix (shifted features), computed when first needed:
    only the few pool rows that can still win are ever evaluated exactly."""

    def __init__(self, X, shift, Xt):
        self.X, self.shift, self.Xt = X, shift, Xt
        self.slot = np.full(len(X), -1, dtype=np.intp)
        self.store = np.empty((min(len(X), 1024), len(Xt)))
        self.used = 0

    def __call__(self, rows):
        new = np.unique(rows[self.slot[rows] < 0])
        if len(new):
            while self.used + len(new) > len(self.store):
                self.store = np.concatenate([self.store, np.empty_like(self.store)])
            self.store[self.used:self.used + len(new)] = (self.X[new] - self.shift) @ self.Xt.T
            self.slot[new] = np.arange(self.used, self.used + len(new))
            self.used += len(new)
        return self.store[self.slot[rows]]


def _kriging_variance_bound(X, shift, member_means, alpha_per_row):
    """Return an upper bound of sum_i kappa_i(x, x) for every row of X: member i's posterior
    (ordinary-kriging) variance is min over weights w on its rows with sum(w) = 1 of
    |x - sum_r w_r x_r|^2 + lambda |w|^2, and uniform weights give |x - mean_i|^2 + lambda/n_sub.
    A relative round-off margin keeps the bound safe."""
    m = len(member_means)
    total = member_means.sum(axis=0)                    # member means are already shifted
    const = np.einsum("ij,ij->", member_means, member_means) + m * alpha_per_row
    U = np.empty(len(X))
    for lo in range(0, len(X), _BLOCK):
        Xb = X[lo:lo + _BLOCK] - shift
        sq = np.einsum("ij,ij->i", Xb, Xb)
        U[lo:lo + _BLOCK] = m * sq - 2.0 * Xb @ total + const
        U[lo:lo + _BLOCK] = np.maximum(U[lo:lo + _BLOCK], 0.0) + _VARIANCE_MARGIN * (m * sq + const)
    return U


def _pruned_argmax(b, j, refresh, U, Qcum, mean_u, mean_at, dnorm, stale_since, m):
    """Return (row, EI, member predictions) of the open candidate with the largest exact EI at
    pick j, refreshing only the rows whose EI upper bound reaches the best exact EI found.

    Bound: since its last refresh at pick j0, member i's prediction at x moved by at most
    sqrt(kappa_i(x,x) * sum_l dev_il^2 / s_il) (Cauchy-Schwarz in the member's posterior kernel,
    whose variance only shrinks as points are believed), so the committee std is at most
    (||d_j0|| + sqrt(U(x) max_i Q_i - m (mean shift)^2)) / sqrt(m - 1); the mean is exact.
    """
    stale = np.flatnonzero(b.open)
    qmax = (Qcum[j] - Qcum[:j + 1]).max(axis=1)         # per refresh step j0
    shift2 = m * (mean_u[stale] - mean_at[stale]) ** 2
    extra = np.sqrt(np.maximum(U[stale] * qmax[stale_since[stale]] - shift2 * (1 - 1e-9), 0.0))
    sd_ub = (dnorm[stale] + extra) / np.sqrt(m - 1) * (1 + 1e-9)
    ub = b.ei_from(stale, mean_u[stale], sd_ub) * (1 + 1e-9)
    # the few largest bounds usually suffice: sort those first, the rest only if they are reached
    head = min(len(ub), 4 * _REFRESH_FIRST)
    order = np.argpartition(-ub, head - 1)[:head] if head < len(ub) else np.arange(len(ub))
    order = order[np.argsort(-ub[order], kind="stable")]
    best, best_row, best_F = -np.inf, -1, None
    k, chunk = 0, _REFRESH_FIRST
    while True:
        if k >= len(order) and len(order) < len(ub):
            rest = np.setdiff1d(np.arange(len(ub)), order, assume_unique=True)
            order = np.concatenate([order, rest[np.argsort(-ub[rest], kind="stable")]])
        if k >= len(order) or ub[order[k]] < best:
            break
        sel = order[k:k + chunk]
        sel = sel[ub[sel] >= best]
        rows = stale[sel]
        b.n_refreshed += len(rows)
        F = refresh(rows)
        mean = F.mean(axis=1)
        std = F.std(axis=1, ddof=1)
        mean_u[rows] = mean_at[rows] = mean
        dnorm[rows] = std * np.sqrt(m - 1)
        stale_since[rows] = j
        ei = b.ei_from(rows, mean, std)
        top = ei.max()
        if top > best or (top == best and rows[ei == top].min() < best_row):
            at = np.flatnonzero(ei == top)
            at = at[np.argmin(rows[at])]
            best, best_row, best_F = top, int(rows[at]), F[at].copy()
        k += len(order[k:k + chunk])
        chunk *= 2
    return best_row, best, best_F


def kriging_believer(model, X_pool, candidates, best, window, n_batch, offset=0.0, scale=1.0,
                     method="fast", return_ei=False):
    """Return the pool indices picked by a Kriging-Believer batch of ``n_batch`` EI maximisations
    (in pick order; with ``return_ei`` also each pick's EI when it was picked).

    ``model``: a fitted (and calibrated) :class:`graceq.model.CommitteeRidge`; ``X_pool``: features
    of the whole pool; ``candidates``: pool indices that may be picked (unlabelled structures);
    ``best``, ``window``: lowest measured reference energy and window, per molecule;
    ``offset``, ``scale``: scalars or one value per pool row, the EI sees
    ``offset + scale * prediction``.  Believed labels (committee means) never change ``best``.
    Ties in EI go to the earliest candidate.  ``n_batch`` is capped at ``len(candidates)``.
    """
    b = _Batch(model, X_pool, candidates, best, window, n_batch, offset, scale)
    if b.n_batch <= 0:
        return b.result(return_ei)
    if method == "literal":
        _kb_literal(model, b)
    elif method == "fast":
        _kb_fast(model, b)
    else:
        raise ValueError(f"unknown Kriging-Believer method {method!r}: use 'fast' or 'literal'")
    return b.result(return_ei)
