"""A synthetic landscape of CSP size with known answers, for the benchmarks that need a pool larger
than the bundled ones (ROY-264: 264 structures; benzamide: 683 stable).

A CSP generation pool holds thousands of force-field minima. How full a campaign keeps its slots
until its stop depends on how long the campaign is against the few median job lengths that the
last jobs take to come back, so a pool of a few hundred, which a campaign measures almost whole
before it can stop, says little about a pool of thousands. This one is drawn, seeded, to the
shape the campaign assumes and no more:

- ``E_ff`` per molecule: gamma-distributed above the pool's minimum (shape 3, scale 6 kJ/mol:
  mean 18, few structures near the minimum, as force-field landscapes are);
- features: ``d`` standard normal columns (a descriptor's principal components);
- the delta ``E_ref - E_ff``: linear in the features with a standard deviation of 6 kJ/mol (the
  part a ridge can learn) plus Student-t noise of 4 degrees of freedom, scale 1.5 kJ/mol (the part
  it cannot; heavy tails, as the reference energies of the bundled pools have).

No constant is fitted to a bundled pool: the numbers above set a landscape where the force field
ranks badly (the delta's spread is comparable to the window) and the model can learn, which is
the case graceq is for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ATOMS = 10  # atoms per cell, one molecule per cell


FAMILIES = ("linear", "height_noise", "hidden_family", "curved")
NOISE_DF = 4.0  # the unlearnable noise's t law


def draw(n: int = 3000, seed: int = 0, d: int = 30, family: str = "linear") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, d), E_ff and E_ref per molecule (kJ/mol).

    ``family`` (the landscapes of the stress test, ``--families``): ``linear``, the shape above; the
    others break one assumption of the stop rule's error law each, with the same features, force
    field and learnable delta (the ``linear`` landscape's draws come first, in the same order):

    - ``height_noise``: the unlearnable noise grows with the force-field height h above the pool's
      minimum, scale ``0.5 + 0.05 h`` kJ/mol per molecule (0.5 at the bottom, 1.4 at the mean
      height of 18 kJ/mol, 2.5 at 40, the same as the other families on average): strained, high force-field minima move further and less
      predictably when re-minimised. The structures a campaign leaves unmeasured are the high
      ones, whose errors are larger than those of the picks the law is fitted to.
    - ``hidden_family``: a packing motif the force field under-binds. The 2.5 % of structures
      furthest along one random direction of the descriptor get 10 kJ/mol per molecule more
      binding at the reference level, a step no linear delta represents.
    - ``curved``: a part of the delta that is quadratic along one random direction ``q`` of the
      descriptor, ``-4 (q^2 - 1) / sqrt(2)`` kJ/mol per molecule (standard deviation 4, invisible to
      a ridge on the features: uncorrelated with every linear function of them), pulling the
      structures at large ``|q|`` down by up to 20 kJ/mol: errors that are smooth in descriptor
      space, so neighbours share them and the committee's spread does not see them.
    """
    features, e_ff, loc, scale, noise = _law(n, seed, d, family)
    return features, e_ff, loc + scale * noise


