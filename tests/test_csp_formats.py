"""CSP-native pool inputs: SHELX .res with SYMM/LATT (expanded to the full cell), CIF, *.POSCAR and
one-folder-per-structure directories.

The .res files are written here: form Y of ROY (P2_1/n, LATT 1 + one SYMM, Z = 4) from its
asymmetric unit in the bundled ROY-264 file, checked against a CIF of the same crystal and the
source's own density; and a benzamide molecule in Cc (LATT -7, C-centred, no inversion, Z = 4),
checked against the four copies placed by hand.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from ase.io import read, write

from conftest import bundled
from graceq import csp_formats
from graceq.chemistry import _molecule_labels
from graceq.pool import InputError, read_pool
from graceq.polymorphs import cell_density_gcm3, same_crystal
from test_polymorphs import unwrapped_molecule

SFAC = ["C", "H", "N", "O", "S"]


def whole_molecule(atoms, label=0):
    """Fractional coordinates and symbols of one bonded molecule, unwrapped across the cell."""
    _, labels = _molecule_labels(atoms)
    idx = np.flatnonzero(labels == label)
    xyz = unwrapped_molecule(atoms, idx)
    return np.linalg.solve(atoms.cell.array.T, xyz.T).T, [atoms[i].symbol for i in idx]


def res_text(title, cellpar, frac, symbols, latt, symm, z=None):
    lines = [f"TITL {title}", "CELL 0.71073 " + " ".join(f"{v:.6f}" for v in cellpar)]
    if z is not None:
        lines.append(f"ZERR {z} 0.001 0.001 0.001 0 0.01 0")
    lines += [f"LATT {latt}"] + [f"SYMM {s}" for s in symm]
    lines += ["SFAC " + " ".join(SFAC), "UNIT 1 1 1 1 1", "FVAR 1.0"]
    for k, (s, (x, y, z_)) in enumerate(zip(symbols, frac)):
        lines.append(f"{s}{k + 1} {SFAC.index(s) + 1} {x:.7f} {y:.7f} {z_:.7f} 11.00000 0.05")
    return "\n".join(lines + ["HKLF 4", "END", ""])


@pytest.fixture(scope="module")
def form_y():
    atoms = read(bundled("roy264", "roy264.extxyz"), 0)
    assert atoms.info["name"] == "0001_Y" and len(atoms) == 108
    return atoms


def y_res(form_y, latt=1, z=4, density=None):
    frac, symbols = whole_molecule(form_y)
    density = form_y.info["density_gcm3"] if density is None else density
    return res_text(f"0001_Y -118.25 {density}", form_y.cell.cellpar(), frac, symbols, latt,
                    ["1/2-X, 1/2+Y, 1/2-Z"], z=z)


def same_sites(a, b, tol=1e-3):
    """Every atom of a has an atom of the same element within tol Å in b (the source rounds to 1e-4 Å)."""
    assert len(a) == len(b)
    fa, fb = a.get_scaled_positions(), b.get_scaled_positions()
    for i in range(len(a)):
        d = fb - fa[i]
        d -= np.round(d)
        j = np.argmin(np.linalg.norm(d @ a.cell.array, axis=1))
        assert b.numbers[j] == a.numbers[i] and np.linalg.norm(d[j] @ a.cell.array) < tol, i
    return True


def test_res_with_symm_expands_like_the_cif(form_y, tmp_path):
    (tmp_path / "y.res").write_text(y_res(form_y))
    [atoms] = csp_formats.read_res(tmp_path / "y.res")
    assert len(atoms) == 4 * 27 == atoms.info["z"] * 27  # Z x the molecule
    assert atoms.info["name"] == "0001_Y"
    assert abs(cell_density_gcm3(atoms) - atoms.info["density_title_gcm3"]) < 1e-3
    assert atoms.info["energy_ff"] == pytest.approx(-118.25 * 4)
    assert "21/n" in atoms.info["spacegroup"]
    write(tmp_path / "y.cif", form_y, format="cif")
    cif = read(tmp_path / "y.cif")
    np.testing.assert_allclose(atoms.cell.cellpar(), cif.cell.cellpar(), atol=1e-5)
    assert same_sites(atoms, cif) and same_sites(cif, atoms)
    assert same_crystal(atoms, cif)
    # ASE's own res reader (AIRSS dialect) does not read this file: the reason graceq has one
    with pytest.raises(Exception):
        assert len(read(tmp_path / "y.res", format="res")) == 108


def test_c_centred_non_centrosymmetric(tmp_path):
    frames = read(bundled("benzamide", "landscape.extxyz"), ":2")
    frac0, symbols = whole_molecule(frames[0])
    cellpar = [21.0, 25.0, 12.0, 90.0, 101.0, 90.0]
    from ase.geometry import cellpar_to_cell

    cell = cellpar_to_cell(cellpar)
    xyz = frac0 @ frames[0].cell.array
    xyz -= xyz.mean(axis=0)
    frac = np.linalg.solve(cell.T, xyz.T).T + [0.12, 0.14, 0.2]
    (tmp_path / "cc.res").write_text(res_text("bz-cc -95.0", cellpar, frac, symbols, -7, ["X, -Y, 1/2+Z"], z=4))
    [atoms] = csp_formats.read_res(tmp_path / "cc.res")
    assert len(atoms) == 4 * 16 and atoms.info["z"] == 4
    # the four positions of Cc written out by hand
    ops = [(np.diag([1, 1, 1]), [0, 0, 0]), (np.diag([1, -1, 1]), [0, 0, 0.5]),
           (np.diag([1, 1, 1]), [0.5, 0.5, 0]), (np.diag([1, -1, 1]), [0.5, 0.5, 0.5])]
    from ase import Atoms

    by_hand = Atoms(symbols=symbols * 4, scaled_positions=np.mod(np.concatenate([frac @ r.T + t for r, t in ops]), 1),
                    cell=cell, pbc=True)
    assert same_sites(atoms, by_hand) and same_sites(by_hand, atoms)
    mass = sum(a.mass for a in by_hand) / by_hand.get_volume() * 1.66053906660
    assert cell_density_gcm3(atoms) == pytest.approx(mass, rel=1e-12)
    assert atoms.info["spacegroup"].replace(" ", "").startswith("C1c1")


def test_wrong_symmetry_is_reported(form_y, tmp_path):
    bad = tmp_path / "bad.res"
    bad.write_text(y_res(form_y, latt=-1))  # no inversion: half the cell
    with pytest.raises(InputError, match=r"bad.res.*ZERR says Z = 4.*54 atoms holds 2"):
        csp_formats.read_res(bad)
    bad.write_text(y_res(form_y, latt=-1, z=None))
    with pytest.raises(InputError, match=r"bad.res.*density of 1.5366 g/cm\^3.*0.7683"):
        csp_formats.read_res(bad)


def test_multi_structure_res_pool(form_y, tmp_path):
    y = y_res(form_y)
    second = y.replace("TITL 0001_Y -118.25", "TITL 0001_Y-again -117.25")
    (tmp_path / "pool.res").write_text(y + second)
    pool = read_pool(tmp_path / "pool.res", unit="kJ/mol")
    assert pool.names == ["0001_Y", "0001_Y-again"]
    np.testing.assert_allclose(pool.energy_ff, [-118.25 * 4, -117.25 * 4])
    np.testing.assert_allclose(pool.per_molecule(pool.energy_ff), [-118.25, -117.25])
    assert pool.atoms_per_molecule == 27 and list(pool.n_atoms) == [108, 108]


def _energies(folder, names, values):
    with open(folder / "energies.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "energy_ff"])
        writer.writerows(zip(names, values))


@pytest.mark.parametrize("layout", ["res", "cif", "POSCAR", "folders"])
def test_directory_layouts(layout, form_y, tmp_path):
    frames = read(bundled("roy264", "roy264.extxyz"), ":3")
    names = [f.info["name"] for f in frames]
    folder = tmp_path / layout
    folder.mkdir()
    if layout == "res":  # energies from the titles
        (folder / "y.res").write_text(y_res(form_y))
        pool = read_pool(folder, unit="kJ/mol")
        assert pool.names == ["0001_Y"] and pool.energy_ff[0] == pytest.approx(-118.25 * 4)
        return
    for name, atoms in zip(names, frames):
        if layout == "cif":
            write(folder / f"{name}.cif", atoms, format="cif")
        elif layout == "POSCAR":
            write(folder / f"{name}.POSCAR", atoms, format="vasp")
        else:
            (folder / name).mkdir()
            write(folder / name / "POSCAR", atoms, format="vasp")
    energies = [f.info["energy_ff"] for f in frames]
    _energies(folder, names[::-1], energies[::-1])  # the CSV's order is the pool's order
    pool = read_pool(folder, unit="kJ/mol")
    assert pool.names == names[::-1]
    np.testing.assert_allclose(pool.energy_ff, energies[::-1])
    for atoms, name in zip(pool.frames, pool.names):
        source = frames[names.index(name)]
        assert same_sites(atoms, source, tol=1e-5)
    assert pool.atoms_per_molecule == 27


def test_directory_without_energies_names_the_fix(tmp_path):
    frames = read(bundled("roy264", "roy264.extxyz"), ":2")
    for f in frames:
        write(tmp_path / f"{f.info['name']}.cif", f, format="cif")
    with pytest.raises(InputError, match=r"energies.csv: no energy table for the 2 structure\(s\).*0001_Y.*header 'name,energy_ff'"):
        read_pool(tmp_path, unit="kJ/mol")


def test_atoms_on_special_positions_are_merged():
    """P-1 (LATT 1, no SYMM): an atom on the inversion centre stays one atom, a general one becomes two."""
    text = ("TITL sp\nCELL 0.7 5.0 6.0 7.0 90 100 90\nLATT 1\nSFAC C O\n"
            "C1 1 0.0 0.0 0.0 11.0 0.05\nC2 1 0.5 0.5 0.0 11.0 0.05\nO3 2 0.2 0.3 0.4 11.0 0.05\nEND\n")
    [block] = csp_formats.parse_res(text)
    atoms = csp_formats.expand(block)
    assert atoms.get_chemical_symbols() == ["C", "C", "O", "O"]
    np.testing.assert_allclose(atoms.get_scaled_positions()[3], [0.8, 0.7, 0.6], atol=1e-12)
    clash = text.replace("O3 2 0.2 0.3 0.4", "O3 2 0.02 0.0 0.0")  # O lands 0.2 Å from C1's image
    with pytest.raises(InputError, match="different elements meet"):
        csp_formats.expand(csp_formats.parse_res(clash)[0])
