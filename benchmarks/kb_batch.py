"""Benchmark: fast (bordered, exact) vs literal (scikit-learn refit) Kriging-Believer batch.

    python benchmarks/kb_batch.py [--json] [--p 2100 --n-labelled 1000 --n-pool 20000
                                   --n-members 256 --n-batch 100] [--skip-100k]
    python benchmarks/kb_batch.py --memory [1000 2000 5000] [--n-batch 100] [--picks K]  # peak memory

Random but realistic data: features like averaged SOAP power spectra (positive, strongly
correlated through a few latent packing coordinates, unit-normalised), a per-atom delta target
that is smooth in the latents plus noise, force-field energies per molecule spread over tens of
kJ/mol.  The literal recipe is timed for a few picks only (it refits every member after every
pick) and extrapolated per pick; its picks are compared with the first fast picks.  The 100k-pool
run happens in a subprocess so that its peak resident memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from graceq.acquisition import kriging_believer
from graceq.model import CommitteeRidge

ATOMS_PER_MOLECULE = 23      # ROY
WINDOW_KJMOL = 5.0


def make_campaign(p, n_labelled, n_pool, seed=0):
    """Return (X_labelled, y_labelled, X_pool, e_ff_pool, e_ref_labelled) with energies per
    molecule in kJ/mol and y per atom."""
    rng = np.random.default_rng(seed)
    n = n_labelled + n_pool
    rank = 24
    latent = rng.normal(size=(n, rank)) * (0.8 ** np.arange(rank))      # decaying spectrum
    loadings = rng.normal(size=(rank, p))
    X = np.empty((n, p))
    for lo in range(0, n, 10_000):                      # in blocks: no pool-sized temporaries
        block = np.log1p(np.exp(latent[lo:lo + 10_000] @ loadings / 2.0))
        block += 0.02 * rng.random(block.shape)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        X[lo:lo + 10_000] = block
    e_ff = 8.0 * latent[:, 0] + 4.0 * np.sin(latent[:, 1]) + 3.0 * rng.normal(size=n)
    y = (1.5 * np.tanh(latent[:, 2]) + 0.8 * latent[:, 0] * latent[:, 3] / 2
         + 0.4 * rng.normal(size=n)) / ATOMS_PER_MOLECULE
    e_ff = e_ff - e_ff.min() + 0.0
    e_ref = e_ff + ATOMS_PER_MOLECULE * y
    return X[:n_labelled], y[:n_labelled], X[n_labelled:], e_ff[n_labelled:], e_ref[:n_labelled]


def fitted_model(X_lab, y_lab, n_members):
    n_train = int(0.8 * len(X_lab))
    model = CommitteeRidge(n_members=n_members).fit(X_lab[:n_train], y_lab[:n_train])
    return model.calibrate(X_lab[n_train:], y_lab[n_train:])


def run_100k(args):
    """Child process: one fast batch on a 100,000-structure pool; prints JSON."""
    X_lab, y_lab, X_pool, e_ff, e_ref = make_campaign(args.p, args.n_labelled, 100_000, seed=1)
    model = fitted_model(X_lab, y_lab, args.n_members)
    t0 = time.perf_counter()
    picks = kriging_believer(model, X_pool, np.arange(len(X_pool)), e_ref.min(), WINDOW_KJMOL,
                             args.n_batch, offset=e_ff, scale=ATOMS_PER_MOLECULE, method="fast")
    elapsed = time.perf_counter() - t0
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB -> GiB
    print(json.dumps({"fast_s_per_batch_100k": elapsed, "peak_memory_gib_100k": rss_gib,
                      "n_picks_100k": len(picks)}))


def _status_gib(field):
    """A VmRSS/VmHWM figure of /proc/self/status in GiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2 ** 20
    raise KeyError(field)


