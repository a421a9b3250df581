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
  of member i)]).  All members are updated at once with products over the pool x train Gram
  matrix computed once.  When the features are fewer than a member's rows (p <= n_sub, where
  scikit-learn also solves the primal) the same update is done in the primal with
  Sherman-Morrison on ``[1 X]^T [1 X] + diag(0, lambda, ...)``, which stays well conditioned for
  tiny lambda.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfcx, ndtr
from sklearn.linear_model import Ridge

_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


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
        raise ValueError(f"{name} must be a scalar or one value per pool row ({n_pool}), got shape {arr.shape}")
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
        self.X = X_pool[self.cand]
        self.offset = _per_row(offset, n_pool, "offset")[self.cand]
        self.scale = _per_row(scale, n_pool, "scale")[self.cand]
        self.best, self.window = float(best), float(window)
        self.n_batch = min(int(n_batch), len(self.cand))
        self.cal = float(model.calibration_)
        self.open = np.ones(len(self.cand), dtype=bool)
        self.picks, self.ei = [], []

    def ei_of(self, rows, F):
        """EI of candidate rows ``rows`` given their member predictions ``F`` (rows, m)."""
        mu = self.offset[rows] + self.scale[rows] * F.mean(axis=1)
        sd = np.abs(self.scale[rows]) * self.cal * F.std(axis=1, ddof=1)
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
        for i, rows in enumerate(model.subsets_):
            ridge = Ridge(alpha=alpha).fit(np.vstack([X_tr[rows], believed_X]),
                                           np.concatenate([y_tr[rows], believed_y]))
            coef[i], intercept[i] = ridge.coef_, ridge.intercept_
    return b


def _primal_inverse(rows_X, alpha):
    """Return ``[1 X]^T [1 X] + diag(0, lambda, ...)`` inverted, per member: rows_X (m, R, p)."""
    m, _, p = rows_X.shape
    Xa = np.concatenate([np.ones(rows_X.shape[:2] + (1,)), rows_X], axis=2)
    A = np.einsum("mnp,mnq->mpq", Xa, Xa)
    A[:, 1:, 1:] += alpha * np.eye(p)
    return np.linalg.inv(A)


def _kb_fast(model, b):
    X_tr, alpha, subsets = model.X_train_, model.alpha_, model.subsets_
    m, n_sub = subsets.shape
    n_train, p = X_tr.shape
    F = b.X @ model.coef_.T + model.intercept_          # same start as the literal recipe
    shift = X_tr.mean(axis=0)                           # translation changes no member, helps conditioning
    Xt = X_tr - shift
    Xq = b.X - shift
    ei = b.ei_of(slice(None), F)
    believed = []                                       # candidate rows believed so far
    # The dual (bordered Gram) system is well conditioned while a member's rows are affinely
    # independent (at most p + 1 of them), the primal one once they are at least p + 1: use the
    # dual while rows <= p + 1 and switch to the primal for good when more are added.
    dual = n_sub <= p + 1
    if dual:
        Kp = Xq @ Xt.T                                  # pool x train Gram, once
        G = Xt @ Xt.T
        d0 = 1 + n_sub
        d_max = d0 + min(b.n_batch, p + 1 - n_sub)
        Minv = np.zeros((m, d_max, d_max))
        M = np.zeros((m, d0, d0))
        M[:, 0, 1:] = 1.0
        M[:, 1:, 0] = 1.0
        M[:, 1:, 1:] = G[subsets[:, :, None], subsets[:, None, :]] + alpha * np.eye(n_sub)
        Minv[:, :d0, :d0] = np.linalg.inv(M)
        del M
        Kz = np.zeros((len(Xq), d_max - d0))            # pool x believed Gram, a column per pick
        member_idx = np.arange(m)[:, None]
    else:
        Ainv = _primal_inverse(Xt[subsets], alpha)
    for j in range(b.n_batch):
        row, best_ei = _argmax_open(ei, b.open)
        b.take(row, best_ei)
        if j == b.n_batch - 1:
            break
        f_z = F[row].copy()
        dev = f_z.mean() - f_z                          # believed label minus each member
        if dual and n_sub + j >= p + 1:                 # the next row would break affine independence
            dual = False
            del Minv, Kp, Kz
            rows_X = np.concatenate([Xt[subsets], np.broadcast_to(Xq[believed], (m, j, p))], axis=1)
            Ainv = _primal_inverse(rows_X, alpha)
        if dual:
            d = d0 + j
            c = np.empty((m, d))
            c[:, 0] = 1.0
            c[:, 1:d0] = Kp[row, subsets]
            c[:, d0:d] = Kz[row, :j]
            g = np.einsum("mij,mj->mi", Minv[:, :d, :d], c)
            kzz = Xq[row] @ Xq[row]
            s = kzz + alpha - np.einsum("mi,mi->m", c, g)
            Kz[:, j] = Xq @ Xq[row]
            Gs = np.zeros((n_train, m))
            Gs[subsets, member_idx] = g[:, 1:d0]
            kappa = Kz[:, j:j + 1] - g[:, 0] - Kp @ Gs - Kz[:, :j] @ g[:, d0:d].T
            F += kappa * (dev / s)
            gs = g / s[:, None]
            Minv[:, :d, :d] += g[:, :, None] * gs[:, None, :]
            Minv[:, :d, d] = -gs
            Minv[:, d, :d] = -gs
            Minv[:, d, d] = 1.0 / s
        else:
            xa = np.concatenate([[1.0], Xq[row]])
            h = Ainv @ xa                               # (m, p+1)
            s = 1.0 + h @ xa
            F += (Xq @ h[:, 1:].T + h[:, 0]) * (dev / s)
            Ainv -= h[:, :, None] * (h / s[:, None])[:, None, :]
        believed.append(row)
        ei = b.ei_of(slice(None), F)
    return b


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
