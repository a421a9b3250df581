"""Benchmark the descriptor: fit of the radial compression plus featurisation of a whole pool.

    python benchmarks/featurize.py [--pool PATH] [--json]

Default pool: the bundled ROY-264 (264 crystals, 54-432 atoms). Each thread setting runs in its
own subprocess with ``RAYON_NUM_THREADS`` set, because featomic sizes its thread pool once at
start. Reports per setting: fit time, featurisation speed (structures per second), features,
variance kept per (species, l) (min / mean), the child's peak resident memory
(``ru_maxrss``), and the speed of featomic's full (n_max = 14, uncompressed) ``SoapPowerSpectrum``
on a few structures against this module on the same structures.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import resource
import subprocess
import sys
import time

N_COMPARE = 8  # structures for the full-power-spectrum comparison


def default_pool() -> str:
    return str(importlib.resources.files("graceq") / "data" / "roy264" / "roy264.extxyz")


def worker(pool: str) -> dict:
    """Run the measurement in this process; return the figures as a dict."""
    import ase.io
    import featomic
    import numpy as np

    from graceq.features import CompressedSoap, species_of

    frames = ase.io.read(pool, ":")
    soap = CompressedSoap(species_of(frames))

    start = time.perf_counter()
    soap.fit(frames)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    features = soap.transform(frames)
    transform_s = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    ratio = soap.explained_variance_ratio_
    per_species = {
        str(z): round(float(np.nanmin(ratio[a])), 4) for a, z in enumerate(soap._species())
    }

    few = frames[:N_COMPARE]
    start = time.perf_counter()
    soap.transform(few)
    compressed_s = time.perf_counter() - start
    full = featomic.SoapPowerSpectrum(**soap.hypers())
    start = time.perf_counter()
    full.compute(few)
    full_s = time.perf_counter() - start
    n_species = len(soap._species())
    full_features = n_species * (n_species + 1) // 2 * int(soap.n_max) ** 2 * (int(soap.l_max) + 1)

    return {
        "threads": int(os.environ.get("RAYON_NUM_THREADS", "0")),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "n_structures": len(frames),
        "n_atoms": int(sum(len(f) for f in frames)),
        "species": soap._species(),
        "n_features": int(features.shape[1]),
        "fit_s": round(fit_s, 3),
        "transform_s": round(transform_s, 3),
        "fit_plus_features_s": round(fit_s + transform_s, 3),
        "structures_per_s": round(len(frames) / transform_s, 2),
        "structures_per_s_fit_plus_features": round(len(frames) / (fit_s + transform_s), 2),
        "variance_kept_min": round(float(np.nanmin(ratio)), 4),
        "variance_kept_mean": round(float(np.nanmean(ratio)), 4),
        "variance_kept_min_per_species": per_species,
        "peak_rss_mib": round(peak_mib, 1),
        "compare_n_structures": len(few),
        "compressed_s": round(compressed_s, 3),
        "full_n14_power_spectrum_s": round(full_s, 3),
        "full_n14_features": int(full_features),
        "full_over_compressed_time": round(full_s / compressed_s, 2),
    }


def run_child(pool: str, threads: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, __file__, "--worker", "--pool", pool],
        env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark child ({threads} threads) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=default_pool(), help="extxyz pool (default ROY-264)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.pool)))
        return

    runs = [run_child(args.pool, threads) for threads in (1, 2)]
    result = {"pool": args.pool, "runs": runs}
    if args.json:
        print(json.dumps(result))
        return
    first = runs[0]
    print(f"pool: {args.pool}")
    print(f"  {first['n_structures']} structures, {first['n_atoms']} atoms, species {first['species']}")
    print(f"  features: {first['n_features']} (full n_max=14 power spectrum: "
          f"{first['full_n14_features']})")
    print(f"  variance kept per (species, l): min {first['variance_kept_min']:.4f}, "
          f"mean {first['variance_kept_mean']:.4f}; min per species "
          f"{first['variance_kept_min_per_species']}")
    for run in runs:
        print(f"threads={run['threads']}: fit {run['fit_s']:.2f} s, features {run['transform_s']:.2f} s "
              f"({run['structures_per_s']:.1f} structures/s), fit+features "
              f"{run['fit_plus_features_s']:.2f} s, peak RSS {run['peak_rss_mib']:.0f} MiB "
              f"(machine load average {run['load_average_1min_at_end']})")
        print(f"  full n_max=14 SoapPowerSpectrum on {run['compare_n_structures']} structures: "
              f"{run['full_n14_power_spectrum_s']:.2f} s vs compressed {run['compressed_s']:.2f} s "
              f"(full / compressed = {run['full_over_compressed_time']:.2f}x)")


if __name__ == "__main__":
    main()
