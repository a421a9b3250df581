"""Farthest point sampling against a direct double loop."""

import numpy as np
import pytest

from graceq.selection import farthest_point_sampling


def fps_direct(X, n, start):
    """Obvious O(n^2 p) reference: distance of every row to every pick, lowest index on ties."""
    picks = [start]
    while len(picks) < n:
        best_row, best_dist = None, -1.0
        for row in range(len(X)):
            if row in picks:
                continue
            nearest = min(np.sum((X[row] - X[k]) ** 2) for k in picks)
            if nearest > best_dist:
                best_row, best_dist = row, nearest
        picks.append(best_row)
    return np.array(picks)


@pytest.mark.parametrize("n_rows, p, start", [(60, 5, 0), (80, 40, 17), (30, 1, 29)])
def test_fps_equals_direct_loop(n_rows, p, start):
    X = np.random.default_rng(n_rows).normal(size=(n_rows, p))
    np.testing.assert_array_equal(farthest_point_sampling(X, 20, start), fps_direct(X, 20, start))


def test_fps_ties_go_to_lowest_index_and_duplicates_come_last():
    grid = np.array([[i, j] for i in range(4) for j in range(4)], dtype=float)
    X = np.vstack([grid, grid[:3]])                   # exact ties everywhere, three duplicates
    picks = farthest_point_sampling(X, len(X), 5)
    np.testing.assert_array_equal(picks, fps_direct(X, len(X), 5))
    assert picks[1] == 15                             # (3,3) is the farthest from (1,1)
    assert set(picks[-3:].tolist()) <= {0, 1, 2, 16, 17, 18}
    assert len(set(picks.tolist())) == len(X)


def test_fps_blocks_do_not_change_the_result(monkeypatch):
    import graceq.selection as selection
    X = np.random.default_rng(0).random((50, 3))
    full = farthest_point_sampling(X, 25, 3)
    monkeypatch.setattr(selection, "_ROW_BLOCK", 7)
    np.testing.assert_array_equal(farthest_point_sampling(X, 25, 3), full)


def test_fps_rejects_bad_requests():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="cannot pick 5"):
        farthest_point_sampling(X, 5, 0)
    with pytest.raises(ValueError, match="start index 4"):
        farthest_point_sampling(X, 2, 4)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        farthest_point_sampling(np.zeros((0, 2)), 1, 0)
