"""Tests of graceq.pool (reading and validating pools), graceq.chemistry, graceq.pooldb and graceq.units."""

from __future__ import annotations

import csv
import importlib.resources
import itertools
import math
import warnings

import ase.io
import ase.units
import numpy as np
import pytest
from ase.data import covalent_radii

from graceq.chemistry import BOND_SCALE, _molecule_labels, atoms_per_molecule, molecular_formula, molecule_formulas
from graceq.pool import InputError, Pool, read_pool
from graceq.pooldb import read_frames_db, read_pool_db, write_pool_db
from graceq.units import ENERGY_UNITS, check_unit, from_ev, to_ev

DATA = importlib.resources.files("graceq") / "data"
ROY = DATA / "roy264" / "roy264.extxyz"
BENZAMIDE = DATA / "benzamide" / "landscape.extxyz"


@pytest.fixture(scope="module")
def roy_frames():
    return ase.io.read(ROY, ":")


@pytest.fixture(scope="module")
def benzamide_frames():
    return ase.io.read(BENZAMIDE, ":")


@pytest.fixture
def roy3(roy_frames):
    """Three small ROY cells (54 and 108 atoms), fresh copies the test may edit."""
    small = [f for f in roy_frames if len(f) <= 108][:3]
    return [f.copy() for f in small]


def pull_off_hydrogen(atoms):
    """Move the first H atom to where it is farthest from every other atom (a broken molecule)."""
    from ase.geometry import get_distances

    h = int(np.nonzero(atoms.numbers == 1)[0][0])
    others = np.delete(atoms.positions, h, axis=0)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, 8, endpoint=False)] * 3), -1).reshape(-1, 3)
    candidates = grid @ atoms.cell[:]
    _, d = get_distances(candidates, others, cell=atoms.cell, pbc=atoms.pbc)
    atoms.positions[h] = candidates[np.argmax(d.min(axis=1))]
    return atoms


def write(tmp_path, frames, name="pool.extxyz"):
    path = tmp_path / name
    ase.io.write(path, frames, format="extxyz")
    return path


# -- units ------------------------------------------------------------------------------------
def test_units_against_literal_values():
    # CODATA values: 1 kJ/mol = 0.01036427 eV, 1 kcal/mol = 0.04336411 eV, 1 Ha = 27.211386 eV
    assert to_ev(1.0, "kJ/mol") == pytest.approx(0.0103642688, rel=1e-6)
    assert to_ev(1.0, "kcal/mol") == pytest.approx(0.0433641043, rel=1e-6)
    assert to_ev(1.0, "Ha") == pytest.approx(27.211386, rel=1e-6)
    assert to_ev(1.0, "Ry") == pytest.approx(13.605693, rel=1e-6)
    assert to_ev(1000.0, "meV") == 1.0
    assert to_ev(2.5, "eV") == 2.5
    assert ENERGY_UNITS["kJ/mol"] == ase.units.kJ / ase.units.mol
    values = np.array([-1.5, 0.0, 3.25])
    for unit in ENERGY_UNITS:
        np.testing.assert_allclose(from_ev(to_ev(values, unit), unit), values, rtol=1e-14)
    assert isinstance(to_ev(1, "eV"), float)


def test_check_unit_aliases_and_unknown():
    assert check_unit("kj/mol") == "kJ/mol"
    assert check_unit("KCAL/MOL") == "kcal/mol"
    assert check_unit("Ha") == "Hartree"
    assert check_unit("hartree") == "Hartree"
    assert check_unit(" eV ") == "eV"
    with pytest.raises(ValueError) as err:
        check_unit("kJ")
    for unit in ENERGY_UNITS:
        assert unit in str(err.value)


# -- molecules --------------------------------------------------------------------------------
def slow_molecules(atoms):
    """Partition of atoms into bonded molecules: every pair, every image in a 5x5x5 block, union-find."""
    n = len(atoms)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    radii = covalent_radii[atoms.numbers]
    pos = atoms.positions
    for shift in itertools.product(range(-2, 3), repeat=3):
        t = np.asarray(shift) @ atoms.cell[:]
        for i in range(n):
            d = np.linalg.norm(pos + t - pos[i], axis=1)
            for j in np.nonzero(d < BOND_SCALE * (radii + radii[i]))[0]:
                if j != i or any(shift):
                    parent[find(i)] = find(int(j))
    groups = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(tuple(g) for g in groups.values())


