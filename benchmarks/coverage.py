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

    python benchmarks/coverage.py --pool-size 400 --reps 800 --confidence 0.95 --jobs 2 --json > OUT95.json
    python benchmarks/coverage.py --pool-size 3000 --reps 80 --confidence 0.95 0.99 --jobs 2 --json
    python benchmarks/coverage.py --from-json OUT95.json OUT99.json --plot PNG    # redraw saved outputs

Shares are printed with Wilson's 95 % interval: with 200 replicates a share of 5 % is known only to
within 2.8-8.8 %, so a shortfall of a point needs about 800 to show.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from scipy import special
from tqdm import tqdm

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


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95 % interval of a share k / n (a binomial proportion; exact enough at n >= 80)."""
    p, d = k / n, 1.0 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return round(float(centre - half), 4), round(float(centre + half), 4)


def _percent(interval) -> str:
    return f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f} %"


def summarise(runs: list, n: int, confidence: float, floor: int, fixed) -> dict:
    """One confidence's figures over the replicates ``runs`` (``replicate``'s outputs, keyed by the
    confidence as a float or as its string), with Wilson intervals of the shares."""
    st = [r.get(confidence, r.get(str(confidence))) for r in runs]
    stops = np.array([x["stop"] if x["stop"] is not None else n for x in st])
    stated = np.array([x["stated_at_stop"] if x["stop"] is not None else 0.0 for x in st])
    true = np.array([x["true_at_stop"] if x["stop"] is not None else 0.0 for x in st])
    short, above = int(np.sum(true > stated)), int(np.sum(true > TARGET))

    def look(x, m):                        # [stated, true] at look m (int keys, or str once read from JSON)
        return x["fixed"][m] if m in x["fixed"] else x["fixed"][str(m)]

    fixed_short = {str(m): int(sum(look(x, m)[1] > look(x, m)[0] for x in st)) for m in fixed}
    return {
        "stop_mean": round(float(stops.mean()), 1), "stop_min": int(stops.min()), "stop_max": int(stops.max()),
        "true_floor": floor,
        "share_of_stops_stating_less_than_the_truth": round(short / len(st), 4),
        "share_of_stops_stating_less_than_the_truth_95ci": wilson(short, len(st)),
        "share_of_stops_with_true_risk_above_target": round(above / len(st), 4),
        "share_of_stops_with_true_risk_above_target_95ci": wilson(above, len(st)),
        "stated_sum": round(float(stated.sum()), 3), "true_sum": round(float(true.sum()), 3),
        "fixed_look_share_stating_less_than_the_truth": {m: round(k / len(st), 4) for m, k in fixed_short.items()},
        "fixed_look_share_95ci": {m: wilson(k, len(st)) for m, k in fixed_short.items()},
    }


def plot(outputs: list[dict], path) -> "Path":
    """The benchmark as a figure: left, the stated against the true expected misses at each stop
    (log-log; below the diagonal the bound fell short); right, the share of bounds below the truth
    at the fixed looks and at the stop, with Wilson 95 % intervals, against 1 - confidence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from retro import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.6))
    bars, labels = [], []
    k = 0
    for out in outputs:
        for c in out["by_confidence"]:
            b = summarise(out["runs"], out["pool_size"], c, out["true_floor"], out["fixed_looks"])
            color = f"C{k}"
            k += 1
            st = [r[c] for r in out["runs"] if r[c]["stop"] is not None]
            true = np.array([x["true_at_stop"] for x in st])
            stated = np.array([x["stated_at_stop"] for x in st])
            left.scatter(np.maximum(true, 1e-4), np.maximum(stated, 1e-2), s=6, alpha=0.5, color=color,
                         label=f"confidence {float(c):g}: {len(st)} stops, {b['share_of_stops_stating_less_than_the_truth']:.1%} below the truth")
            looks = [(f"look {m}", v, b["fixed_look_share_95ci"][m])
                     for m, v in b["fixed_look_share_stating_less_than_the_truth"].items()]
            looks.append(("stop", b["share_of_stops_stating_less_than_the_truth"],
                          b["share_of_stops_stating_less_than_the_truth_95ci"]))
            x = np.arange(len(looks)) + 0.35 * (k - 1)
            y = np.array([v for _, v, _ in looks])
            err = np.array([[v - lo, hi - v] for _, v, (lo, hi) in looks]).T
            bars.append(right.errorbar(x, y, yerr=err, fmt="o", color=color, capsize=3,
                                       label=f"confidence {float(c):g} ({out['reps']} replicates)"))
            right.axhline(1 - float(c), color=color, ls=":", lw=1)
            labels = [name for name, _, _ in looks]
    lim = [1e-4, 1.0]
    left.plot(lim, lim, "k-", lw=0.8)
    left.axhline(TARGET, color="grey", ls="--", lw=0.8)
    left.axvline(TARGET, color="grey", ls="--", lw=0.8)
    left.set(xscale="log", yscale="log", xlim=lim, ylim=[1e-2, 0.2], xlabel="true expected misses at the stop",
             ylabel="stated expected misses at the stop",
             title=f"pool of {outputs[0]['pool_size']}: the stop's statement against the truth")
    left.legend(fontsize=7, loc="lower right")
    right.set_xticks(np.arange(len(labels)) + 0.175)
    right.set_xticklabels(labels)
    right.set(ylabel="share of bounds below the truth", ylim=(0, None),
              title="fixed looks (calls) and the stop; dotted: 1 - confidence")
    right.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=400)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--confidence", type=float, nargs="+", default=[0.95, 0.99])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the JSON object (every replicate) too")
    parser.add_argument("--plot", metavar="PNG", help="also draw the statements against the truth")
    parser.add_argument("--from-json", metavar="FILE", nargs="+",
                        help="instead of running: draw --plot from saved --json outputs (one or more)")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot PNG")
        # the JSON object is the output's last line that is one (the summary lines come before it)
        outputs = [json.loads([line for line in Path(f).read_text().splitlines() if line.startswith("{")][-1])
                   for f in args.from_json]
        print(plot(outputs, args.plot))
        return
    n = args.pool_size
    _, _, tail = pool(n)
    m0 = int(np.argmax(tail <= 5 * TARGET)); m0 -= m0 % 10
    floor = int(np.argmax(tail <= TARGET))
    fixed = sorted({f for f in (floor - floor % 10 + k for k in (0, 50, 100, 200)) if f < n})
    looks = list(range(max(m0, 40), n + 1, 10))
    # a bar on stderr (a TTY only), the replicates in order (joblib's generator keeps it)
    runs = list(tqdm(Parallel(n_jobs=args.jobs, return_as="generator")(
        delayed(replicate)(k, n, args.confidence, looks, set(fixed)) for k in range(args.reps)),
        total=args.reps, desc=f"replicates, pool of {n}", unit="replicate", disable=None))
    summary = {"pool_size": n, "reps": args.reps, "true_floor": floor, "fixed_looks": fixed, "by_confidence": {}}
    for c in args.confidence:
        b = summary["by_confidence"][str(c)] = summarise(runs, n, c, floor, fixed)
        print(f"pool {n}, confidence {c}: stop {b['stop_mean']} ({b['stop_min']}-{b['stop_max']}) calls, true floor "
              f"{floor}; stops stating less than the truth {b['share_of_stops_stating_less_than_the_truth']:.1%} "
              f"(95 % interval {_percent(b['share_of_stops_stating_less_than_the_truth_95ci'])}), with the true risk above "
              f"{TARGET}: {b['share_of_stops_with_true_risk_above_target']:.1%}; stated {b['stated_sum']} / true "
              f"{b['true_sum']} summed over the stops; at fixed looks {b['fixed_look_share_stating_less_than_the_truth']}")
    out = summary | {"runs": [{str(c): v for c, v in r.items()} for r in runs]}
    if args.plot:
        print(f"figure: {plot([json.loads(json.dumps(out))], args.plot)}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
