"""The `replay` reference engine: answers from a completed reranking.

Retrospective benchmarks run the active learner on a landscape whose reference energies are all
known; the engine hands out one of them only when the campaign asks for that structure. The
answers come from the pool file itself (default: the pool's source file, key ``energy_ref``, total
per cell) or from a CSV ``name,energy_ref[,status]``. A ``status`` of ``unstable`` or ``failed``
gives that outcome; ``converged`` and ``unconverged`` (benzamide's labels for a relaxation that
reached fmax or stopped at its step limit) both mean the reference succeeded.

Settings: ``source`` (path; default the pool source), ``key`` ("energy_ref"), ``name_key``
("name"), ``status_key`` ("status"), ``source_unit`` (default the campaign unit),
``return_structures`` (False: the source's structure is returned as the relaxed one when True),
``delay_s`` (0: seconds each answer takes, to rehearse a deployment or measure the dispatch
overhead with jobs of a known length).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ase import Atoms

from graceq.units import check_unit, from_ev, to_ev

from .base import ReferenceEngine, ReferenceResult, check_settings

#: status values in a replay source that mean the reference succeeded
SUCCESS_STATUSES = {"", "converged", "unconverged", "ok", "success"}


@dataclass
class _Table:
    """Reference answers of one source: name -> (energy total per cell in source unit, status, index)."""

    energy: dict
    status: dict
    frames: list | None  # structures of an ASE-readable source, in file order
    index: dict


# (resolved path, mtime_ns, key, name_key, status_key, with_frames) -> _Table; loaded once per process
_TABLES: dict[tuple, _Table] = {}


def _number(value) -> float:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _load_csv(path: Path, key: str, name_key: str, status_key: str) -> _Table:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if name_key not in columns or key not in columns:
            raise ValueError(
                f"{path}: a replay table needs the columns {name_key!r} and {key!r} "
                f"(optionally {status_key!r}); found {columns}"
            )
        energy, status, index = {}, {}, {}
        for i, row in enumerate(reader):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            name = row[name_key]
            energy[name] = _number(row.get(key))
            status[name] = row.get(status_key, "").lower()
            index[name] = i
    return _Table(energy, status, None, index)


def _load_db(path: Path, key: str, name_key: str, status_key: str, with_frames: bool) -> _Table:
    import ase.db

    energy, status, index, frames = {}, {}, {}, []
    with ase.db.connect(str(path), type="db") as db:
        for i, row in enumerate(db.select(sort="id")):
            name = row.get(name_key)
            if name is None and row.get("data"):
                name = row.data.get(name_key)
            name = str(name)
            energy[name] = _number(row.get(key))
            status[name] = str(row.get(status_key, "")).lower()
            index[name] = i
            if with_frames:
                frames.append(row.toatoms())
    return _Table(energy, status, frames if with_frames else None, index)


def _load_structures(path: Path, key: str, name_key: str, status_key: str, with_frames: bool) -> _Table:
    from graceq.readers import read_structures

    frames = read_structures(path, text_keys=(name_key, status_key))  # names as written: '007' stays '007'
    energy, status, index = {}, {}, {}
    for i, atoms in enumerate(frames):
        name = str(atoms.info.get(name_key, f"frame-{i:05d}"))
        value = atoms.info.get(key)
        if value is None and atoms.calc is not None:
            value = atoms.calc.results.get(key)
        energy[name] = _number(value)
        status[name] = str(atoms.info.get(status_key, "")).lower()
        index[name] = i
    return _Table(energy, status, frames if with_frames else None, index)


def load_table(path, key="energy_ref", name_key="name", status_key="status", with_frames=False) -> _Table:
    """Return the reference answers in ``path`` (CSV, ASE .db or any ASE-readable file), cached per process."""
    path = Path(path).resolve()
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: the replay engine's source does not exist; set [engine] source to a CSV "
            f"'{name_key},{key}[,{status_key}]' or a structure file with '{key}' per structure"
        ) from None
    cache_key = (str(path), mtime, key, name_key, status_key, with_frames)
    table = _TABLES.get(cache_key)
    if table is None:
        try:
            if path.suffix.lower() == ".csv":
                table = _load_csv(path, key, name_key, status_key)
            elif path.suffix.lower() == ".db":
                table = _load_db(path, key, name_key, status_key, with_frames)
            else:
                table = _load_structures(path, key, name_key, status_key, with_frames)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: cannot read the replay source ({type(exc).__name__}: {exc})") from exc
        if not any(math.isfinite(e) for e in table.energy.values()):
            raise ValueError(
                f"{path}: no structure in the replay source has a {key!r} value; "
                "the replay engine needs the reference energies of a completed reranking"
            )
        _TABLES[cache_key] = table
    return table


class ReplayEngine(ReferenceEngine):
    """Looks up each structure's reference energy (total per cell) in a completed reranking."""

    name = "replay"
    SETTINGS = {"source", "key", "name_key", "status_key", "source_unit", "return_structures", "delay_s"}

    def __init__(self, settings: dict[str, Any], unit: str, pool_source: str | None = None):
        settings = dict(settings or {})
        check_settings(settings, self.SETTINGS, self.name)
        source = settings.get("source") or pool_source
        if not source:
            raise ValueError(
                "engine 'replay' needs a source of reference energies: set [engine] source to a CSV "
                "'name,energy_ref[,status]', or keep energy_ref in the pool file"
            )
        self.source = Path(source)
        self.unit = check_unit(unit)
        self.source_unit = check_unit(settings.get("source_unit") or unit)
        self.key = settings.get("key", "energy_ref")
        self.name_key = settings.get("name_key", "name")
        self.status_key = settings.get("status_key", "status")
        self.return_structures = bool(settings.get("return_structures", False))
        self.delay_s = float(settings.get("delay_s", 0.0))
        if not self.delay_s >= 0:
            raise ValueError(f"engine 'replay': delay_s must be >= 0 s, got {self.delay_s}")

    @classmethod
    def from_settings(cls, settings, unit, pool_source=None):
        return cls(settings, unit, pool_source)

    @classmethod
    def files_read(cls, settings, pool_source=None):
        source = (settings or {}).get("source") or pool_source
        return [str(source)] if source else []

    def _table(self) -> _Table:
        return load_table(self.source, self.key, self.name_key, self.status_key, self.return_structures)

    def check(self) -> None:
        """Load (and cache) the source now, so that a missing file stops the campaign at init."""
        self._table()

    def run(self, atoms: Atoms, name: str, workdir=None,
            heartbeat: Callable[[], None] | None = None) -> ReferenceResult:
        """Return the recorded outcome for ``name``; ``atoms`` and ``workdir`` are not used."""
        deadline = time.monotonic() + self.delay_s
        while True:
            if heartbeat is not None:
                heartbeat()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.5))
        table = self._table()
        name = str(name)
        if name not in table.energy:
            return ReferenceResult.failed(name, f"{self.source}: no entry named {name!r} in the replay source")
        status = table.status[name]
        relaxed = None
        if table.frames is not None:
            relaxed = table.frames[table.index[name]].copy()
        if status in ("unstable", "failed"):
            return ReferenceResult(name, status, None, relaxed,
                                   message=f"{self.source}: recorded as {status}")
        if status not in SUCCESS_STATUSES:
            return ReferenceResult.failed(name, f"{self.source}: unknown status {status!r} for {name!r}", relaxed)
        energy = table.energy[name]
        if not math.isfinite(energy):
            return ReferenceResult.failed(name, f"{self.source}: no {self.key} for {name!r}", relaxed)
        if self.source_unit != self.unit:
            energy = from_ev(to_ev(energy, self.source_unit), self.unit)
        return ReferenceResult(name, "converged", float(energy), relaxed, n_steps=0,
                               message="" if status in ("", "converged") else f"recorded as {status}")
