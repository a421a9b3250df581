"""Reading generation pools and checking them before any work starts.

A pool is a list of periodic crystal structures of one molecule with their force-field
energies (totals per cell, in a unit the user names). Three sources are accepted:

1. an extended-XYZ file (or any multi-frame file ASE reads) with per-frame ``name`` and
   ``energy_ff`` in ``atoms.info``;
2. a directory of VASP files (``*.vasp``, ``POSCAR*``, ``CONTCAR*``; one structure per file,
   name = file name without a ``.vasp`` suffix) plus a CSV ``name,energy_ff`` (``energies.csv``
   in the directory, or given explicitly), whose row order is the pool order;
3. an ASE database (``.db``, SQLite) with key-value pairs ``name`` and ``energy_ff``; the campaign
   keeps its own copy of the pool in this format (:func:`graceq.pooldb.write_pool_db`).

Molecules are found by :mod:`graceq.chemistry`; SHELX .res, CIF and CSP directories are read by
:mod:`graceq.csp_formats` into the same raw records.

Every problem is reported as an :class:`InputError` naming the file, the structure and what is
wrong, before any descriptor or DFT work starts.
"""

from __future__ import annotations

import csv
import errno
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from .chemistry import _composition_per_molecule, _describe_molecules, molecule_formulas
from .units import check_unit, to_ev

#: At most this many offending structures are listed in one error message.
_MAX_LISTED = 20

#: Energies per atom are bounded by physics: no total energy, not even an all-electron one,
#: exceeds the total electronic energy of the cell's heaviest atom. Thomas-Fermi theory gives that
#: energy as 0.7687 Z^(7/3) Hartree and overestimates it (Hg, Z = 80: 21,400 Ha against 18,400 Ha
#: Hartree-Fock), so twice the Thomas-Fermi value of the heaviest atom bounds |E| / N_atoms with a
#: wide margin for any method: 1.9e5 eV for iodine, 2.7e4 eV for sulfur, 1.0e4 eV for oxygen. An
#: energy beyond it is a unit mix-up, a corrupt file or a placeholder such as 1e30.
THOMAS_FERMI_HARTREE = 0.7687
ENERGY_BOUND_FACTOR = 2.0
HARTREE_EV = 27.211386245988

#: Cells of less volume than this (Å^3) count as having no cell (a molecule without a lattice).
MIN_CELL_VOLUME = 1.0

_VASP_PREFIXES = ("POSCAR", "CONTCAR")


class InputError(ValueError):
    """A pool input that graceq cannot use; the message names file, structure, problem and fix."""


@dataclass
class Pool:
    """A validated generation pool.

    Attributes
    ----------
    frames : list of ase.Atoms
        The crystal structures (periodic unit cells).
    names : list of str
        Unique structure names, in pool order.
    energy_ff : ndarray, shape (n,)
        Force-field energy, total per cell, in ``unit``.
    n_atoms : ndarray of int, shape (n,)
        Atoms per cell.
    atoms_per_molecule : int
        Atoms in one molecule (from the bonded connectivity of the first structure, unless given).
    unit : str
        Canonical energy unit of ``energy_ff`` and ``energy_ref`` (see :mod:`graceq.units`).
    source : str
        Absolute path of the file or directory the pool was read from.
    energy_ref : ndarray or None
        Reference energy, total per cell, in ``unit``; NaN where a structure has none (replay
        data); None when the source has no such key at all.
    status : list of str or None
        Per-structure status column of the source (e.g. benzamide's converged / unconverged /
        unstable), "" where absent; None when the source has no such column.
    """

    frames: list
    names: list
    energy_ff: np.ndarray
    n_atoms: np.ndarray
    atoms_per_molecule: int
    unit: str
    source: str
    energy_ref: np.ndarray | None = None
    status: list | None = None
    #: (name, where in the source, reason) of every structure dropped with on_bad_molecule="skip"
    dropped: list = field(default_factory=list)
    #: groups of names of geometrically identical structures (same cell, same atoms up to order)
    identical: list = field(default_factory=list)

    def per_molecule(self, energy_cell) -> np.ndarray:
        """Return per-molecule energies ``E_cell / n_atoms * atoms_per_molecule`` (same unit).

        ``energy_cell`` holds one total-per-cell energy per pool structure. The formula itself
        lives in :func:`graceq.campaign.per_molecule`, the one place graceq computes it.
        """
        from graceq.campaign import per_molecule

        energy_cell = np.asarray(energy_cell, dtype=float)
        if energy_cell.shape != self.n_atoms.shape:
            raise ValueError(
                f"per_molecule needs one energy per pool structure ({len(self)}), "
                f"got shape {energy_cell.shape}"
            )
        return per_molecule(energy_cell, self.n_atoms, self.atoms_per_molecule)

    def __len__(self) -> int:
        return len(self.frames)


