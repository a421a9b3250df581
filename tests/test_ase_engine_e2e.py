"""A small campaign whose reference level is a real GFN-FF relaxation, run by Celery workers."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
from ase.db import connect
from ase.io import read, write

from conftest import bundled, run_cli, settings_text


def test_gfnff_relaxation_campaign(tmp_path):
    frames = [a for a in read(bundled("benzamide", "landscape.extxyz"), ":")
              if len(a) == 32 and a.info["status"] == "converged"][:24]
    for atoms in frames:  # the reference level relaxes: give it something to do
        atoms.rattle(stdev=0.02, seed=len(atoms.info["name"]))
    pool = tmp_path / "benzamide24.extxyz"
    write(pool, frames, format="extxyz")
    settings = tmp_path / "settings.toml"
    settings.write_text(settings_text(
        pool, campaign={"n_init": 8, "n_batch": 4, "window": 10.0},
        engine={"engine": "ase", "calculator": "gfnff", "optimizer": "BFGS", "fmax": 0.1, "max_steps": 150},
    ))
    campaign = tmp_path / "campaign"
    run_cli("run", str(campaign), "--settings", str(settings), "--max-iterations", "2", "--quiet")

    with sqlite3.connect(campaign / "state.sqlite") as db:
        results = db.execute("SELECT idx, status, energy_ref, n_steps FROM results").fetchall()
        n_iterations = db.execute("SELECT COUNT(*) FROM iterations").fetchone()[0]
    assert n_iterations == 2
    assert len(results) == 12
    converged = [r for r in results if r[1] == "converged"]
    assert len(converged) >= 10, results
    assert all(r[3] > 0 for r in converged), "no optimiser step was taken"
    # each relaxation went downhill from its rattled start and kept its trajectory checkpoint
    for idx, _, energy_kjmol, _ in converged:
        e_ff = frames[idx].info["energy_ff"]
        assert energy_kjmol < e_ff + 5.0
        assert (campaign / "jobs" / f"{idx:06d}" / "relax.traj").exists()
    with connect(campaign / "relaxed.db") as db:
        relaxed = list(db.select())
    assert len(relaxed) >= len(converged)
    assert all(np.isfinite(row.toatoms().positions).all() for row in relaxed)
    summary = json.loads((campaign / "summary.json").read_text())
    assert summary["n_reference_calls"] == 12