def fast_molecules(atoms):
    _, labels = _molecule_labels(atoms)
    return sorted(tuple(np.nonzero(labels == k)[0]) for k in np.unique(labels))


def test_molecules_match_direct_pair_loop(roy_frames, benzamide_frames):
    roy = next(f for f in roy_frames if len(f) == 54)
    merged = next(f for f in benzamide_frames if f.info["name"] == "benzamide-00009")  # unstable
    for atoms in (roy, benzamide_frames[0], merged):
        assert fast_molecules(atoms) == slow_molecules(atoms)


def test_atoms_per_molecule_roy_and_benzamide(roy_frames, benzamide_frames):
    for atoms in roy_frames[:5]:
        assert atoms_per_molecule(atoms) == 27
        assert molecular_formula(atoms) == "C12H9N3O2S"
        assert len(molecule_formulas(atoms)) == atoms.info["n_molecules"]
    good = [f for f in benzamide_frames if f.info["status"] == "converged"][:5]
    for atoms in good:
        assert atoms_per_molecule(atoms) == 16
        assert molecular_formula(atoms) == "C7H7NO"


def test_broken_molecule_is_reported(benzamide_frames):
    atoms = next(f for f in benzamide_frames if len(f) == 32).copy()
    pull_off_hydrogen(atoms)
    with pytest.raises(ValueError, match="different formulas"):
        molecular_formula(atoms)
    assert sorted(molecule_formulas(atoms)) == ["C7H6NO", "C7H7NO", "H"]


# -- reading the three sources ------------------------------------------------------------------
def test_read_roy_pool(roy_frames):
    pool = read_pool(ROY, "kJ/mol")
    assert len(pool) == 264
    assert pool.atoms_per_molecule == 27
    assert pool.unit == "kJ/mol"
    assert pool.status is None
    assert pool.names[0] == "0001_Y"
    np.testing.assert_array_equal(pool.energy_ff, [f.info["energy_ff"] for f in roy_frames])
    np.testing.assert_array_equal(pool.energy_ref, [f.info["energy_ref"] for f in roy_frames])
    n_mol = np.array([f.info["n_molecules"] for f in roy_frames])
    np.testing.assert_allclose(pool.per_molecule(pool.energy_ref), pool.energy_ref / n_mol, rtol=1e-14)
    with pytest.raises(ValueError):
        pool.per_molecule(pool.energy_ref[:3])


def test_benzamide_broken_molecules_error_lists_them_and_skip_drops_them(benzamide_frames):
    with pytest.raises(InputError) as err:
        read_pool(BENZAMIDE, "kJ/mol")
    message = str(err.value)
    assert str(BENZAMIDE) in message
    assert "benzamide-00009" in message and "on_bad_molecule='skip'" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pool = read_pool(BENZAMIDE, "kJ/mol", on_bad_molecule="skip")
    dropped = {f.info["name"] for f in benzamide_frames} - set(pool.names)
    assert "benzamide-00009" in dropped and len(pool) == len(benzamide_frames) - len(dropped)
    assert any("benzamide-00009" in str(w.message) for w in caught)
    # only structures marked unstable break their molecules; the status column is kept
    status = {f.info["name"]: f.info["status"] for f in benzamide_frames}
    assert {status[n] for n in dropped} == {"unstable"}
    assert pool.atoms_per_molecule == 16
    assert pool.status[pool.names.index("benzamide-00001")] == status["benzamide-00001"]


def pools_equal(a: Pool, b: Pool):
    assert a.names == b.names
    np.testing.assert_array_equal(a.energy_ff, b.energy_ff)
    np.testing.assert_array_equal(a.n_atoms, b.n_atoms)
    assert a.atoms_per_molecule == b.atoms_per_molecule and a.unit == b.unit
    if a.energy_ref is None:
        assert b.energy_ref is None
    else:
        np.testing.assert_array_equal(a.energy_ref, b.energy_ref)
    assert a.status == b.status
    for fa, fb in zip(a.frames, b.frames):
        np.testing.assert_array_equal(fa.numbers, fb.numbers)
        np.testing.assert_allclose(fa.positions, fb.positions, atol=1e-6)
        np.testing.assert_allclose(fa.cell[:], fb.cell[:], atol=1e-6)


