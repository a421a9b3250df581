"""Does the stated risk hold with the confidence it states, at fixed looks and at the stop?

An isolated check of the error law's confidence (`graceq.convergence`, point 4 and 5 of its
docstring), where every other part of a campaign is known: a pool of ``--pool-size`` structures
whose prediction gaps above the window's edge (in units of the median spread) and raw spreads are
drawn once; prospective errors drawn i.i.d. from a known t law (4 df, the spread grown by 1.3,
a noise of 0.6 spreads: the model the rule fits, so only the fit's finite-sample error is
tested); a campaign that measures the pool in decreasing order of its true probability of the
window; a statement (`error_laws` + `region_expected_missed`) every 10 calls from where the true
risk is 5 x the target, and the stop at the first statement <= the target (0.05). Per replicate:
the stop, the true expected misses there (the sum of the true probabilities of what is left), and
at four fixed looks (the true floor and 50, 100, 200 calls after it) whether the statement was at
least the truth. The first 20 calls (the initial batch) have no prospective error.

    python benchmarks/coverage.py --pool-size 400 --reps 200 --confidence 0.95 0.99 --jobs 2
    python benchmarks/coverage.py --pool-size 3000 --reps 80 --confidence 0.95 0.99 --jobs 2 --json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from joblib import Parallel, delayed
from scipy import special

from graceq import convergence as conv

DF0, A0, EPS0 = 4.0, 1.3, 0.6     # the true law: t, 4 df, scale sqrt((1.3 s)^2 + 0.6^2)
TARGET = 0.05


def pool(n: int, seed: int = 123):
    """Gaps above the window's edge and raw spreads, in decreasing order of the true P(window),
    and the true risk left after each number of calls."""
    rng = np.random.default_rng(seed)
    s = np.exp(rng.normal(0.0, 0.4, n))
    mu = rng.gamma(2.0, 6.0, n) - 1.0
    p = special.stdtr(DF0, -mu / np.hypot(A0 * s, EPS0))
    order = np.argsort(-p, kind="stable")
    tail = np.append(np.cumsum(p[order][::-1])[::-1], 0.0)      # tail[m]: true risk after m calls
    return mu[order], s[order], tail


def replicate(rep: int, n: int, confidences, looks, fixed) -> dict:
    mu, s, tail = pool(n)
    rng = np.random.default_rng(1000 + rep)
    errors = np.hypot(A0 * s, EPS0) * rng.standard_t(DF0, n)
    out = {c: {"stop": None, "true_at_stop": None, "stated_at_stop": None, "fixed": {}} for c in confidences}
    for m in looks:
        r, sp = errors[20:m], s[20:m]
        for c in confidences:
            o = out[c]
            if o["stop"] is not None and m not in fixed:
                continue
            stated, _ = conv.region_expected_missed(mu[m:], s[m:], 0.0, conv.error_laws(r, sp, c), (r, sp, None), c)
            if m in fixed:
                o["fixed"][m] = [float(stated), float(tail[m])]
            if o["stop"] is None and stated <= TARGET:
                o["stop"], o["true_at_stop"], o["stated_at_stop"] = m, float(tail[m]), float(stated)
        if all(out[c]["stop"] is not None for c in confidences) and m >= max(fixed):
            break
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=400)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--confidence", type=float, nargs="+", default=[0.95, 0.99])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the JSON object (every replicate) too")
    args = parser.parse_args(argv)
    n = args.pool_size
    _, _, tail = pool(n)
    m0 = int(np.argmax(tail <= 5 * TARGET)); m0 -= m0 % 10
    floor = int(np.argmax(tail <= TARGET))
    fixed = sorted({f for f in (floor - floor % 10 + k for k in (0, 50, 100, 200)) if f < n})
    looks = list(range(max(m0, 40), n + 1, 10))
    runs = Parallel(n_jobs=args.jobs)(delayed(replicate)(k, n, args.confidence, looks, set(fixed))
                                      for k in range(args.reps))
    summary = {"pool_size": n, "reps": args.reps, "true_floor": floor, "fixed_looks": fixed, "by_confidence": {}}
    for c in args.confidence:
        st = [r[c] for r in runs]
        stops = np.array([x["stop"] if x["stop"] is not None else n for x in st])
        stated = np.array([x["stated_at_stop"] if x["stop"] is not None else 0.0 for x in st])
        true = np.array([x["true_at_stop"] if x["stop"] is not None else 0.0 for x in st])
        summary["by_confidence"][str(c)] = {
            "stop_mean": round(float(stops.mean()), 1), "stop_min": int(stops.min()), "stop_max": int(stops.max()),
            "share_of_stops_stating_less_than_the_truth": round(float(np.mean(true > stated)), 4),
            "share_of_stops_with_true_risk_above_target": round(float(np.mean(true > TARGET)), 4),
            "stated_sum": round(float(stated.sum()), 3), "true_sum": round(float(true.sum()), 3),
            "fixed_look_share_stating_less_than_the_truth": {
                str(m): round(float(np.mean([x["fixed"][m][1] > x["fixed"][m][0] for x in st])), 4) for m in fixed},
        }
        b = summary["by_confidence"][str(c)]
        print(f"pool {n}, confidence {c}: stop {b['stop_mean']} ({b['stop_min']}-{b['stop_max']}) calls, true floor "
              f"{floor}; stops stating less than the truth {b['share_of_stops_stating_less_than_the_truth']:.1%}, "
              f"with the true risk above {TARGET}: {b['share_of_stops_with_true_risk_above_target']:.1%}; stated "
              f"{b['stated_sum']} / true {b['true_sum']} summed over the stops; at fixed looks "
              f"{b['fixed_look_share_stating_less_than_the_truth']}")
    if args.json:
        print(json.dumps(summary | {"runs": [{str(c): v for c, v in r.items()} for r in runs]}))


if __name__ == "__main__":
    main()
