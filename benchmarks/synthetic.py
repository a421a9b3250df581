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


def draw(n: int = 3000, seed: int = 0, d: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, d), E_ff and E_ref per molecule (kJ/mol)."""
    rng = np.random.default_rng([seed, 7])
    features = rng.normal(size=(n, d))
    e_ff = rng.gamma(3.0, 6.0, n)
    w = rng.normal(size=d)
    w *= 6.0 / np.sqrt(w @ w)  # the learnable delta's standard deviation: 6 kJ/mol
    e_ref = e_ff + features @ w + 1.5 * rng.standard_t(4.0, n)
    return features, e_ff, e_ref


def landscape(n: int = 3000, seed: int = 0, d: int = 30, retro=None):
    """The pool (``retro.ReplayPool``: energies total per cell in kJ/mol, every reference job
    stable) and its features; ``retro`` the benchmarks' retro module (imported when None)."""
    if retro is None:
        import retro
    features, e_ff, e_ref = draw(n, seed, d)
    pool = retro.ReplayPool(source=f"synthetic-{n}-seed{seed}", frames=[],
                            names=np.array([f"synthetic-{i:05d}" for i in range(n)], dtype=object),
                            n_atoms=np.full(n, ATOMS), energy_ff=e_ff, atoms_per_molecule=ATOMS,
                            outcomes=[("converged", float(e)) for e in e_ref])
    return pool, features


def main(argv=None) -> None:
    """``python benchmarks/synthetic.py [--n 3000] [--landscapes 0 1 2] [--seeds 0 ... 9] [--window 10]``:
    campaigns (n_init 20, n_batch 10, the defaults) with the default error law and with the
    spread's alone, each to its stop and full recall; JSON per landscape and law."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import retro

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--landscapes", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--laws", nargs="+", default=["spread_and_noise", "spread"])
    args = parser.parse_args(argv)
    for land in args.landscapes:
        pool, features = landscape(args.n, land, retro=retro)
        window = pool.window_structures(args.window)
        ff = retro.calls_to_full_recall(np.argsort(pool.energy_ff_mol, kind="stable").tolist(), window)
        for law in args.laws:
            runs = []
            for seed in args.seeds:
                settings = retro.make_settings(pool.source, "kJ/mol", args.window, 20, 10, seed, error_law=law)
                fig = retro.run_method(pool, features, window, settings)
                runs.append({k: fig[k] for k in ("calls_to_full_recall", "calls_at_stop", "recall_at_stop",
                                                 "stated_risk_at_stop")})
            print(json.dumps({"landscape": land, "n_pool": args.n, "n_window": len(window), "error_law": law,
                              "force_field_order": ff,
                              "mean_calls_to_full_recall": float(np.mean([r["calls_to_full_recall"] for r in runs])),
                              "mean_calls_at_stop": float(np.mean([r["calls_at_stop"] for r in runs])),
                              "per_seed": runs}), flush=True)


if __name__ == "__main__":
    main()
