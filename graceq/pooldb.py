"""The campaign's own copy of the pool: an ASE SQLite database (``structures.db``).

:func:`write_pool_db` stores the validated :class:`graceq.pool.Pool` when a campaign is created;
:func:`read_frames_db` gives the structures a task is sent (without their reference energies),
:func:`read_pool_db` the whole pool. Row id = pool index + 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import ase.db
import numpy as np
from ase import Atoms

from .pool import InputError, Pool, _open_db, _row_name
from .units import check_unit


def _name_fits_key_value(name: str) -> bool:
    try:
        ase.db.core.check({"name": name})
    except ValueError:
        return False
    return True


def write_pool_db(pool: Pool, path) -> None:
    """Write ``pool`` to an ASE SQLite database at ``path`` (replacing any file there).

    Row id = pool index + 1; key-value pairs ``name``, ``energy_ff`` (total per cell, in
    ``pool.unit``), ``energy_ref`` (where known), ``status`` (where known), ``n_molecules``; the
    database metadata holds ``unit``, ``atoms_per_molecule`` and ``source``. A name that ASE
    would read back as a number is kept in the row's data instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.db")
    if tmp.exists():
        tmp.unlink()
    db = ase.db.connect(str(tmp), type="db", append=False)
    with db:
        for i, atoms in enumerate(pool.frames):
            kv = {
                "energy_ff": float(pool.energy_ff[i]),
                "n_molecules": int(pool.n_atoms[i] // pool.atoms_per_molecule),
            }
            data = {}
            if _name_fits_key_value(pool.names[i]):
                kv["name"] = pool.names[i]
            else:
                data["name"] = pool.names[i]
            if pool.energy_ref is not None and np.isfinite(pool.energy_ref[i]):
                kv["energy_ref"] = float(pool.energy_ref[i])
            if pool.status is not None and pool.status[i]:
                kv["status"] = pool.status[i]
            bare = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            row_id = db.write(bare, key_value_pairs=kv, data=data)
            assert row_id == i + 1, "a fresh database numbers rows from 1"
    db.metadata = {
        "graceq_pool": 1,
        "unit": pool.unit,
        "atoms_per_molecule": int(pool.atoms_per_molecule),
        "source": str(pool.source),
        "has_energy_ref": pool.energy_ref is not None,
        "has_status": pool.status is not None,
    }
    tmp.replace(path)  # readers never see a half-written pool


def _pool_row_atoms(row) -> Atoms:
    """The structure of a pool-database row, with info name and energy_ff (never energy_ref)."""
    atoms = row.toatoms()
    atoms.info["name"] = str(_row_name(row, "name"))
    atoms.info["energy_ff"] = row.get("energy_ff")
    return atoms


def read_pool_db(path) -> Pool:
    """Return the Pool stored by :func:`write_pool_db` (no re-validation: graceq wrote it)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such pool database; was the campaign initialised?")
    db = _open_db(path)
    meta = db.metadata or {}
    if "unit" not in meta or "atoms_per_molecule" not in meta:
        raise InputError(
            f"{path}: an ASE database without graceq's pool metadata (unit, atoms_per_molecule); "
            "read it with read_pool(path, unit=...) instead."
        )
    frames, names, e_ff, e_ref, status = [], [], [], [], []
    for row in db.select(sort="id"):
        frames.append(_pool_row_atoms(row))
        names.append(frames[-1].info["name"])
        e_ff.append(row.get("energy_ff"))
        e_ref.append(row.get("energy_ref", np.nan))
        status.append(row.get("status", ""))
    return Pool(
        frames=frames,
        names=names,
        energy_ff=np.asarray(e_ff, dtype=float),
        n_atoms=np.array([len(a) for a in frames], dtype=int),
        atoms_per_molecule=int(meta["atoms_per_molecule"]),
        unit=check_unit(meta["unit"]),
        source=str(meta.get("source", path)),
        energy_ref=np.asarray(e_ref, dtype=float) if meta.get("has_energy_ref") else None,
        status=status if meta.get("has_status") else None,
    )


def read_frames_db(path, indices: Iterable[int]) -> list[Atoms]:
    """Return the structures at pool ``indices`` (0-based) from a pool database.

    Each has ``info["name"]`` and ``info["energy_ff"]``; the reference energy is left out, so that
    a worker sees only what the campaign asked for.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such pool database.")
    db = _open_db(path)
    out = []
    for i in indices:
        try:
            out.append(_pool_row_atoms(db.get(id=int(i) + 1)))
        except KeyError:
            raise InputError(f"{path}: no structure with pool index {i} (row id {int(i) + 1}).") from None
    return out
