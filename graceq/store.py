"""Durable campaign state: one SQLite file and artifact files in the campaign directory.

The coordinator is the only writer of ``state.sqlite``. Workers never touch it: they write their
results as files (atomically, by rename) under ``results/`` and ``artifacts/``, and the coordinator
ingests them. Everything needed to resume a campaign lives in its directory:

    settings.toml          the settings the campaign runs with
    state.sqlite           structures, picks, reference results, jobs, iterations
    structures.db          the pool (ASE database: the field's format for structures + key-values)
    pool.json              where the pool came from, its unit, atoms per molecule, species
    relaxed.db             reference-level structures returned by the engines
    artifacts/             projection.npz, features/chunk_*.npy, features.npy
    iterations/NNNN/       training set, committee members, predictions of one iteration
    results/<idx>.json     reference results written by the workers
    jobs/<idx>/            engine working directories (checkpoints) and leases
    broker/                the embedded broker's message folder (no broker configured)
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger("graceq.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS structures (
    idx INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, n_atoms INTEGER NOT NULL,
    energy_ff REAL NOT NULL            -- total per cell, campaign unit
);
CREATE TABLE IF NOT EXISTS picks (
    idx INTEGER PRIMARY KEY REFERENCES structures(idx),
    iteration INTEGER NOT NULL, rank INTEGER NOT NULL,
    ei REAL,                           -- expected improvement when picked, campaign unit per molecule
    mu REAL, sigma REAL                -- predicted energy per molecule when picked
);
CREATE TABLE IF NOT EXISTS results (
    idx INTEGER PRIMARY KEY REFERENCES structures(idx),
    status TEXT NOT NULL,              -- converged | unstable | failed
    energy_ref REAL,                   -- total per cell, campaign unit
    n_steps INTEGER, message TEXT, received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    idx INTEGER PRIMARY KEY REFERENCES structures(idx),
    task_id TEXT NOT NULL, sent_at REAL NOT NULL, attempts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS iterations (
    iteration INTEGER PRIMARY KEY, stats TEXT NOT NULL, finished REAL NOT NULL
);
"""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or the whole file (rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: follow the user's umask like open() does
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1).encode())


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to a temporary name, then rename (workers' results are all-or-nothing)."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


class ArtifactError(RuntimeError):
    """An artifact file that cannot be read (truncated, not the format its name says, keys
    missing); the message names the file and where the bad copy was moved."""


def load_artifact(path: str | Path, keys: tuple[str, ...] = ()):
    """Return the content of an artifact file, read whole and checked; raise ArtifactError if bad.

    ``.npy``: the array; ``.npz``: a dict of every array (all members read now, so a truncated
    archive fails here and not later in a BadZipFile); ``.json``: the decoded value. ``keys``:
    entries an ``.npz``/``.json`` must have. A bad file is moved aside to ``<name>.corrupt`` (the
    evidence is kept, and its producer, which skips work whose output exists, writes it again).
    A missing file raises FileNotFoundError as usual.
    """
    import zipfile
    import zlib

    path = Path(path)
    try:
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                value = {name: archive[name] for name in archive.files}
        elif path.suffix == ".json":
            value = json.loads(path.read_text())
        else:
            raise ValueError(f"{path}: not an artifact kind graceq reads (.npy, .npz, .json)")
        missing = [k for k in keys if not isinstance(value, dict) or k not in value]
        if missing:
            raise KeyError(f"missing {', '.join(missing)}")
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            pass
        raise ArtifactError(
            f"{path}: corrupt or truncated artifact ({type(exc).__name__}: {exc}); moved aside to "
            f"{aside.name}; graceq computes it again (run the campaign again if it stopped)"
        ) from None
    return value


def artifact_ok(path: str | Path, keys: tuple[str, ...] = ()) -> bool:
    """Whether an artifact exists and reads whole; a corrupt one is moved aside (logged) so that
    it is recomputed: callers use this where they used ``path.exists()``."""
    try:
        load_artifact(path, keys)
    except FileNotFoundError:
        return False
    except ArtifactError as exc:
        log.warning("%s", exc)
        return False
    return True


def error_file(output: Path) -> Path:
    """Where a task that could not produce `output` writes its reason (the coordinator watches it)."""
    return output.with_name(output.name + ".error.json")


class CampaignPaths:
    """Where each piece of a campaign lives; shared by the coordinator and the workers."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    settings = property(lambda self: self.root / "settings.toml")
    state = property(lambda self: self.root / "state.sqlite")
    structures = property(lambda self: self.root / "structures.db")
    relaxed = property(lambda self: self.root / "relaxed.db")
    artifacts = property(lambda self: self.root / "artifacts")
    projection = property(lambda self: self.root / "artifacts" / "projection.npz")
    features = property(lambda self: self.root / "artifacts" / "features.npy")
    results = property(lambda self: self.root / "results")
    broker = property(lambda self: self.root / "broker")
    pool_meta = property(lambda self: self.root / "pool.json")
    summary = property(lambda self: self.root / "summary.json")
    reports = property(lambda self: self.root / "report")

    def feature_chunk(self, chunk: int) -> Path:
        return self.artifacts / "features" / f"chunk_{chunk:05d}.npy"

    def iteration(self, iteration: int) -> Path:
        return self.root / "iterations" / f"{iteration:04d}"

    def members(self, iteration: int, start: int, stop: int) -> Path:
        return self.iteration(iteration) / f"members_{start:04d}_{stop:04d}.npz"

    def result(self, idx: int) -> Path:
        return self.results / f"{idx:06d}.json"

    def job_dir(self, idx: int) -> Path:
        return self.root / "jobs" / f"{idx:06d}"


def foreign_artifacts(paths: CampaignPaths) -> list[str]:
    """Files derived from a pool in a directory that has no campaign state (relative paths,
    sorted): another campaign's features, models, results or queued messages, which a new campaign
    must not pick up. (settings.toml, structures.db and pool.json are rewritten by `init`.)"""
    names = ("artifacts", "iterations", "results", "jobs", "broker", "relaxed.db", "summary.json")
    return sorted(name + ("/" if (paths.root / name).is_dir() else "")
                  for name in names if (paths.root / name).exists())


class CampaignStore:
    """The campaign's SQLite state (single writer: the coordinator).

    ``readonly=True`` opens an existing store for reading only (``graceq status``, reports): it
    never creates ``state.sqlite`` nor changes anything, and a directory without one raises
    FileNotFoundError naming it.
    """

    def __init__(self, root: str | Path, readonly: bool = False):
        self.paths = CampaignPaths(root)
        if readonly:
            if not self.paths.state.is_file():
                raise FileNotFoundError(
                    f"{self.paths.root}: no campaign here (no state.sqlite); create one with `graceq init`"
                )
            uri = self.paths.state.as_uri()
            try:  # sees what a running coordinator committed (SQLite may add empty -wal/-shm files)
                self._db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
                self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:  # a folder we may not write to: the file as it is
                self._db = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "structures" not in tables or self.n_structures() == 0:
                self._db.close()
                raise FileNotFoundError(
                    f"{self.paths.root}: no campaign here (state.sqlite holds none); create one with `graceq init`"
                )
            return
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.paths.state, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self.checkpoint()

    def close(self) -> None:
        self._db.close()

    def checkpoint(self) -> None:
        """Copy the write-ahead log into state.sqlite and empty it.

        In WAL mode committed transactions live in ``state.sqlite-wal`` until a checkpoint; SQLite's
        automatic one waits for 1,000 pages, which a campaign may never write. Done after every
        transaction (every iteration's commit), so that state.sqlite alone (a copy, a backup
        without ``-wal``) holds the campaign up to its last iteration.
        """
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing: an iteration's record and its next picks land together or not at all.

        The store is checkpointed after the commit (see `checkpoint`)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self.checkpoint()

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    # -- structures -------------------------------------------------------------------------
    def add_structures(self, names: list[str], n_atoms: np.ndarray, energy_ff: np.ndarray) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO structures(idx, name, n_atoms, energy_ff) VALUES (?, ?, ?, ?)",
                [(i, n, int(a), float(e)) for i, (n, a, e) in enumerate(zip(names, n_atoms, energy_ff))],
            )

    def structures(self) -> dict[str, np.ndarray]:
        rows = self._db.execute("SELECT idx, name, n_atoms, energy_ff FROM structures ORDER BY idx").fetchall()
        return {
            "name": np.array([r[1] for r in rows], dtype=object),
            "n_atoms": np.array([r[2] for r in rows], dtype=int),
            "energy_ff": np.array([r[3] for r in rows], dtype=float),
        }

    def n_structures(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM structures").fetchone()[0]

    # -- picks ------------------------------------------------------------------------------
    def add_picks(self, db: sqlite3.Connection, iteration: int, picks, ei=None, mu=None, sigma=None,
                  first_rank: int = 0) -> None:
        """Record picks of one iteration in pick order, ranked from ``first_rank`` (picks appended
        to an iteration's go on from its last rank)."""
        n = len(picks)
        ei = [None] * n if ei is None else ei
        mu = [None] * n if mu is None else mu
        sigma = [None] * n if sigma is None else sigma
        db.executemany(
            "INSERT INTO picks(idx, iteration, rank, ei, mu, sigma) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (int(i), iteration, rank, _opt(e), _opt(m), _opt(s))
                for rank, (i, e, m, s) in enumerate(zip(picks, ei, mu, sigma), start=first_rank)
            ],
        )

    def picks(self) -> list[tuple[int, int]]:
        """(structure index, iteration) of every pick, in the order they were sampled."""
        return self._db.execute("SELECT idx, iteration FROM picks ORDER BY iteration, rank").fetchall()

    def pick_table(self) -> list[tuple]:
        return self._db.execute(
            "SELECT idx, iteration, rank, ei, mu, sigma FROM picks ORDER BY iteration, rank"
        ).fetchall()

    def last_pick_iteration(self) -> int | None:
        return self._db.execute("SELECT MAX(iteration) FROM picks").fetchone()[0]

    # -- results ----------------------------------------------------------------------------
    def add_result(self, idx: int, status: str, energy_ref: float | None, n_steps: int, message: str) -> bool:
        """Record a reference result once; a second delivery of the same job changes nothing."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO results(idx, status, energy_ref, n_steps, message, received) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (int(idx), status, energy_ref, int(n_steps), message, time.time()),
        )
        return cursor.rowcount == 1

    def results(self) -> dict[int, tuple[str, float | None]]:
        rows = self._db.execute("SELECT idx, status, energy_ref FROM results").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def result_table(self) -> list[tuple]:
        return self._db.execute(
            "SELECT idx, status, energy_ref, n_steps, message FROM results ORDER BY idx"
        ).fetchall()

    # -- jobs -------------------------------------------------------------------------------
    def record_sent(self, idx: int, task_id: str, count: bool = True) -> int:
        """Record a delivery of a reference job (one more attempt if `count`); returns the attempts."""
        self._db.execute(
            "INSERT INTO jobs(idx, task_id, sent_at, attempts) VALUES (?, ?, ?, 1) "
            "ON CONFLICT(idx) DO UPDATE SET sent_at = excluded.sent_at, attempts = attempts + ?",
            (int(idx), task_id, time.time(), int(count)),
        )
        return self._db.execute("SELECT attempts FROM jobs WHERE idx = ?", (int(idx),)).fetchone()[0]

    def jobs(self) -> dict[int, tuple[str, float, int]]:
        rows = self._db.execute("SELECT idx, task_id, sent_at, attempts FROM jobs").fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # -- iterations -------------------------------------------------------------------------
    def add_iteration(self, db: sqlite3.Connection, iteration: int, stats: dict[str, Any]) -> None:
        db.execute(  # replaced when a stop is lifted and the iteration decided again
            "INSERT OR REPLACE INTO iterations(iteration, stats, finished) VALUES (?, ?, ?)",
            (iteration, json.dumps(stats), time.time()),
        )

    def iterations(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT iteration, stats FROM iterations ORDER BY iteration").fetchall()
        return [dict(json.loads(s), iteration=i) for i, s in rows]


def _opt(value):
    return None if value is None else float(value)


# -- arrival order (issue 9: asynchronous steering) -------------------------------------------------
ARRIVALS = """
CREATE TABLE IF NOT EXISTS arrivals (
    seq INTEGER PRIMARY KEY,           -- 1, 2, 3 ...: the order in which results were recorded
    idx INTEGER UNIQUE NOT NULL REFERENCES structures(idx)
);
"""


def _arrivals_table(db: sqlite3.Connection) -> None:
    db.execute(ARRIVALS)


def add_arrival(store: "CampaignStore", idx: int) -> int:
    """Append structure idx to the arrival log (once); returns its place in the order (1-based)."""
    _arrivals_table(store._db)
    store._db.execute("INSERT OR IGNORE INTO arrivals(idx) VALUES (?)", (int(idx),))
    return store._db.execute("SELECT seq FROM arrivals WHERE idx = ?", (int(idx),)).fetchone()[0]


def arrivals(store: "CampaignStore") -> list[int]:
    """Pool indices of the recorded results, in the order they arrived (what async decisions replay)."""
    _arrivals_table(store._db)
    return [r[0] for r in store._db.execute("SELECT idx FROM arrivals ORDER BY seq").fetchall()]


CampaignStore.add_arrival = add_arrival
CampaignStore.arrivals = arrivals