# --------------------------------------------------------------------------------------------
# Raw records from the three sources
# --------------------------------------------------------------------------------------------


@dataclass
class _Record:
    """One structure as read, before validation; ``where`` locates it for messages."""

    atoms: Atoms
    name: object
    energy: object
    ref: object = None
    status: object = None
    where: str = ""
    file: str = ""


@dataclass
class _Raw:
    records: list
    has_ref: bool
    has_status: bool
    energy_file: str  # the file the energies came from (the CSV for VASP directories)
    apm_hint: int | None = None
    notes: list = field(default_factory=list)


def _info_value(atoms: Atoms, key: str):
    """Value of ``key`` in atoms.info, or in the calculator results (extxyz moves 'energy')."""
    if key in atoms.info:
        return atoms.info[key]
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


_WHAT_SOURCES = (
    "graceq reads an extended-XYZ file (or any multi-frame file ASE reads) with per-frame "
    "name and energy_ff, a directory of POSCAR/CONTCAR/*.vasp files with energies.csv, or an "
    "ASE .db database"
)


def _read_ase_file(path: Path, name_key, energy_key, ref_key, status_key) -> _Raw:
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty, so the pool has no structures. {_WHAT_SOURCES}.")
    from graceq.readers import read_structures

    try:
        frames = read_structures(path, text_keys=(name_key, status_key))
    except Exception as exc:  # ASE raises many types for unreadable files
        raise InputError(
            f"{path}: cannot read structures from this file ({type(exc).__name__}: {exc}). "
            f"{_WHAT_SOURCES}."
        ) from exc
    if isinstance(frames, Atoms):
        frames = [frames]
    records = [
        _Record(
            atoms=a,
            name=_info_value(a, name_key),
            energy=_info_value(a, energy_key),
            ref=_info_value(a, ref_key),
            status=_info_value(a, status_key),
            where=f"frame {i}",
            file=str(path),
        )
        for i, a in enumerate(frames)
    ]
    return _Raw(
        records,
        has_ref=any(r.ref is not None for r in records),
        has_status=any(r.status is not None for r in records),
        energy_file=str(path),
    )


def _is_vasp_file(p: Path) -> bool:
    return p.is_file() and (p.suffix.lower() == ".vasp" or p.name.startswith(_VASP_PREFIXES))


def _vasp_name(p: Path) -> str:
    """Structure name of a VASP file: the file name without a '.vasp' suffix."""
    return p.name[: -len(".vasp")] if p.suffix.lower() == ".vasp" else p.name


def _read_energy_csv(csv_path: Path, name_key, energy_key, ref_key, status_key) -> dict:
    """Return {name: {energy_key: str, ...}} from a CSV with a header line."""
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise InputError(f"{csv_path}: cannot read the energy table ({exc}).") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(
            f"{csv_path}: not a readable CSV ({exc}); give a text file with a header line "
            f"'{name_key},{energy_key}'."
        ) from exc
    missing = [c for c in (name_key, energy_key) if c not in columns]
    if missing:
        raise InputError(
            f"{csv_path}: the energy table has no column {', '.join(map(repr, missing))} "
            f"(columns found: {columns}); its header line must be '{name_key},{energy_key}' "
            f"(optionally also {ref_key}, {status_key})."
        )
    table: dict[str, dict] = {}
    for line, row in enumerate(rows, start=2):
        name = row.get(name_key, "")
        if not name:
            raise InputError(f"{csv_path}: line {line} has an empty {name_key!r}; give every row a structure name.")
        if name in table:
            raise InputError(
                f"{csv_path}: structure {name!r} appears twice (line {line}); keep one energy per structure."
            )
        table[name] = row
    return table


