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


def test_wilson_interval_matches_scipy_and_the_figure_redraws_from_saved_output(tmp_path):
    import json

    bench = load_benchmark("coverage")
    for k, n in ((0, 80), (47, 800), (11, 800), (80, 80), (3, 200)):
        lo, hi = bench.wilson(k, n)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert abs(lo - ref.low) < 1e-3 and abs(hi - ref.high) < 1e-3
    # a two-replicate run, saved as --json prints it, summarised and drawn again
    fixed, looks = [250], list(range(200, 401, 10))
    runs = [{str(c): v for c, v in bench.replicate(rep, 400, [0.95], looks, set(fixed)).items()} for rep in range(2)]
    out = {"pool_size": 400, "reps": 2, "true_floor": 220, "fixed_looks": fixed, "by_confidence": {"0.95": {}},
           "runs": json.loads(json.dumps(runs))}
    summary = bench.summarise(out["runs"], 400, "0.95", 220, fixed)
    stated = [r["0.95"]["stated_at_stop"] for r in runs]
    true = [r["0.95"]["true_at_stop"] for r in runs]
    assert summary["share_of_stops_stating_less_than_the_truth"] == np.mean(np.array(true) > np.array(stated))
    saved = tmp_path / "out.json"
    saved.write_text("pool 400, confidence 0.95: ...\n" + json.dumps(out) + "\n")
    figure = tmp_path / "coverage.png"
    bench.main(["--from-json", str(saved), "--plot", str(figure)])
    assert figure.stat().st_size > 10_000
