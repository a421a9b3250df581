"""benchmarks/coverage.py's simulation against direct counts: the true risk it compares with is
the sum of the true window probabilities of what is left, and a higher confidence (a wider
likelihood region, hence a larger bound at every look) can only stop later."""

import numpy as np
from scipy import stats

from conftest import load_benchmark


def test_the_true_risk_is_the_sum_of_what_is_left_and_a_higher_confidence_stops_no_sooner():
    bench = load_benchmark("coverage")
    mu, s, tail = bench.pool(400)
    p = stats.t.cdf(-mu / np.hypot(bench.A0 * s, bench.EPS0), bench.DF0)
    assert np.all(np.diff(p) <= 0)                                   # measured in decreasing P(window)
    for m in (0, 150, 399):
        assert abs(tail[m] - p[m:].sum()) < 1e-9 * max(1.0, p[m:].sum())
    fixed = {250}
    looks = list(range(200, 401, 10))
    for rep in range(3):
        out = bench.replicate(rep, 400, [0.95, 0.99], looks, fixed)
        low, high = out[0.95], out[0.99]
        assert low["stop"] is not None and high["stop"] is not None
        assert high["stop"] >= low["stop"]
        assert low["stated_at_stop"] <= bench.TARGET and low["true_at_stop"] == tail[low["stop"]]
        assert high["fixed"][250][0] >= low["fixed"][250][0] * (1 - 1e-9)   # the wider region states more