def _read_vasp_dir(path: Path, energies_csv, name_key, energy_key, ref_key, status_key) -> _Raw:
    files = sorted(p for p in path.iterdir() if _is_vasp_file(p))
    if not files:
        raise InputError(
            f"{path}: the directory holds no VASP structure files (*.vasp, POSCAR*, CONTCAR*), "
            "so the pool is empty. Put one structure per file there."
        )
    csv_path = Path(energies_csv) if energies_csv is not None else path / "energies.csv"
    if not csv_path.is_file():
        raise InputError(
            f"{csv_path}: no energy table for the VASP directory {path}. Give energies_csv, or "
            f"put an energies.csv with header '{name_key},{energy_key}' (total per cell) in the directory."
        )
    table = _read_energy_csv(csv_path, name_key, energy_key, ref_key, status_key)
    # pool order = the energy table's row order; files it does not list come last (and fail below)
    row_order = {name: i for i, name in enumerate(table)}
    files.sort(key=lambda p: (row_order.get(_vasp_name(p), len(row_order)), p.name))
    records = []
    for p in files:
        name = _vasp_name(p)
        try:
            atoms = ase.io.read(str(p), format="vasp")
        except Exception as exc:
            raise InputError(
                f"{p}: cannot read structure {name!r} as a VASP POSCAR ({type(exc).__name__}: {exc}); "
                "fix or remove the file."
            ) from exc
        row = table.get(name, {})
        records.append(
            _Record(
                atoms=atoms,
                name=name,
                energy=row.get(energy_key) or None,
                ref=row.get(ref_key) or None,
                status=row.get(status_key) or None,
                where=f"file {p.name}",
                file=str(csv_path),
            )
        )
    unused = sorted(set(table) - {_vasp_name(p) for p in files})
    notes = []
    if unused:
        notes.append(
            f"{csv_path}: {len(unused)} name(s) have no structure file in {path} and are ignored: "
            + ", ".join(unused[:_MAX_LISTED])
        )
    first_row = next(iter(table.values()), {})
    return _Raw(
        records,
        has_ref=ref_key in first_row,
        has_status=status_key in first_row,
        energy_file=str(csv_path),
        notes=notes,
    )


def _open_db(path: Path):
    """Connect to an existing ASE SQLite database, or raise InputError."""
    try:
        db = ase.db.connect(str(path), type="db", create_indices=False)
        db.count()  # touches the file: a non-database fails here
        return db
    except Exception as exc:
        raise InputError(
            f"{path}: cannot open as an ASE database ({type(exc).__name__}: {exc}). {_WHAT_SOURCES}."
        ) from exc


def _row_name(row, name_key):
    name = row.get(name_key)
    if name is None:
        name = row.data.get(name_key) if row.get("data") else None
    return name


def _read_db(path: Path, unit: str, name_key, energy_key, ref_key, status_key) -> _Raw:
    db = _open_db(path)
    meta = db.metadata or {}
    if "unit" in meta and check_unit(meta["unit"]) != unit:
        raise InputError(
            f"{path}: the database stores energies in {meta['unit']}, but unit={unit!r} was "
            f"asked for; pass unit={meta['unit']!r}."
        )
    records = []
    try:
        for i, row in enumerate(db.select(sort="id")):
            records.append(
                _Record(
                    atoms=row.toatoms(),
                    name=_row_name(row, name_key),
                    energy=row.get(energy_key),
                    ref=row.get(ref_key),
                    status=row.get(status_key),
                    where=f"row id {row.id}",
                    file=str(path),
                )
            )
    except Exception as exc:
        raise InputError(f"{path}: cannot read the database rows ({type(exc).__name__}: {exc}).") from exc
    has_ref = bool(meta.get("has_energy_ref")) or any(r.ref is not None for r in records)
    has_status = bool(meta.get("has_status")) or any(r.status is not None for r in records)
    apm = meta.get("atoms_per_molecule")
    return _Raw(records, has_ref, has_status, str(path), apm_hint=int(apm) if apm else None)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _label(rec: _Record, name=None) -> str:
    name = rec.name if name is None else name
    return f"structure {str(name)!r} ({rec.where})" if name is not None else f"structure at {rec.where}"


