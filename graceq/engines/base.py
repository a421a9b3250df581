"""The reference-engine interface: what a `dft` task runs on one pool structure.

Like an ASE calculator, an engine is one small interface with interchangeable implementations:
``engine.run(atoms, name, workdir)`` re-minimises one structure at the reference level and returns
a :class:`ReferenceResult`. Engines know nothing of Celery or of the campaign; they write only
inside ``workdir`` (their checkpoint), so that a re-delivered task can resume there.

How a job runs is part of the interface too, as ASE's profiles have ``execute`` and
``execute_nonblocking``: ``submit(atoms, name, workdir)`` starts the work and ``poll(workdirs)``
gives the results of the jobs that have ended. The default ``submit`` runs :meth:`run` at once
(blocking) and keeps its result in ``workdir/result.json``; an engine that hands jobs to a batch
scheduler (``slurm``) overrides both and returns from ``submit`` in a second. The runtime calls
``submit`` then ``poll`` for every engine and never asks which kind it has.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ase import Atoms

#: The three outcomes of a re-minimisation.
STATUSES = ("converged", "unstable", "failed")

#: the file in a job's working directory that holds its ReferenceResult once the job has ended
JOB_RESULT = "result.json"


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

    @classmethod
    def failed(cls, name: str, message: str, atoms: Atoms | None = None, n_steps: int = 0) -> "ReferenceResult":
        """A failed re-minimisation of structure ``name``; ``message`` says why (and what to read)."""
        return cls(name=str(name), status="failed", energy=None, atoms=atoms, n_steps=n_steps, message=message)

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

    @classmethod
    def files_read(cls, settings: dict[str, Any], pool_source: str | None = None) -> list[str]:
        """The files the engine's settings make it read (paths as given): a worker of a shared
        broker with campaign roots reads none outside them (:func:`graceq.trust.check_engine_policy`)."""
        return []

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

    def submit(self, atoms: Atoms, name: str, workdir: Path,
               heartbeat: Callable[[], None] | None = None) -> None:
        """Start the re-minimisation of ``atoms`` in ``workdir``; :meth:`poll` gives its result.

        The default runs :meth:`run` here and now (ASE's ``execute``) and writes the result to
        ``workdir/result.json`` by atomic rename. Idempotent, as every ``submit`` must be: a job
        whose result is there already is not run again. A non-blocking engine (ASE's
        ``execute_nonblocking``) overrides this to hand the job to its scheduler and return at once,
        and must not start a second job for a workdir it has submitted before.
        """
        from graceq.store import atomic_write_json

        workdir = Path(workdir)
        if (workdir / JOB_RESULT).exists():
            return
        result = self.run(atoms, name, workdir, heartbeat=heartbeat)
        if heartbeat is not None:  # still ours: a holder that lost its lease writes nothing
            heartbeat()
        atomic_write_json(workdir / JOB_RESULT, result.to_json())

    def poll(self, workdirs) -> dict[Path, ReferenceResult | None]:
        """The result of each submitted job that has ended, None for one still running.

        Keys are the given workdirs as ``Path``. The default reads ``workdir/result.json``; a
        scheduler engine also watches its jobs there and re-submits or fails one that vanished.
        """
        return {Path(w): read_job_result(Path(w)) for w in workdirs}


def read_job_result(workdir: Path) -> ReferenceResult | None:
    """The ReferenceResult kept in ``workdir/result.json``, None when the job has not ended."""
    try:
        return ReferenceResult.from_json(json.loads((Path(workdir) / JOB_RESULT).read_text()))
    except FileNotFoundError:
        return None


def check_settings(settings: dict[str, Any], known: set[str], engine: str) -> None:
    """Raise ValueError naming any setting the engine does not know (catches typos early)."""
    unknown = sorted(set(settings) - known - {"engine"})
    if unknown:
        raise ValueError(
            f"engine {engine!r}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
