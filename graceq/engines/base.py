"""The reference-engine interface: what a `dft` task runs on one pool structure.

Like an ASE calculator, an engine is one small interface with interchangeable implementations:
``engine.run(atoms, name, workdir)`` re-minimises one structure at the reference level and returns
a :class:`ReferenceResult`. Engines know nothing of Celery or of the campaign; they write only
inside ``workdir`` (their checkpoint), so that a re-delivered task can resume there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ase import Atoms

#: The three outcomes of a re-minimisation.
STATUSES = ("converged", "unstable", "failed")


def atoms_to_json(atoms: Atoms) -> dict:
    """Return a JSON-safe dict of a structure (numbers, positions in Å, cell in Å, pbc), full precision."""
    return {
        "numbers": [int(z) for z in atoms.numbers],
        "positions": np.asarray(atoms.positions, dtype=float).tolist(),
        "cell": np.asarray(atoms.cell[:], dtype=float).tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
    }


def atoms_from_json(d: dict) -> Atoms:
    """Inverse of :func:`atoms_to_json`."""
    return Atoms(numbers=d["numbers"], positions=d["positions"], cell=d["cell"], pbc=d["pbc"])


@dataclass
class ReferenceResult:
    """The outcome of one reference-level re-minimisation.

    Attributes
    ----------
    name : str
        Structure name in the pool.
    status : {"converged", "unstable", "failed"}
        converged: a usable reference energy; unstable: the structure left its basin (a molecule
        broke or bonded to another); failed: the reference calculation did not finish (SCF not
        converged, too many steps, missing data, engine error).
    energy : float or None
        Reference energy, total per cell, in the campaign unit; only for ``converged``.
    atoms : ase.Atoms or None
        Relaxed structure, when the engine has one.
    n_steps : int
        Optimiser steps taken (all resumed segments together).
    message : str
        Why a structure failed or is unstable, or notes (e.g. a positions-only relaxation).
    """

    name: str
    status: str
    energy: float | None
    atoms: Atoms | None
    n_steps: int = 0
    message: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> dict:
        """Return a JSON-safe dict (no numpy types, atoms as plain lists)."""
        energy = None if self.energy is None else float(self.energy)
        if energy is not None and not math.isfinite(energy):
            energy = None
        return {
            "name": str(self.name),
            "status": self.status,
            "energy": energy,
            "atoms": None if self.atoms is None else atoms_to_json(self.atoms),
            "n_steps": int(self.n_steps),
            "message": str(self.message),
        }

    @classmethod
    def from_json(cls, d: dict) -> "ReferenceResult":
        """Rebuild a result from :meth:`to_json` output (extra keys, e.g. a task id, are ignored)."""
        atoms = d.get("atoms")
        return cls(
            name=d["name"],
            status=d["status"],
            energy=None if d.get("energy") is None else float(d["energy"]),
            atoms=None if atoms is None else atoms_from_json(atoms),
            n_steps=int(d.get("n_steps", 0)),
            message=d.get("message", "") or "",
        )


class ReferenceEngine(ABC):
    """Re-minimises one structure at the reference level.

    Subclasses set ``name``, implement :meth:`run`, and are built from the campaign's engine
    settings by :meth:`from_settings` (called by :func:`graceq.engines.make_engine`).
    """

    name: str = ""

    @classmethod
    def from_settings(cls, settings: dict[str, Any], unit: str, pool_source: str | None = None):
        """Return an engine for the campaign's ``[engine]`` settings and energy unit."""
        return cls(settings, unit)

    def check(self) -> None:
        """Raise a clear error now if the engine cannot work (missing program, unknown calculator)."""

    @abstractmethod
    def run(self, atoms: Atoms, name: str, workdir: Path,
            heartbeat: Callable[[], None] | None = None) -> ReferenceResult:
        """Return the reference result for ``atoms`` (named ``name`` in the pool).

        ``workdir`` is this structure's own directory: an engine keeps its checkpoint there, and
        a second call with the same workdir resumes rather than restarts. ``heartbeat``, when
        given, is called regularly during long work (the runtime keeps a lease with it); an
        exception it raises stops the work and propagates.
        """


def check_settings(settings: dict[str, Any], known: set[str], engine: str) -> None:
    """Raise ValueError naming any setting the engine does not know (catches typos early)."""
    unknown = sorted(set(settings) - known - {"engine"})
    if unknown:
        raise ValueError(
            f"engine {engine!r}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
