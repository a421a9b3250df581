"""Pools in the formats CSP codes write: SHELX .res with symmetry, CIF and POSCAR directories.

- **SHELX .res** (CSPy, GRACE exports, public CSP sets): one structure per ``TITL`` ... ``END``
  block, one or several blocks per file. Only the asymmetric unit is listed; ``LATT`` (lattice
  centring, positive = centrosymmetric) and ``SYMM`` records give the space group, and the cell is
  the expansion of the listed atoms by every operation. ASE's ``res`` reader (AIRSS dialect, atoms
  already in P1) and pymatgen's ``ResIO`` (AIRSS too) do not apply ``SYMM``/``LATT``, and gemmi
  reads small structures from CIF only, so graceq parses the records itself and lets gemmi do the
  symmetry: ``gemmi.Op`` parses each ``SYMM`` triplet and ``gemmi.GroupOps`` adds the inversion and
  the centring vectors. Atoms that land on each other (special positions) are merged.
  The title line follows the CSP convention ``TITL <name> <energy> [<density>]``: the energy is a
  lattice energy **per molecule** (what CSP codes report; made a total per cell here with the
  number of molecules found in the expanded cell), the density in g/cm^3 is checked against the
  expanded cell, and ``ZERR <Z> ...`` (molecules per cell) against the molecules found.
- **Directories**: ``*.res``, ``*.cif``, ``*.POSCAR`` files (one structure each, the name is the
  file name without its suffix), or one folder per structure holding a ``POSCAR``, ``CONTCAR``,
  ``*.vasp``, ``*.cif`` or ``*.res`` (the name is the folder's). Energies come from ``energies.csv``
  (``name,energy_ff[,energy_ref,status]``, totals per cell, as for VASP directories) when the
  directory has one, else from the .res titles.

Every problem is an :class:`graceq.pool.InputError` naming the file, the structure and the fix.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms

#: atoms of the expanded cell closer than this (Å) are one atom on a special position
MERGE_DISTANCE = 0.3
#: |density from the title - density of the expanded cell| above this (g/cm^3) means a wrong
#: expansion (a missing or extra symmetry copy changes the density by at least 1/Z)
DENSITY_TOLERANCE = 0.01

_LATT_CENTRING = {  # SHELX LATT N (absolute value) -> centring translations
    1: [(0, 0, 0)],
    2: [(0, 0, 0), (0.5, 0.5, 0.5)],
    3: [(0, 0, 0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)],
    4: [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)],
    5: [(0, 0, 0), (0, 0.5, 0.5)],
    6: [(0, 0, 0), (0.5, 0, 0.5)],
    7: [(0, 0, 0), (0.5, 0.5, 0)],
}
_INSTRUCTIONS = {
    "TITL", "CELL", "ZERR", "LATT", "SYMM", "SFAC", "DISP", "UNIT", "REM", "END", "HKLF", "FVAR", "WGHT",
    "L.S.", "CGLS", "PLAN", "FMAP", "LIST", "ACTA", "BOND", "CONF", "SIZE", "TEMP", "OMIT", "MORE", "EXTI",
    "SWAT", "MERG", "SHEL", "BASF", "TWIN", "AFIX", "HFIX", "PART", "RESI", "DFIX", "DANG", "SADI", "FLAT",
    "DELU", "SIMU", "RIGU", "ISOR", "EADP", "EXYZ", "EQIV", "HTAB", "CONN", "FREE", "BIND", "SPEC", "SUMP",
    "ANIS", "FRAG", "FEND", "BLOC", "DAMP", "STIR", "MOVE", "NEUT", "ABIN", "ANSC", "ANSR", "LAUE", "PRIG",
    "GRID", "MPLA", "RTAB", "WPDB", "BUMP", "CHIV", "DEFS", "NCSY", "SAME", "XNPD", "STIR", "TIME", "WIGL",
    "LONE", "INIT", "PACK", "RESN", "Q1",
}


def _input_error(message: str):
    from graceq.pool import InputError

    return InputError(message)


def _float(token: str) -> float:
    return float(re.sub(r"\(\d+\)$", "", token))  # "8.4628(3)" -> 8.4628


def _coordinate(value: float) -> float:
    """SHELX adds 10 to a coordinate it keeps fixed: remove it."""
    if value > 5.0:
        return value - 10.0
    if value < -5.0:
        return value + 10.0
    return value


class ResBlock:
    """One TITL ... END block of a SHELX file, as read (before expansion)."""

    def __init__(self, file: str, line: int):
        self.file, self.line = file, line
        self.title: list[str] = []
        self.cell: list[float] | None = None
        self.z: int | None = None
        self.latt = 1
        self.symm: list[str] = []
        self.sfac: list[str] = []
        self.atoms: list[tuple[str, str, tuple[float, float, float]]] = []  # label, element, fractional

    @property
    def where(self) -> str:
        return f"{self.file}: structure at line {self.line}"

    @property
    def name(self) -> str | None:
        return self.title[0] if self.title else None

    def title_numbers(self) -> list[float]:
        out = []
        for token in self.title[1:]:
            try:
                out.append(float(token))
            except ValueError:
                break
        return out


def parse_res(text: str, file: str = "<string>") -> list[ResBlock]:
    """The TITL ... END blocks of a SHELX .res/.ins text (continuation lines ending in '=' joined)."""
    lines = text.replace("=\n", " ").splitlines()
    blocks: list[ResBlock] = []
    block = None
    for number, raw in enumerate(lines, start=1):
        line = raw.split("!")[0].strip()
        if not line:
            continue
        tokens = line.split()
        key = tokens[0].upper()
        if key == "TITL" or block is None:
            block = ResBlock(file, number)
            blocks.append(block)
            if key == "TITL":
                block.title = tokens[1:]
                continue
        try:
            if key == "CELL":
                block.cell = [_float(t) for t in tokens[2:8]]
            elif key == "ZERR":
                block.z = int(round(_float(tokens[1])))
            elif key == "LATT":
                block.latt = int(tokens[1])
            elif key == "SYMM":
                block.symm.append(line[4:].strip())
            elif key == "SFAC":
                for t in tokens[1:]:
                    if re.fullmatch(r"[A-Za-z]{1,2}", t):
                        block.sfac.append(t.capitalize())
                    else:
                        break  # the long form: an element then its scattering coefficients
            elif key == "END":
                block = None
            elif key not in _INSTRUCTIONS and len(tokens) >= 5 and re.fullmatch(r"-?\d+", tokens[1]):
                index = int(tokens[1])
                if not 1 <= index <= len(block.sfac):
                    raise ValueError(f"atom {tokens[0]} names SFAC entry {index}, but SFAC lists {block.sfac}")
                xyz = tuple(_coordinate(_float(t)) for t in tokens[2:5])
                block.atoms.append((tokens[0], block.sfac[index - 1], xyz))
        except (ValueError, IndexError) as exc:
            raise _input_error(f"{file}: line {number} ({raw.strip()!r}) cannot be read: {exc}. Fix the "
                               "record or remove the structure.") from None
    return [b for b in blocks if b.atoms or b.cell]


def symmetry_operations(block: ResBlock):
    """Every operation of the block's space group (gemmi.GroupOps from LATT and SYMM)."""
    import gemmi

    if abs(block.latt) not in _LATT_CENTRING:
        raise _input_error(f"{block.where}: LATT {block.latt} is not a SHELX lattice type (+-1 to +-7).")
    try:
        ops = [gemmi.Op("x,y,z")] + [gemmi.Op(s.replace(" ", "").lower()) for s in block.symm]
    except (RuntimeError, ValueError) as exc:
        raise _input_error(f"{block.where}: a SYMM record is not a symmetry operation ({exc}); "
                           f"records: {block.symm}") from None
    group = gemmi.GroupOps(ops)
    if block.latt > 0:
        group.add_inversion()
    den = gemmi.Op.DEN
    group.cen_ops = [[int(round(v * den)) for v in t] for t in _LATT_CENTRING[abs(block.latt)]]
    return group


