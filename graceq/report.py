"""What a campaign tells its user: summary.json, a CSV of every structure, and plots.

All energies here are per molecule in the campaign unit; relative energies are measured from the
best reference energy found so far.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from graceq.campaign import per_molecule
from graceq.config import load_settings
from graceq.store import CampaignPaths, CampaignStore, atomic_write_json


def last_predictions(paths: CampaignPaths, iteration: int | None):
    """The pool predictions (mu, sigma per molecule) of the newest finished iteration, or None."""
    if iteration is None:
        return None
    path = paths.iteration(iteration) / "predictions.npz"
    return np.load(path) if path.exists() else None


def campaign_table(root: str | Path) -> list[dict]:
    """One row per pool structure: energies per molecule, prediction, outcome, iteration sampled."""
    paths = CampaignPaths(root)
    store = CampaignStore(paths.root)
    apm = int(store.get_meta("atoms_per_molecule"))
    s = store.structures()
    iterations = store.iterations()
    pred = last_predictions(paths, iterations[-1]["iteration"] if iterations else None)
    picks = {row[0]: row for row in store.pick_table()}
    results = {row[0]: row for row in store.result_table()}
    e_ff = per_molecule(s["energy_ff"], s["n_atoms"], apm)
    rows = []
    for i, name in enumerate(s["name"]):
        status, e_ref = (results[i][1], results[i][2]) if i in results else ("", None)
        rows.append({
            "name": name,
            "n_atoms": int(s["n_atoms"][i]),
            "energy_ff_per_molecule": float(e_ff[i]),
            "predicted_ref_per_molecule": float(pred["mu"][i]) if pred is not None else None,
            "sigma_per_molecule": float(pred["sigma"][i]) if pred is not None else None,
            "measured_ref_per_molecule": (
                float(per_molecule(e_ref, s["n_atoms"][i], apm)) if e_ref is not None else None
            ),
            "iteration_sampled": picks[i][1] if i in picks else None,
            "outcome": status or ("pending" if i in picks else "unlabelled"),
        })
    store.close()
    return rows


def write_summary(root: str | Path) -> dict:
    """Write summary.json and structures.csv in the campaign directory; returns the summary."""
    paths = CampaignPaths(root)
    settings = load_settings(paths.settings)
    store = CampaignStore(paths.root)
    iterations = store.iterations()
    rows = campaign_table(paths.root)
    window = settings.campaign.window
    measured = [(r["measured_ref_per_molecule"], r["name"]) for r in rows
                if r["outcome"] == "converged" and r["measured_ref_per_molecule"] is not None]
    best = min(measured)[0] if measured else None
    found = sorted((e, n) for e, n in measured if e <= best + window) if measured else []
    last = iterations[-1] if iterations else {}
    summary = {
        "campaign": str(paths.root),
        "n_pool": len(rows),
        "n_reference_calls": sum(1 for r in rows if r["outcome"] in ("converged", "unstable", "failed")),
        "n_unstable": sum(1 for r in rows if r["outcome"] == "unstable"),
        "n_failed": sum(1 for r in rows if r["outcome"] == "failed"),
        "window": window,
        "unit": settings.campaign.unit,
        "energy_basis": "per molecule",
        "best": best,
        "found": [n for _, n in found],
        "converged": last.get("stop") == "converged",
        "stop": last.get("stop"),
        "p_conv": last.get("p_conv"),
        "iterations": [
            {k: it.get(k) for k in ("iteration", "p_conv", "residual", "n_expected", "test_rmse", "alpha",
                                    "lambda", "n_labelled", "n_train", "n_reference_calls", "best", "max_ei")}
            for it in iterations
        ],
    }
    store.close()
    with open(paths.root / "structures.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_json(paths.summary, summary)
    return summary


def status_lines(root: str | Path) -> list[str]:
    """A short human summary of where a campaign stands (for `graceq status`)."""
    paths = CampaignPaths(root)
    store = CampaignStore(paths.root)
    settings = load_settings(paths.settings)
    iterations = store.iterations()
    picks = store.picks()
    results = store.results()
    running = []
    for idx, _ in picks:
        if idx not in results and (paths.job_dir(idx) / "lease.json").exists():
            running.append(idx)
    queued = sum(1 for idx, _ in picks if idx not in results) - len(running)
    unit = settings.campaign.unit
    lines = [f"campaign   {paths.root}", f"pool       {store.n_structures()} structures"]
    if iterations:
        it = iterations[-1]
        lines += [
            f"iteration  {it['iteration']} ({'stopped: ' + it['stop'] if it['stop'] else 'running'})",
            f"p_conv     {it['p_conv']:.4f}   residual {it['residual']:.2f} structures",
            f"best       {it['best']:.3f} {unit}/molecule; {it['n_measured']} measured within "
            f"{settings.campaign.window} {unit}/molecule",
            f"model      test RMSE {it['test_rmse']:.3f} {unit}/molecule, lambda {it['lambda']:.1e}, "
            f"alpha {it['alpha']:.2f}, {it['n_train']} training structures",
        ]
    else:
        lines.append("iteration  none finished yet")
    n_unstable = sum(1 for s, _ in results.values() if s == "unstable")
    n_failed = sum(1 for s, _ in results.values() if s == "failed")
    lines.append(f"sampled    {len(picks)} picked, {len(results)} done ({n_unstable} unstable, {n_failed} failed)")
    lines.append(f"reference  {len(running)} running, {queued} waiting")
    store.close()
    return lines