def _law(n: int, seed: int, d: int, family: str):
    """``draw``'s landscape as its law: features, E_ff, the reference energy's location (E_ff plus
    every part of the delta but the noise), the noise's scale (kJ/mol per molecule) and the
    standard t draws (4 df) of the noise."""
    if family not in FAMILIES:
        raise ValueError(f"unknown landscape family {family!r}; one of {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, 7])
    features = rng.normal(size=(n, d))
    e_ff = rng.gamma(3.0, 6.0, n)
    w = rng.normal(size=d)
    w *= 6.0 / np.sqrt(w @ w)  # the learnable delta's standard deviation: 6 kJ/mol
    noise = rng.standard_t(NOISE_DF, n)
    loc, scale = e_ff + features @ w, np.full(n, 1.5)
    if family != "linear":
        u = rng.normal(size=d)
        q = features @ (u / np.sqrt(u @ u))  # a standard normal coordinate along a random direction
        if family == "height_noise":
            scale = 0.5 + 0.05 * (e_ff - e_ff.min())
        elif family == "hidden_family":
            loc = loc - 10.0 * (q >= np.quantile(q, 0.975))
        else:
            loc = loc - 4.0 * (q ** 2 - 1.0) / np.sqrt(2.0)
    return features, e_ff, loc, scale, noise


def true_p_window(n: int = 3000, seed: int = 0, d: int = 30, family: str = "linear",
                  window: float = 10.0) -> tuple[np.ndarray, int]:
    """Each structure's probability of lying in the window under the landscape's own law, given
    everything but its noise (what a rule that knew the delta exactly could state), and the floor
    of such a rule: the fewest calls after which it could state 0.05 expected window structures
    unmeasured. Any rule's honest statement about a set of unmeasured structures is at least the
    sum of their probabilities here."""
    from scipy import special

    features, e_ff, loc, scale, noise = _law(n, seed, d, family)
    threshold = float((loc + scale * noise).min()) + window
    p = special.stdtr(NOISE_DF, (threshold - loc) / scale)
    floor = int(n - np.searchsorted(np.cumsum(np.sort(p)), 0.05, side="right"))
    return p, floor


def landscape(n: int = 3000, seed: int = 0, d: int = 30, retro=None, family: str = "linear"):
    """The pool (``retro.ReplayPool``: energies total per cell in kJ/mol, every reference job
    stable) and its features; ``retro`` the benchmarks' retro module (imported when None)."""
    if retro is None:
        import retro
    features, e_ff, e_ref = draw(n, seed, d, family)
    name = f"synthetic-{n}-seed{seed}" + ("" if family == "linear" else f"-{family}")
    pool = retro.ReplayPool(source=name, frames=[],
                            names=np.array([f"synthetic-{i:05d}" for i in range(n)], dtype=object),
                            n_atoms=np.full(n, ATOMS), energy_ff=e_ff, atoms_per_molecule=ATOMS,
                            outcomes=[("converged", float(e)) for e in e_ref])
    return pool, features


def _run(pool, features, window, settings, p_true, threads: int) -> dict:
    """One campaign to its stop and full recall (in a worker process with ``--jobs``);
    ``true_expected_missed``: the sum of ``p_true`` (``true_p_window``) over the structures it left
    unmeasured at its stop, what its statement there should have been at least."""
    import retro
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads or None):
        trace, fig = retro.run_to_recall_and_stop(pool, features, window, settings)
    out = {k: fig[k] for k in ("calls_to_full_recall", "calls_at_stop", "recall_at_stop", "stated_risk_at_stop",
                               "missed_at_stop")}
    unmeasured = np.setdiff1d(np.arange(len(pool)), trace.order[:fig["calls_at_stop"]])
    out["true_expected_missed"] = round(float(p_true[unmeasured].sum()), 4)
    return out


def main(argv=None) -> None:
    """``python benchmarks/synthetic.py [--n 3000] [--landscapes 0 1 2] [--seeds 0 ... 9] [--window 10]
    [--families linear height_noise hidden_family curved] [--jobs 2]``: campaigns (n_init 20,
    n_batch 10, the defaults) with the default error law and with the spread's alone, each to its
    stop and full recall; JSON per family, landscape and law (``missed_at_stop``: window structures
    unmeasured at the stop, against ``stated_risk_at_stop``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import retro
    from joblib import Parallel, delayed

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--landscapes", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--laws", nargs="+", default=["spread_and_noise", "spread"])
    parser.add_argument("--families", nargs="+", default=["linear"], choices=FAMILIES,
                        help="landscape families (draw's docstring): linear, or one broken assumption each")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (one BLAS thread each)")
    args = parser.parse_args(argv)
    for family in args.families:
        for land in args.landscapes:
            pool, features = landscape(args.n, land, retro=retro, family=family)
            window = pool.window_structures(args.window)
            p_true, floor = true_p_window(args.n, land, family=family, window=args.window)
            ff = retro.calls_to_full_recall(np.argsort(pool.energy_ff_mol, kind="stable").tolist(), window)
            for law in args.laws:
                settings = [retro.make_settings(pool.source, "kJ/mol", args.window, 20, 10, seed, error_law=law)
                            for seed in args.seeds]
                runs = Parallel(n_jobs=args.jobs)(delayed(_run)(pool, features, window, s, p_true, 1 if args.jobs > 1 else 0)
                                                  for s in settings)
                print(json.dumps({"family": family, "landscape": land, "n_pool": args.n, "n_window": len(window),
                                  "error_law": law, "force_field_order": ff, "floor_true_law": floor,
                                  "mean_calls_to_full_recall": float(np.mean([r["calls_to_full_recall"] for r in runs])),
                                  "mean_calls_at_stop": float(np.mean([r["calls_at_stop"] for r in runs])),
                                  "early_stops": int(sum(r["missed_at_stop"] > 0 for r in runs)),
                                  "missed_at_stop": int(sum(r["missed_at_stop"] for r in runs)),
                                  "stated_risk_sum": round(float(sum(r["stated_risk_at_stop"] for r in runs)), 4),
                                  "true_expected_missed_sum": round(float(sum(r["true_expected_missed"] for r in runs)), 4),
                                  "stops_below_the_true_floor": int(sum(r["calls_at_stop"] < floor for r in runs)),
                                  "per_seed": runs}), flush=True)


if __name__ == "__main__":
    main()