def expand(block: ResBlock) -> Atoms:
    """The full unit cell of a .res block: every listed atom under every symmetry operation."""
    from ase.geometry import cellpar_to_cell

    if block.cell is None:
        raise _input_error(f"{block.where}: no CELL record, so the cell is unknown; add "
                           "'CELL wavelength a b c alpha beta gamma'.")
    if not block.atoms:
        raise _input_error(f"{block.where}: no atoms (lines 'label sfac x y z ...' after SFAC).")
    group = symmetry_operations(block)
    cell = cellpar_to_cell(block.cell)
    symbols, frac = [], []
    for op in group:
        for _, element, xyz in block.atoms:
            symbols.append(element)
            frac.append(op.apply_to_xyz(list(xyz)))
    frac = np.mod(np.asarray(frac, dtype=float), 1.0)
    keep = []
    for k in range(len(frac)):  # merge copies on special positions (first copy kept)
        if keep:
            d = frac[keep] - frac[k]
            d -= np.round(d)
            close = np.linalg.norm(d @ cell, axis=1) < MERGE_DISTANCE
            if close.any():
                other = np.asarray(keep)[close]
                if any(symbols[j] != symbols[k] for j in other):
                    raise _input_error(f"{block.where}: atoms of different elements meet at one position after "
                                       "applying the symmetry; the SYMM/LATT records do not fit the atoms.")
                continue
        keep.append(k)
    return Atoms(symbols=[symbols[k] for k in keep], scaled_positions=frac[keep], cell=cell, pbc=True)