def run_memory(args):
    """Child process: peak resident memory of one fast batch at args.n_labelled; prints JSON.

    The data and the fitted committee are made first; then the kernel's high-water mark (VmHWM) is
    reset to the current resident size (/proc/self/clear_refs, Linux >= 4.0), so that the peak read
    after the batch is the coordinator's peak during the batch: features + committee + the batch's
    own arrays, not the committee fit's (which runs on the workers)."""
    from graceq import acquisition

    X_lab, y_lab, X_pool, e_ff, e_ref = make_campaign(args.p, args.n_labelled, args.n_pool, seed=2)
    t0 = time.perf_counter()
    model = fitted_model(X_lab, y_lab, args.n_members)
    fit_s = time.perf_counter() - t0
    n_sub = model.subsets_.shape[1]
    per_member = 8 * (min(n_sub, args.p) + 1) ** 2
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_gib("VmRSS")
    taken = []
    if args.picks:  # stop the batch after this many picks: every set-up allocation is the full batch's
        class _Enough(Exception):
            pass

        take = acquisition._Batch.take

        def take_and_stop(batch, row, ei):
            take(batch, row, ei)
            taken.append(time.perf_counter())
            if len(batch.picks) >= args.picks:
                raise _Enough

        acquisition._Batch.take = take_and_stop
    t0 = time.perf_counter()
    try:
        picks = kriging_believer(model, X_pool, np.arange(len(X_pool)), e_ref.min(), WINDOW_KJMOL, args.n_batch,
                                 offset=e_ff, scale=ATOMS_PER_MOLECULE, method="fast")
    except Exception as exc:
        if type(exc).__name__ != "_Enough":
            raise
        picks = taken
    elapsed = time.perf_counter() - t0
    print(json.dumps({
        "n_labelled": args.n_labelled, "n_train": len(model.X_train_), "n_sub": n_sub, "p": args.p,
        "n_pool": args.n_pool, "n_members": args.n_members, "n_batch": args.n_batch,
        "picks_made": len(picks),
        "form": "dual" if n_sub < args.p + 1 else "primal",
        "members_kept": int(min(args.n_members, acquisition._KEPT_BYTES // per_member))
        if hasattr(acquisition, "_KEPT_BYTES") else args.n_members,
        "rss_before_batch_gib": round(before, 3), "peak_rss_batch_gib": round(_status_gib("VmHWM"), 3),
        "fast_s_per_pick": round(elapsed / len(picks), 3), "fit_s": round(fit_s, 1),
        "s_per_pick_after_first": round((taken[-1] - taken[0]) / (len(taken) - 1), 2) if len(taken) > 1 else None,
        "setup_s": round(taken[0] - t0, 2) if taken else None,
    }))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--p", type=int, default=2100)
    parser.add_argument("--n-labelled", type=int, default=1000)
    parser.add_argument("--n-pool", type=int, default=20000)
    parser.add_argument("--n-members", type=int, default=256)
    parser.add_argument("--n-batch", type=int, default=100)
    parser.add_argument("--literal-picks", type=int, default=3, help=">= 2")
    parser.add_argument("--skip-100k", action="store_true")
    parser.add_argument("--child-100k", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", type=int, nargs="*", metavar="N_LABELLED",
                        help="only measure the coordinator's peak memory during one fast batch at these "
                             "labelled counts (default 1000 2000 5000), each in its own process")
    parser.add_argument("--picks", type=int, default=0,
                        help="with --memory: stop each batch after this many picks (0: the whole batch)")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_100k:
        return run_100k(args)
    if args.child_memory:
        return run_memory(args)
    if args.memory is not None:
        rows = []
        for n in args.memory or [1000, 2000, 5000]:
            child = subprocess.run([sys.executable, __file__, "--child-memory", "--p", str(args.p), "--n-labelled",
                                    str(n), "--n-pool", str(args.n_pool), "--n-members", str(args.n_members),
                                    "--n-batch", str(args.n_batch), "--picks", str(args.picks)],
                                   capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            if not args.json:
                print(json.dumps(rows[-1]), file=sys.stderr)
        print(json.dumps({"memory": rows}, indent=None if args.json else 2))
        return

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    X_lab, y_lab, X_pool, e_ff, e_ref = make_campaign(args.p, args.n_labelled, args.n_pool)
    t0 = time.perf_counter()
    model = fitted_model(X_lab, y_lab, args.n_members)
    fit_s = time.perf_counter() - t0
    log(f"committee fitted in {fit_s:.1f} s: lambda={model.alpha_:g}, alpha={model.calibration_:.3f}, "
        f"test RMSE={model.test_rmse_ * ATOMS_PER_MOLECULE:.2f} kJ/mol per molecule")
    common = (model, X_pool, np.arange(len(X_pool)), e_ref.min(), WINDOW_KJMOL)
    kw = dict(offset=e_ff, scale=ATOMS_PER_MOLECULE, return_ei=True)

    t0 = time.perf_counter()
    fast, ei_fast = kriging_believer(*common, args.n_batch, method="fast", **kw)
    fast_s = time.perf_counter() - t0
    log(f"fast: {args.n_batch} picks in {fast_s:.2f} s")

    # literal: k picks cost k pool predictions and k - 1 refits of every member; one pick costs
    # one prediction, so (t_k - t_1) / (k - 1) is what each further pick costs
    k = args.literal_picks
    t0 = time.perf_counter()
    kriging_believer(*common, 1, method="literal", **kw)
    literal_1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    lit, ei_lit = kriging_believer(*common, k, method="literal", **kw)
    literal_k = time.perf_counter() - t0
    literal_per_pick = (literal_k - literal_1) / (k - 1)
    log(f"literal: 1 pick in {literal_1:.2f} s, {k} picks in {literal_k:.2f} s")
    result = {
        "p": args.p, "n_labelled": args.n_labelled, "n_pool": args.n_pool,
        "n_members": args.n_members, "n_batch": args.n_batch,
        "lambda": model.alpha_, "calibration_alpha": model.calibration_, "fit_s": round(fit_s, 3),
        "literal_s_per_pick": literal_per_pick,
        "literal_s_first_pick": literal_1, "literal_s_first_k_picks": literal_k,
        "fast_s_per_pick": fast_s / args.n_batch,
        "speedup": literal_per_pick / (fast_s / args.n_batch),
        "identical": bool(np.array_equal(lit, fast[:k])),
        "ei_max_rel_diff": float(np.max(np.abs(ei_lit - ei_fast[:k]) / ei_lit)),
        "literal_note": (f"literal run for 1 pick and for {k} picks ({k - 1} refits of all "
                         f"{args.n_members} members with sklearn Ridge, single-threaded BLAS: its "
                         f"fastest setting here); per pick = (t_{k} - t_1) / {k - 1} = one refit "
                         f"round + one pool prediction, what each pick of a full literal batch "
                         f"costs; its {k} picks are compared with the first {k} of {args.n_batch} "
                         "fast picks; fast per pick = whole fast batch including set-up / n_batch"),
    }
    if not args.skip_100k:
        child = subprocess.run([sys.executable, __file__, "--child-100k", "--p", str(args.p),
                                "--n-labelled", str(args.n_labelled), "--n-members",
                                str(args.n_members), "--n-batch", str(args.n_batch)],
                               capture_output=True, text=True, check=True)
        result.update(json.loads(child.stdout.strip().splitlines()[-1]))
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
