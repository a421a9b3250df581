"""Farthest point sampling of the initial batch (DESIGN.md section 4)."""

from __future__ import annotations

import numpy as np

# Rows per block when computing distances to the newest pick: bounds the temporary to
# _ROW_BLOCK x n_features floats.
_ROW_BLOCK = 4096


def farthest_point_sampling(X, n: int, start: int) -> np.ndarray:
    """Return ``n`` row indices of ``X`` in pick order: ``start`` first, then repeatedly the row
    whose Euclidean distance to its nearest already-picked row is largest.

    Ties go to the lowest row index.  Distances are computed from coordinate differences (not
    from ``|a|^2 + |b|^2 - 2 a.b``, which is what skmatter's ``FPS`` does and which turns exact
    duplicates and exact ties into round-off), so the result equals a direct double loop.
    Duplicated rows are picked only after every distinct row (their distance is 0).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"farthest point sampling needs a non-empty 2-D feature array, got shape {X.shape}")
    n_rows = X.shape[0]
    n = int(n)
    start = int(start)
    if not 1 <= n <= n_rows:
        raise ValueError(f"cannot pick {n} structures by farthest point sampling from a pool of {n_rows}")
    if not 0 <= start < n_rows:
        raise ValueError(f"start index {start} is outside the pool of {n_rows} structures")
    picks = np.empty(n, dtype=np.intp)
    nearest = np.full(n_rows, np.inf)       # squared distance to the nearest pick so far
    picked = np.zeros(n_rows, dtype=bool)
    new = start
    for k in range(n):
        picks[k] = new
        picked[new] = True
        if k == n - 1:
            break
        x_new = X[new]
        for lo in range(0, n_rows, _ROW_BLOCK):
            diff = X[lo:lo + _ROW_BLOCK] - x_new
            np.minimum(nearest[lo:lo + _ROW_BLOCK], np.einsum("ij,ij->i", diff, diff),
                       out=nearest[lo:lo + _ROW_BLOCK])
        score = np.where(picked, -np.inf, nearest)
        new = int(np.argmax(score))
    return picks