def read_res(path, energy_key: str = "energy_ff") -> list[Atoms]:
    """Structures of a SHELX .res file, expanded to the full cell and checked.

    ``atoms.info``: ``name`` (title's first word, else the file name with the block number),
    ``energy_key`` (title energy per molecule x molecules in the cell; absent without a title
    energy), ``energy_per_molecule_title``, ``density_title_gcm3``, ``spacegroup`` (gemmi's name
    of the expanded operations), ``z``.
    """
    from gemmi import find_spacegroup_by_ops

    from graceq.chemistry import molecule_formulas
    from graceq.polymorphs import cell_density_gcm3

    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise _input_error(f"{path}: cannot read the SHELX file ({exc}).") from None
    blocks = parse_res(text, str(path))
    if not blocks:
        raise _input_error(f"{path}: no TITL/CELL/atom records, so no structure; is this a SHELX .res file?")
    out = []
    for k, block in enumerate(blocks):
        atoms = expand(block)
        name = block.name or (path.stem if len(blocks) == 1 else f"{path.stem}-{k + 1}")
        n_mol = len(molecule_formulas(atoms))
        if block.z is not None and block.z != n_mol:
            raise _input_error(
                f"{block.where} ({name}): ZERR says Z = {block.z} molecules per cell, but the expanded cell of "
                f"{len(atoms)} atoms holds {n_mol} bonded molecules; the SYMM/LATT records or the atom list "
                "are wrong (or Z counts something else: fix ZERR).")
        numbers = block.title_numbers()
        density = cell_density_gcm3(atoms)
        info = {"name": name, "z": n_mol, "density_gcm3": density}
        group = find_spacegroup_by_ops(symmetry_operations(block))
        info["spacegroup"] = group.xhm() if group is not None else "unknown setting"
        if numbers:
            info["energy_per_molecule_title"] = numbers[0]
            info[energy_key] = numbers[0] * n_mol
        if len(numbers) > 1:
            info["density_title_gcm3"] = numbers[1]
            if abs(numbers[1] - density) > DENSITY_TOLERANCE:
                raise _input_error(
                    f"{block.where} ({name}): the title gives a density of {numbers[1]} g/cm^3, the expanded cell "
                    f"has {density:.4f} g/cm^3 ({len(atoms)} atoms, {n_mol} molecules); symmetry copies are "
                    "missing or extra. Check LATT (positive = centrosymmetric) and the SYMM records.")
        atoms.info.update(info)
        out.append(atoms)
    return out


# -- directories ----------------------------------------------------------------------------------
_STRUCTURE_SUFFIXES = (".res", ".cif", ".poscar", ".vasp")
_FOLDER_FILES = ("POSCAR", "CONTCAR")


def _file_structures(p: Path, energy_key: str) -> list[Atoms]:
    """Structures of one file by its kind (.res: read_res; others: ASE), named after the file."""
    import ase.io

    suffix = p.suffix.lower()
    if suffix == ".res":
        return read_res(p, energy_key)
    fmt = "cif" if suffix == ".cif" else "vasp"
    try:
        frames = ase.io.read(str(p), index=":", format=fmt)
    except Exception as exc:  # ASE raises many types for unreadable files
        raise _input_error(f"{p}: cannot read as {fmt.upper()} ({type(exc).__name__}: {exc}); fix or remove "
                           "the file.") from None
    frames = frames if isinstance(frames, list) else [frames]
    stem = p.name[: -len(p.suffix)] if suffix in _STRUCTURE_SUFFIXES else p.name
    for k, atoms in enumerate(frames):
        atoms.info = {"name": stem if len(frames) == 1 else f"{stem}-{k + 1}"}
    return frames


