"""Input checks that a new user met as tracebacks, dead ends or silently changed data.

Each test feeds one bad input through `graceq init` (a real subprocess) or `graceq.pool.read_pool` and
checks the message: which file, which structure, what is wrong and what to do, never a traceback.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import sqlite3
import warnings
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import tomli_w

from conftest import picks_of, run_cli, settings_text
from graceq.pool import (
    ENERGY_BOUND_FACTOR,
    InputError,
    energy_bound_ev_per_atom,
    identical_structures,
    min_labelled,
    read_pool,
)

ROY = importlib.resources.files("graceq") / "data" / "roy264" / "roy264.extxyz"


@pytest.fixture(scope="module")
def roy_frames():
    return ase.io.read(ROY, ":")


@pytest.fixture
def roy12(roy_frames):
    """Twelve small ROY cells (fresh copies the test may edit)."""
    return [f.copy() for f in roy_frames if len(f) <= 108][:12]


def _write(path: Path, frames) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


def _init(tmp_path: Path, text: str, campaign: Path | None = None):
    settings = tmp_path / "settings.toml"
    settings.write_text(text) if isinstance(text, str) else settings.write_bytes(text)
    campaign = campaign or tmp_path / "campaign"
    return run_cli("init", str(campaign), "--settings", str(settings), check=False)


def _clean_failure(result, *expected):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


# -- energies ------------------------------------------------------------------------------------
def test_the_energy_bound_is_twice_the_thomas_fermi_energy_of_the_heaviest_atom(roy12):
    atoms = roy12[0]  # C, H, N, O, S: sulfur (Z = 16) is the heaviest
    hartree_ev = 27.211386245988
    assert energy_bound_ev_per_atom(atoms) == pytest.approx(2 * 0.7687 * 16 ** (7 / 3) * hartree_ev)
    assert ENERGY_BOUND_FACTOR * 0.7687 * 16 ** (7 / 3) > 397.5  # above sulfur's true total energy, 397.5 Ha


@pytest.mark.parametrize("key, value", [("energy_ff", 1e30), ("energy_ff", -1e30), ("energy_ref", 1e30)])
def test_an_energy_beyond_the_physical_bound_is_rejected(roy12, tmp_path, key, value):
    roy12[3].info[key] = value
    path = _write(tmp_path / "pool.extxyz", roy12)
    with pytest.raises(InputError) as info:
        read_pool(path, "kJ/mol")
    message = str(info.value)
    assert str(path) in message and repr(str(roy12[3].info["name"])) in message
    assert "eV per atom" in message and "physical bound" in message and "Thomas-Fermi" in message


def test_a_large_but_possible_total_energy_is_accepted(roy12, tmp_path):
    # all-electron totals of ROY cells are about -1,000 Hartree per molecule (27 atoms)
    for atoms in roy12:
        atoms.info["energy_ff"] = -1000.0 * len(atoms) / 27
    pool = read_pool(_write(tmp_path / "pool.extxyz", roy12), "Hartree")
    assert len(pool) == 12


# -- periodicity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["no cell", "pbc false", "one axis"])
def test_a_structure_that_is_not_a_periodic_crystal_gets_its_own_message(roy12, tmp_path, how):
    bad = roy12[2]
    if how == "no cell":
        bad.set_cell(np.zeros((3, 3)))
        bad.pbc = False
    elif how == "pbc false":
        bad.pbc = False
    else:
        bad.pbc = [True, True, False]
    path = _write(tmp_path / "pool.extxyz", roy12)
    with pytest.raises(InputError) as info:
        read_pool(path, "kJ/mol")
    message = str(info.value)
    assert "not periodic crystals" in message and repr(str(bad.info["name"])) in message
    assert ("no unit cell" if how == "no cell" else "not periodic on every axis") in message
    assert "broken" not in message and "molecule" not in message.split("\n")[1]


# -- names ---------------------------------------------------------------------------------------
def test_names_are_kept_exactly_as_written(roy12, tmp_path):
    from graceq.engines.replay import ReplayEngine

    names = ["007", "1e3", "T", "F", "0.50", "nan", "-3", "C7H6 form II"]
    for atoms, name in zip(roy12, names):
        atoms.info["name"] = name
        atoms.info["energy_ref"] = float(atoms.info["energy_ff"]) + 1.0
    path = _write(tmp_path / "pool.extxyz", roy12[: len(names)])
    assert 'name=007' in path.read_text()  # the file really holds the bare text
    pool = read_pool(path, "kJ/mol")
    assert pool.names == names
    # the replay engine reads the same file the same way: every name is found
    engine = ReplayEngine({}, "kJ/mol", str(path))
    for atoms, name in zip(pool.frames, names):
        result = engine.run(atoms, name)
        assert result.status == "converged", result.message


def test_an_empty_name_gets_its_own_message(roy12, tmp_path):
    path = _write(tmp_path / "pool.extxyz", roy12)
    text = path.read_text().replace(f'name={roy12[4].info["name"]} ', 'name="" ', 1)
    path.write_text(text)
    with pytest.raises(InputError) as info:
        read_pool(path, "kJ/mol")
    assert "empty name" in str(info.value) and "energy_ff" not in str(info.value)


def test_a_name_with_a_newline_from_an_ase_db_is_rejected(roy12, tmp_path):
    path = tmp_path / "pool.db"
    with ase.db.connect(path) as db:
        for k, atoms in enumerate(roy12):
            name = "form\nII" if k == 5 else f"s{k}"
            db.write(atoms, energy_ff=float(atoms.info["energy_ff"]), data={"name": name})
    with pytest.raises(InputError) as info:
        read_pool(path, "kJ/mol")
    assert "cannot be printed" in str(info.value) and "'form\\nII'" in str(info.value)


# -- identical structures, dropped structures ----------------------------------------------------
def test_identical_structures_up_to_atom_order(roy12):
    copy = roy12[0].copy()
    order = np.random.default_rng(0).permutation(len(copy))
    shuffled = copy[order]
    moved = roy12[0].copy()
    moved.positions[0] += 0.01
    groups = identical_structures([roy12[0], shuffled, moved, roy12[1]], ["a", "a-copy", "a-moved", "b"])
    assert groups == [["a", "a-copy"]]


def test_init_warns_about_identical_structures_and_lists_dropped_ones(roy12, tmp_path):
    from test_pool import pull_off_hydrogen

    frames = [f.copy() for f in roy12]
    twin = frames[0].copy()[::-1]  # same structure, atoms in reverse order
    twin.info = dict(frames[0].info, name="twin-of-first")
    broken = pull_off_hydrogen(frames[7].copy())
    broken.info = dict(frames[7].info, name="broken-one")
    frames[7] = broken
    pool = _write(tmp_path / "pool.extxyz", frames + [twin])
    result = _init(tmp_path, settings_text(pool, campaign={"n_init": 8, "on_bad_molecule": "skip"}))
    assert result.returncode == 0, result.stderr
    campaign = tmp_path / "campaign"
    with open(campaign / "dropped.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["broken-one"] and "molecules of different formulas" in rows[0]["reason"]
    assert rows[0]["where"] == "frame 7"
    with open(campaign / "identical.csv", newline="") as handle:
        groups = list(csv.DictReader(handle))
    assert sorted(r["name"] for r in groups) == sorted([str(frames[0].info["name"]), "twin-of-first"])
    assert "identical" in result.stderr and "identical.csv" in result.stderr


# -- a pool or first batch too small for the committee -------------------------------------------
def test_min_labelled_matches_the_split(self=None):
    from graceq.model import chronological_split

    for cv, fraction in ((5, 0.8), (3, 0.8), (5, 0.5), (2, 0.9)):
        need = min_labelled(fraction, cv)
        chronological_split(need, fraction, cv)
        with pytest.raises(ValueError):
            chronological_split(need - 1, fraction, cv)
    assert min_labelled(0.8, 5) == 7


def test_init_refuses_an_n_init_or_pool_too_small_for_cross_validation(roy12, tmp_path):
    pool = _write(tmp_path / "pool.extxyz", roy12)
    result = _init(tmp_path, settings_text(pool, campaign={"n_init": 4}))
    _clean_failure(result, "n_init = 4 is too small", "n_init >= 7", "5-fold cross-validation")
    small = _write(tmp_path / "small.extxyz", roy12[:5])
    result = _init(tmp_path, settings_text(small, campaign={"n_init": 7}))
    _clean_failure(result, "the pool holds 5 structure(s)", "at least 8 structures")
    assert not (tmp_path / "campaign").exists()


def _answers(path: Path, frames, unstable=()) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "energy_ref", "status"])
        for atoms in frames:
            name = str(atoms.info["name"])
            writer.writerow([name, repr(float(atoms.info["energy_ref"])), "unstable" if name in unstable else ""])
    return path


def _campaign_settings(folder: Path, pool: Path, source: Path, n_init: int) -> Path:
    path = folder / "settings.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({
        "campaign": {"pool": str(pool), "unit": "kJ/mol", "window": 5.0, "n_init": n_init, "n_batch": 6, "seed": 3},
        "model": {"n_members": 32, "members_per_task": 16}, "descriptor": {"chunk_size": 16},
        "engine": {"engine": "replay", "source": str(source)},
    }))
    return path


def test_raising_n_init_on_a_started_campaign_extends_the_first_batch(roy_small, tmp_path):
    frames = ase.io.read(roy_small, ":")
    # a reference campaign that starts with n_init = 10
    full = _answers(tmp_path / "full.csv", frames)
    a = tmp_path / "a"
    run_cli("run", str(a / "campaign"), "--settings", str(_campaign_settings(a, roy_small, full, 10)),
            "--quiet", "--max-iterations", "1")
    first10 = [idx for idx, it in picks_of(a / "campaign") if it == 0]
    assert len(first10) == 10
    # the same campaign started with n_init = 7, where 3 of those come back unstable: too few to fit
    names = [str(f.info["name"]) for f in frames]
    with sqlite3.connect(a / "campaign" / "state.sqlite") as db:
        stored = dict(db.execute("SELECT idx, name FROM structures"))
    unstable = {stored[i] for i in first10[:3]}
    assert unstable <= set(names)
    b = tmp_path / "b"
    source = _answers(tmp_path / "three-unstable.csv", frames, unstable)
    first = run_cli("run", str(b / "campaign"), "--settings", str(_campaign_settings(b, roy_small, source, 7)),
                    "--quiet", check=False)
    _clean_failure(first, "too few to fit the committee")
    smaller = run_cli("run", str(b / "campaign"), "--n-init", "5", "--quiet", check=False)
    _clean_failure(smaller, "can only be raised")
    raised = run_cli("run", str(b / "campaign"), "--n-init", "10", "--quiet", "--max-iterations", "1")
    assert "Traceback" not in raised.stderr
    # the first batch is the one a campaign started with n_init = 10 picks, in the same order
    assert [idx for idx, it in picks_of(b / "campaign") if it == 0] == first10
    again = run_cli("run", str(b / "campaign"), "--n-init", "12", "--quiet", check=False)
    _clean_failure(again, "--n-init cannot change any more")


# -- settings and paths --------------------------------------------------------------------------
def test_a_settings_typo_gets_did_you_mean_and_the_valid_keys(roy_small, tmp_path):
    result = _init(tmp_path, settings_text(roy_small, campaign={"n_int": 12}))
    _clean_failure(result, "'n_int' is not a setting; did you mean 'n_init'?", "Valid keys: pool, unit, window")
    result = _init(tmp_path, settings_text(roy_small) + "\n[modle]\ncv = 3\n")
    _clean_failure(result, "did you mean 'model'?", "Valid sections: campaign, descriptor, model")


def test_a_settings_file_that_is_not_utf8(roy_small, tmp_path):
    text = settings_text(roy_small).replace('unit = "kJ/mol"', 'unit = "kJ/mol" # caf\u00e9')
    result = _init(tmp_path, text.encode("latin-1"))
    _clean_failure(result, "not a UTF-8 text file", "settings.toml")


def test_a_campaign_directory_below_a_regular_file(roy_small, tmp_path):
    (tmp_path / "afile").write_text("not a folder\n")
    result = _init(tmp_path, settings_text(roy_small), campaign=tmp_path / "afile" / "campaign")
    _clean_failure(result, "Not a directory", "afile")


def test_a_relative_symlink_loop_as_the_pool(tmp_path):
    os.symlink("loop.extxyz", tmp_path / "loop.extxyz")
    (tmp_path / "settings.toml").write_text('[campaign]\npool = "loop.extxyz"\nunit = "kJ/mol"\n')
    result = run_cli("init", str(tmp_path / "campaign"), "--settings", str(tmp_path / "settings.toml"), check=False)
    _clean_failure(result, "loop of symbolic links", "loop.extxyz")


def test_features_that_are_not_finite_name_the_structures_and_keep_the_file(roy_small, tmp_path):
    """A pool row whose features came out NaN would give NaN predictions that no decision checks
    (they assume finite features): the coordinator refuses them once, when it loads them."""
    from graceq.coordinator import Coordinator
    from graceq.store import atomic_save_npy

    (tmp_path / "settings.toml").write_text(settings_text(roy_small))
    target = tmp_path / "campaign"
    run_cli("init", str(target), "--settings", str(tmp_path / "settings.toml"))
    c = Coordinator(target, progress=False)
    features = np.ones((len(c.names), 5))
    features[3, 2] = np.nan
    atomic_save_npy(c.paths.features, features)
    with pytest.raises(ValueError, match=rf"1 structures have features that are not finite.*{c.names[3]}"):
        c.ensure_features()
    assert c.paths.features.exists()