def _listing(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return "".join(f"\n  - {p}" for p in shown) + more


def _to_float(value):
    """float(value), or None when value is not a number."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_names(raw: _Raw, source: str) -> list[str]:
    recs = raw.records
    empty = [r for r in recs if r.name is not None and str(r.name).strip() == ""]
    if empty:
        raise InputError(
            f"{source}: {len(empty)} structure(s) have an empty name:" + _listing([_label(r, "") for r in empty])
            + "\nGive each of them a name (or leave the name out of every structure: they are then "
            "called frame-00000, frame-00001, ...)."
        )
    unprintable = [r for r in recs if r.name is not None and not str(r.name).isprintable()]
    if unprintable:
        raise InputError(
            f"{source}: {len(unprintable)} structure name(s) hold a newline, a tab or another "
            "character that cannot be printed:" + _listing([f"name {str(r.name)!r} ({r.where})" for r in unprintable])
            + "\nNames appear in tables, file names and messages: use printable characters only."
        )
    missing = [r for r in recs if r.name is None]
    if len(missing) == len(recs):
        # no names at all: the frame index is the name
        return [f"frame-{i:05d}" for i in range(len(recs))]
    if missing:
        raise InputError(
            f"{source}: {len(missing)} structure(s) have no name while others do:"
            + _listing([_label(r) for r in missing])
            + "\nGive every structure a unique name (or none at all)."
        )
    names = [str(r.name).strip() for r in recs]
    first: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names):
        if n in first:
            dups.append(f"name {n!r} at {recs[first[n]].where} and again at {recs[i].where}")
        else:
            first[n] = i
    if dups:
        raise InputError(
            f"{source}: duplicate structure names:" + _listing(dups) + "\nNames must be unique; rename or remove the duplicates."
        )
    return names


def energy_bound_ev_per_atom(atoms: Atoms) -> float:
    """The largest |energy| per atom (eV) that a structure can have: see ENERGY_BOUND_FACTOR."""
    z = int(atoms.numbers.max()) if len(atoms) else 1
    return ENERGY_BOUND_FACTOR * THOMAS_FERMI_HARTREE * z ** (7 / 3) * HARTREE_EV


def _beyond_bound(rec: _Record, value: float, key: str, unit: str) -> str | None:
    """A problem text when |value| (total per cell, in unit) exceeds the structure's physical bound."""
    n = len(rec.atoms)
    if n == 0:
        return None
    per_atom_ev = abs(to_ev(value, unit)) / n
    bound = energy_bound_ev_per_atom(rec.atoms)
    if per_atom_ev <= bound:
        return None
    heaviest = chemical_symbols[int(rec.atoms.numbers.max())]
    return (f"|{key}| = {abs(value):.6g} {unit} per cell is {per_atom_ev:.3g} eV per atom, beyond the "
            f"physical bound of {bound:.3g} eV per atom (twice the Thomas-Fermi total energy of its "
            f"heaviest atom, {heaviest})")


def _check_energies(raw: _Raw, names, energy_key, unit) -> np.ndarray:
    problems = []
    absurd = []
    energies = np.empty(len(names))
    for i, (rec, name) in enumerate(zip(raw.records, names)):
        value = _to_float(rec.energy) if rec.energy is not None else None
        if rec.energy is None:
            problems.append(f"{_label(rec, name)}: no {energy_key!r} value")
        elif value is None:
            problems.append(f"{_label(rec, name)}: {energy_key} = {rec.energy!r} is not a number")
        elif not math.isfinite(value):
            problems.append(f"{_label(rec, name)}: {energy_key} = {value} is not a finite number")
        elif (why := _beyond_bound(rec, value, energy_key, unit)) is not None:
            absurd.append(f"{_label(rec, name)}: {why}")
        else:
            energies[i] = value

    if problems:
        raise InputError(
            f"{raw.energy_file}: {len(problems)} structure(s) without a usable {energy_key} "
            f"(total per cell, in {unit}):" + _listing(problems)
            + f"\nGive every structure a finite {energy_key}, or remove it from the pool."
        )
    if absurd:
        raise InputError(
            f"{raw.energy_file}: {len(absurd)} structure(s) with an impossible {energy_key}:" + _listing(absurd)
            + f"\nCheck the unit (unit = {unit!r}: totals per cell) and the values of these structures."
        )
    return energies


def _check_refs(raw: _Raw, names, ref_key, unit: str = "eV") -> np.ndarray | None:
    if not raw.has_ref:
        return None
    refs = np.full(len(names), np.nan)
    problems = []
    for i, (rec, name) in enumerate(zip(raw.records, names)):
        if rec.ref is None or (isinstance(rec.ref, str) and rec.ref.strip() == ""):
            continue
        value = _to_float(rec.ref)
        if value is None or math.isinf(value):
            problems.append(f"{_label(rec, name)}: {ref_key} = {rec.ref!r} is not a number")
        elif math.isfinite(value) and (why := _beyond_bound(rec, value, ref_key, unit)) is not None:
            problems.append(f"{_label(rec, name)}: {why}")
        else:
            refs[i] = value
    if problems:
        raise InputError(
            f"{raw.energy_file}: unusable {ref_key} values:" + _listing(problems)
            + f"\nGive a number (or leave {ref_key} out) for each structure."
        )
    return refs


def _check_molecules(raw: _Raw, names, apm_given) -> tuple[int, dict[int, str]]:
    """Return (atoms_per_molecule, {index: problem}) for structures not made of the pool's molecule.

    Without ``apm_given`` the molecule is the bonded molecule of the first structure whose cell
    is made of identical molecules; every structure must consist of that molecule only. With
    ``apm_given`` (e.g. a salt, whose formula unit is not one bonded molecule) each cell's
    composition per formula unit must equal the first structure's.
    """
    recs = raw.records
    bad: dict[int, str] = {}
    if apm_given is not None:
        apm = int(apm_given)
        if apm <= 0:
            raise InputError(f"atoms_per_molecule must be a positive integer, got {apm_given!r}")
        reference = None
        for i, rec in enumerate(recs):
            comp = _composition_per_molecule(rec.atoms, apm)
            if comp is None:
                bad[i] = (
                    f"{len(rec.atoms)} atoms of composition {rec.atoms.get_chemical_formula('hill')} "
                    f"are not a whole number of {apm}-atom molecules"
                )
            elif reference is None:
                reference = (comp, names[i])
            elif comp != reference[0]:
                bad[i] = (
                    f"composition {rec.atoms.get_chemical_formula('hill')} differs from the "
                    f"molecule of {reference[1]!r}"
                )
        return apm, bad

    reference = None  # (formula, atoms per molecule, name)
    for i, rec in enumerate(recs):
        try:
            formulas = molecule_formulas(rec.atoms)
        except Exception as exc:  # e.g. a degenerate cell
            bad[i] = f"cannot find its molecules ({type(exc).__name__}: {exc})"
            continue
        if not formulas:
            bad[i] = "the structure has no atoms"
            continue
        kinds = set(formulas)
        if len(kinds) != 1:
            bad[i] = (
                f"molecules of different formulas ({_describe_molecules(formulas)}): a broken "
                "molecule or a mixture"
            )
            continue
        formula = formulas[0]
        if reference is None:
            reference = (formula, len(rec.atoms) // len(formulas), names[i])
        elif formula != reference[0]:
            bad[i] = (
                f"made of {formula} molecules, not {reference[0]} like {reference[2]!r}: "
                "another molecule, or molecules merged"
            )
    if reference is None:
        return 0, bad
    return reference[1], bad


def _check_periodic(raw: _Raw, names, source: str) -> None:
    """Every structure must be a crystal: periodic on all three axes, with a cell of volume."""
    problems = []
    for rec, name in zip(raw.records, names):
        atoms = rec.atoms
        pbc = [bool(p) for p in atoms.pbc]
        volume = abs(float(np.linalg.det(atoms.cell.array)))
        if volume < MIN_CELL_VOLUME:
            problems.append(f"{_label(rec, name)}: no unit cell (volume {volume:.3g} Å^3)")
        elif not all(pbc):
            problems.append(f"{_label(rec, name)}: not periodic on every axis (pbc = {pbc})")
    if problems:
        raise InputError(
            f"{source}: {len(problems)} structure(s) are not periodic crystals:" + _listing(problems)
            + "\ngraceq re-ranks crystal structures: give every structure its lattice vectors and "
            "periodic boundaries on all three axes (extended XYZ: Lattice=\"...\" pbc=\"T T T\"), "
            "or remove gas-phase molecules from the pool."
        )


def identical_structures(frames: Sequence[Atoms], names: Sequence[str], decimals: int = 6) -> list[list[str]]:
    """Groups (of 2 or more names) of structures with the same cell and the same atoms up to order.

    Exact up to ``decimals`` (Å): cell and Cartesian positions are rounded, atoms sorted by
    (Z, x, y, z), and the bytes compared. A translated or rotated copy is not found (that needs a
    structure matcher); the same structure written twice under two names is.
    """
    groups: dict[bytes, list[str]] = {}
    for atoms, name in zip(frames, names):
        pos = np.round(atoms.positions, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
        order = np.lexsort((pos[:, 2], pos[:, 1], pos[:, 0], atoms.numbers))
        key = (np.round(atoms.cell.array, decimals) + 0.0).tobytes() + atoms.numbers[order].tobytes() \
            + pos[order].tobytes()
        groups.setdefault(key, []).append(str(name))
    return [g for g in groups.values() if len(g) > 1]


def _validate(raw: _Raw, source: str, unit: str, energy_key, ref_key, apm_given, on_bad_molecule) -> Pool:
    if not raw.records:
        raise InputError(f"{source}: the pool is empty (no structures). {_WHAT_SOURCES}.")
    for note in raw.notes:
        warnings.warn(note, stacklevel=3)
    names = _check_names(raw, source)
    energies = _check_energies(raw, names, energy_key, unit)
    refs = _check_refs(raw, names, ref_key, unit)
    _check_periodic(raw, names, source)
    if apm_given is None:
        apm_given = raw.apm_hint
    apm, bad = _check_molecules(raw, names, apm_given)
    if bad:
        problems = [f"{_label(raw.records[i], names[i])}: {why}" for i, why in bad.items()]
        if on_bad_molecule == "error" or len(bad) == len(raw.records):
            raise InputError(
                f"{source}: {len(bad)} structure(s) are not made of the pool's molecule"
                + (f" ({apm} atoms)" if apm else "")
                + ":" + _listing(problems)
                + "\nRemove them from the pool, or read it with on_bad_molecule='skip' to drop them "
                "(e.g. structures whose molecules broke in the force-field relaxation)."
            )
        warnings.warn(
            f"{source}: dropped {len(bad)} structure(s) not made of the pool's molecule"
            " (all listed in dropped.csv of the campaign directory):" + _listing(problems),
            stacklevel=3,
        )
    keep = [i for i in range(len(raw.records)) if i not in bad]
    identical = identical_structures([raw.records[i].atoms for i in keep], [names[i] for i in keep])
    if identical:
        warnings.warn(
            f"{source}: {sum(len(g) for g in identical)} structures are geometrically identical to another "
            "one (same cell and atoms; all listed in identical.csv of the campaign directory):"
            + _listing([" = ".join(map(repr, g)) for g in identical])
            + "\nEach copy may be sent to the reference method: remove the copies unless they are intended.",
            stacklevel=3,
        )
    frames = [raw.records[i].atoms for i in keep]
    status = None
    if raw.has_status:
        status = [str(raw.records[i].status) if raw.records[i].status is not None else "" for i in keep]
    return Pool(
        frames=frames,
        names=[names[i] for i in keep],
        energy_ff=energies[keep],
        n_atoms=np.array([len(a) for a in frames], dtype=int),
        atoms_per_molecule=int(apm),
        unit=unit,
        source=source,
        energy_ref=None if refs is None else refs[keep],
        status=status,
        dropped=[(names[i], raw.records[i].where, why) for i, why in sorted(bad.items())],
        identical=identical,
    )


def read_pool(
    path,
    unit: str,
    energy_key: str = "energy_ff",
    name_key: str = "name",
    energies_csv=None,
    atoms_per_molecule: int | None = None,
    ref_key: str = "energy_ref",
    on_bad_molecule: str = "error",
    status_key: str = "status",
) -> Pool:
    """Return the validated :class:`Pool` read from ``path``.

    Parameters
    ----------
    path : str or Path
        Extended-XYZ (or any multi-frame ASE format) file, directory of VASP files, or ASE ``.db``.
    unit : str
        Unit of the energies in the source (totals per cell), e.g. "kJ/mol", "eV".
    energy_key, name_key, ref_key, status_key : str
        Keys (info keys, key-value pairs or CSV columns) of the force-field energy, the
        structure name, the optional reference energy and the optional status column.
    energies_csv : str or Path, optional
        Energy table of a VASP directory (default ``<path>/energies.csv``).
    atoms_per_molecule : int, optional
        Atoms per molecule; default: found from the bonded connectivity of the first structure.
    on_bad_molecule : {"error", "skip"}
        What to do with structures not made of the pool's molecule (broken molecules, another
        molecule): raise an InputError listing them, or drop them with a warning listing them.

    Raises
    ------
    InputError
        Unknown unit, missing or unreadable file, empty pool, missing / NaN / infinite energy,
        duplicate names, structures of another molecule or with broken molecules.
    """
    path = Path(path)
    try:
        unit = check_unit(unit)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    if on_bad_molecule not in ("error", "skip"):
        raise ValueError(f"on_bad_molecule must be 'error' or 'skip', got {on_bad_molecule!r}")
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise InputError(f"{path}: a loop of symbolic links; point the pool path at the real file.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path}: a loop of symbolic links; point the pool path at the real file.") from None
        if not isinstance(exc, FileNotFoundError):
            raise InputError(f"{path}: cannot open the generation pool ({exc.strerror}).") from None
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; check the path of the generation pool.")
    keys = (name_key, energy_key, ref_key, status_key)
    if path.is_dir():
        from graceq import csp_formats  # *.res / *.cif / *.POSCAR files, one folder per structure

        if not any(_is_vasp_file(p) for p in path.iterdir()) and csp_formats.structure_files(path):
            raw = csp_formats.read_structure_dir(path, energies_csv, *keys)
        else:
            raw = _read_vasp_dir(path, energies_csv, *keys)
    elif path.suffix.lower() == ".db":
        raw = _read_db(path, unit, *keys)
    elif path.suffix.lower() in (".res", ".ins"):
        from graceq import csp_formats  # SHELX with SYMM/LATT, expanded to the full cell

        raw = csp_formats.read_res_pool(path, *keys)
    else:
        raw = _read_ase_file(path, *keys)
    pool = _validate(raw, str(path), unit, energy_key, ref_key, atoms_per_molecule, on_bad_molecule)
    pool.source = str(path.resolve())  # workers (and the replay engine) may run elsewhere
    return pool


def min_labelled(train_fraction: float, cv: int) -> int:
    """The fewest stable labelled structures the committee can be fitted on.

    The chronological split (:func:`graceq.model.chronological_split`) must leave at least ``cv``
    structures to train (``cv``-fold cross-validation of lambda) and one to calibrate on.
    """
    from graceq.model import chronological_split

    for n in range(2, 100 * cv + 100):
        try:
            chronological_split(n, train_fraction, cv)
            return n
        except ValueError:
            continue
    raise ValueError(f"no labelled set size fits train_fraction={train_fraction}, cv={cv}")


def check_pool_fits_settings(n_pool: int, settings, source: str = "settings") -> None:
    """Refuse, before any reference call, a pool or an n_init too small to fit the committee.

    The first fit happens after the initial batch: with fewer than :func:`min_labelled` stable
    results it would stop ("too few to fit the committee") after the reference calls were paid.
    """
    c, m = settings.campaign, settings.model
    need = min_labelled(m.train_fraction, m.cv)
    split = f"a chronological {m.train_fraction:.0%}/{1 - m.train_fraction:.0%} split with {m.cv}-fold cross-validation"
    if n_pool < need + 1:
        raise InputError(
            f"{source}: the pool holds {n_pool} structure(s); the committee needs at least {need} stable "
            f"reference results ({split}) and one structure left to choose: give a pool of at least "
            f"{need + 1} structures.")
    if c.n_init < need:
        raise InputError(
            f"{source}: [campaign] n_init = {c.n_init} is too small: the committee is first fitted on the "
            f"initial batch and needs at least {need} stable reference results ({split}). Set n_init >= {need} "
            "(more if some structures may come back unstable or failed).")
    if c.n_init >= n_pool:
        raise InputError(
            f"{source}: [campaign] n_init = {c.n_init} would send the whole pool of {n_pool} structures to "
            f"the reference method in the initial batch: set n_init below {n_pool}.")


def write_pool_notes(pool: Pool, folder) -> list[Path]:
    """Write dropped.csv (name, where, reason) and identical.csv (group, name) when there is any.

    ``folder`` is the campaign directory; returns the files written.
    """
    folder = Path(folder)
    written = []
    if pool.dropped:
        path = folder / "dropped.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "where", "reason"])
            writer.writerows(pool.dropped)
        written.append(path)
    if pool.identical:
        path = folder / "identical.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["group", "name"])
            writer.writerows((k, name) for k, group in enumerate(pool.identical) for name in group)
        written.append(path)
    return written