def structure_files(path: Path) -> list[tuple[str, Path]] | None:
    """(name, file) of every structure of a CSP directory, or None when it is not one.

    A CSP directory holds ``*.res``, ``*.cif`` or ``*.POSCAR`` files, or folders holding one
    structure each (``POSCAR``, ``CONTCAR``, ``*.vasp``, ``*.cif``, ``*.res``; named after the
    folder). Plain VASP directories (``POSCAR*``/``*.vasp`` files) are left to graceq.pool.
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".res", ".cif", ".poscar"))
    if files:
        return [(p.name[: -len(p.suffix)], p) for p in files]
    folders = []
    for d in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        inside = [d / n for n in _FOLDER_FILES if (d / n).is_file()]
        inside += sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in (".vasp", ".cif", ".res"))
        if inside:
            folders.append((d.name, inside[0]))
    return folders or None


def read_structure_dir(path, energies_csv=None, name_key="name", energy_key="energy_ff", ref_key="energy_ref",
                       status_key="status"):
    """graceq.pool's raw records of a CSP directory (see :func:`structure_files`).

    Energies: the CSV (``energies_csv``, or ``energies.csv`` in the directory) when there is one
    (totals per cell; its row order is the pool order), else each .res title.
    """
    from graceq.pool import _Raw, _read_energy_csv, _Record

    path = Path(path)
    entries = structure_files(path)
    if entries is None:
        raise _input_error(f"{path}: no structure files (*.res, *.cif, *.POSCAR, or folders with a POSCAR).")
    csv_path = Path(energies_csv) if energies_csv is not None else path / "energies.csv"
    table = _read_energy_csv(csv_path, name_key, energy_key, ref_key, status_key) if csv_path.is_file() else None
    records = []
    for name, file in entries:
        frames = _file_structures(file, energy_key)
        for k, atoms in enumerate(frames):
            if file.parent != path:  # one folder per structure: the folder names it
                label = name if len(frames) == 1 else f"{name}-{k + 1}"
            else:  # a file: its .res title, else the file name
                label = str(atoms.info["name"])
            row = table.get(label, {}) if table is not None else {}
            energy = (row.get(energy_key) or None) if table is not None else atoms.info.get(energy_key)
            records.append(_Record(atoms=atoms, name=label, energy=energy, ref=row.get(ref_key) or None,
                                   status=row.get(status_key) or None, where=f"file {file.relative_to(path)}",
                                   file=str(csv_path if table is not None else file)))
    if table is None and any(r.energy is None for r in records):
        missing = [str(r.name) for r in records if r.energy is None]
        raise _input_error(
            f"{csv_path}: no energy table for the {len(missing)} structure(s) of {path} whose files carry no "
            f"energy ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Put an energies.csv with "
            f"header '{name_key},{energy_key}' (total per cell) in the directory, or give energies_csv.")
    if table is not None:
        order = {n: i for i, n in enumerate(table)}
        records.sort(key=lambda r: (order.get(r.name, len(order)), str(r.name)))
        unused = sorted(set(table) - {r.name for r in records})
        if unused:
            warnings.warn(f"{csv_path}: {len(unused)} name(s) have no structure in {path} and are ignored: "
                          + ", ".join(unused[:20]), stacklevel=3)
    first = next(iter(table.values()), {}) if table else {}
    return _Raw(records, has_ref=ref_key in first, has_status=status_key in first,
                energy_file=str(csv_path) if table is not None else str(path))


def read_res_pool(path, name_key="name", energy_key="energy_ff", ref_key="energy_ref", status_key="status"):
    """graceq.pool's raw records of one (multi-structure) .res file; energies from the titles."""
    from graceq.pool import _Raw, _Record

    path = Path(path)
    frames = read_res(path, energy_key)
    records = [_Record(atoms=a, name=a.info["name"], energy=a.info.get(energy_key), where=f"structure {k + 1}",
                       file=str(path)) for k, a in enumerate(frames)]
    return _Raw(records, has_ref=False, has_status=False, energy_file=str(path))