def test_three_sources_give_the_same_pool(tmp_path, benzamide_frames):
    frames = [f.copy() for f in benzamide_frames[:6] if f.info["status"] != "unstable"]
    frames[1].info["energy_ref"] = float("nan")  # replay data with a hole
    source = write(tmp_path, frames)
    pool = read_pool(source, "kJ/mol")
    assert np.isnan(pool.energy_ref[1]) and pool.status[0] in ("converged", "unconverged")

    vasp = tmp_path / "vasp"
    vasp.mkdir()
    with open(vasp / "energies.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["name", "energy_ff", "energy_ref", "status"])
        for atoms, name, e, r, s in zip(pool.frames, pool.names, pool.energy_ff, pool.energy_ref, pool.status):
            ase.io.write(vasp / f"{name}.vasp", atoms, format="vasp", direct=False)
            out.writerow([name, repr(float(e)), "" if math.isnan(r) else repr(float(r)), s])
    from_vasp = read_pool(vasp, "kJ/mol")
    pools_equal(pool, from_vasp)

    db = tmp_path / "pool.db"
    write_pool_db(pool, db)
    pools_equal(pool, read_pool_db(db))
    pools_equal(pool, read_pool(db, "kJ/mol"))
    one, three = read_frames_db(db, [0, 2])
    assert one.info["name"] == pool.names[0] and three.info["name"] == pool.names[2]
    assert "energy_ref" not in one.info  # a worker never sees the answer
    np.testing.assert_allclose(three.positions, pool.frames[2].positions)
    with pytest.raises(InputError, match="pool index 99"):
        read_frames_db(db, [99])


def test_vasp_names_from_poscar_files_and_explicit_csv(tmp_path, roy3):
    vasp = tmp_path / "structures"
    vasp.mkdir()
    for i, atoms in enumerate(roy3):
        ase.io.write(vasp / f"POSCAR_{i}", atoms, format="vasp")
    (vasp / "README").write_text("not a structure")
    table = tmp_path / "ff.csv"
    table.write_text("name,energy_ff\n" + "".join(f"POSCAR_{i},{a.info['energy_ff']}\n" for i, a in enumerate(roy3)))
    pool = read_pool(vasp, "kJ/mol", energies_csv=table)
    assert pool.names == ["POSCAR_0", "POSCAR_1", "POSCAR_2"] and pool.energy_ref is None
    np.testing.assert_array_equal(pool.energy_ff, [a.info["energy_ff"] for a in roy3])


def test_numeric_looking_names_survive_the_database(tmp_path, roy3):
    for i, atoms in enumerate(roy3):
        atoms.info["name"] = str(100 + i)
    pool = read_pool(write(tmp_path, roy3), "kJ/mol")
    write_pool_db(pool, tmp_path / "p.db")
    assert read_pool_db(tmp_path / "p.db").names == ["100", "101", "102"]


def test_given_atoms_per_molecule_checks_composition(tmp_path, roy3, benzamide_frames):
    pool = read_pool(write(tmp_path, roy3), "kJ/mol", atoms_per_molecule=27)
    assert pool.atoms_per_molecule == 27
    mixed = roy3 + [benzamide_frames[0].copy()]
    with pytest.raises(InputError, match="benzamide-00001"):
        read_pool(write(tmp_path, mixed, "mixed.extxyz"), "kJ/mol", atoms_per_molecule=27)


def test_names_default_to_frame_index(tmp_path, roy3):
    for atoms in roy3:
        del atoms.info["name"]
    pool = read_pool(write(tmp_path, roy3), "kJ/mol")
    assert pool.names == ["frame-00000", "frame-00001", "frame-00002"]


# -- bad inputs: each rejected before any work, naming file, structure and problem -------------------
def expect_input_error(path, *fragments, **kwargs):
    with pytest.raises(InputError) as err:
        read_pool(path, kwargs.pop("unit", "kJ/mol"), **kwargs)
    message = str(err.value)
    for fragment in (str(path),) + fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


def test_missing_energy(tmp_path, roy3):
    del roy3[1].info["energy_ff"]
    expect_input_error(write(tmp_path, roy3), roy3[1].info["name"], "frame 1", "no 'energy_ff'")


def test_nan_and_inf_energy(tmp_path, roy3):
    roy3[0].info["energy_ff"] = float("nan")
    roy3[2].info["energy_ff"] = float("inf")
    message = expect_input_error(write(tmp_path, roy3), roy3[0].info["name"], roy3[2].info["name"], "finite")
    assert roy3[1].info["name"] not in message


def test_energy_not_a_number(tmp_path, roy3):
    roy3[2].info["energy_ff"] = "low"
    expect_input_error(write(tmp_path, roy3), roy3[2].info["name"], "not a number")


def test_duplicate_names(tmp_path, roy3):
    roy3[2].info["name"] = roy3[0].info["name"]
    expect_input_error(write(tmp_path, roy3), "duplicate", roy3[0].info["name"], "frame 0", "frame 2")


def test_other_molecule_in_pool(tmp_path, roy3, benzamide_frames):
    intruder = benzamide_frames[0].copy()
    message = expect_input_error(write(tmp_path, roy3 + [intruder]), "benzamide-00001", "C7H7NO", "C12H9N3O2S")
    assert "frame 3" in message


def test_broken_molecule_in_pool(tmp_path, roy3):
    pull_off_hydrogen(roy3[1])
    path = write(tmp_path, roy3)
    expect_input_error(path, roy3[1].info["name"], "different formulas")
    with pytest.warns(UserWarning, match=roy3[1].info["name"]):
        pool = read_pool(path, "kJ/mol", on_bad_molecule="skip")
    assert pool.names == [roy3[0].info["name"], roy3[2].info["name"]]


def test_empty_file_and_empty_directory(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    expect_input_error(empty, "empty")
    folder = tmp_path / "nothing"
    folder.mkdir()
    expect_input_error(folder, "no VASP structure files")


def test_garbage_file(tmp_path):
    garbage = tmp_path / "pool.extxyz"
    garbage.write_bytes(b"this is\nnot a structure file \x00\x01\x02\n")
    expect_input_error(garbage, "cannot read")
    fake_db = tmp_path / "pool.db"
    fake_db.write_text("not sqlite at all")
    expect_input_error(fake_db, "cannot open as an ASE database")


def test_missing_file(tmp_path):
    expect_input_error(tmp_path / "nope.extxyz", "no such file")


def test_unknown_unit(tmp_path, roy3):
    expect_input_error(write(tmp_path, roy3), "unknown energy unit", "kJ/mol", unit="kJ")


def test_vasp_directory_with_csv_missing_a_name(tmp_path, roy3):
    vasp = tmp_path / "vasp"
    vasp.mkdir()
    for atoms in roy3:
        ase.io.write(vasp / f"{atoms.info['name']}.vasp", atoms, format="vasp")
    rows = [f"{a.info['name']},{a.info['energy_ff']}\n" for a in roy3]
    (vasp / "energies.csv").write_text("name,energy_ff\n" + rows[0] + rows[2] + "ghost,1.0\n")
    message = expect_input_error(vasp, roy3[1].info["name"], "no 'energy_ff'")
    assert str(vasp / "energies.csv") in message
    (vasp / "energies.csv").unlink()
    expect_input_error(vasp, "energies.csv", "no energy table")


def test_database_unit_mismatch(tmp_path, roy3):
    pool = read_pool(write(tmp_path, roy3), "kJ/mol")
    write_pool_db(pool, tmp_path / "p.db")
    expect_input_error(tmp_path / "p.db", "kJ/mol", unit="eV")


def test_read_pool_db_needs_graceq_metadata(tmp_path, roy3):
    import ase.db

    with ase.db.connect(tmp_path / "plain.db") as db:
        for atoms in roy3:
            db.write(atoms, name=atoms.info["name"], energy_ff=atoms.info["energy_ff"])
    pool = read_pool(tmp_path / "plain.db", "kJ/mol")  # a user's own ASE database is a pool source
    assert pool.names == [a.info["name"] for a in roy3] and pool.energy_ref is None
    with pytest.raises(InputError, match="read_pool"):
        read_pool_db(tmp_path / "plain.db")


def test_molecule_check_is_fast_enough_for_roy264():
    import time

    start = time.process_time()
    read_pool(ROY, "kJ/mol")
    assert time.process_time() - start < 10.0  # about 1 s on one core; generous for loaded CI
