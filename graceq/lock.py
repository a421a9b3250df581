"""One coordinator per campaign: a lease file that names its holder and beats while it lives.

Two `graceq run` on one campaign would both write ``state.sqlite`` and both send the same picks (the
second crashed with ``UNIQUE constraint failed: picks.idx``). The coordinator therefore holds
``coordinator.lock`` in the campaign directory: a JSON record of the holder (host, PID, start time,
the current stage and when it began) that a thread rewrites every ``timeout_s / 6`` seconds (the
heartbeat). Another process may take the lease over only when it is stale:

- the holder ran on this host and its PID is gone (killed, crashed, SIGKILLed): at once;
- or its heartbeat (the file's modification time) is older than ``timeout_s`` (another host, whose
  PIDs we cannot check, or a hung process): after the timeout, 60 s by default
  (``GRACEQ_LOCK_TIMEOUT`` in seconds changes it).

Taking a lease is atomic when it is free (``os.link`` of a private claim file fails if the lock
exists). Taking over a stale one is a replace, then a check after a short settle time that the file
still names us: of two processes that take over the same stale lease at once, only the last one
keeps it and the other is refused. The holder also re-reads the file at every stage boundary and
stops (``LeaseLost``) if someone else holds it, so that two writers never go on side by side.

`graceq status` reads the same file (:func:`coordinator_lines`) to say whether the coordinator is
alive, for how long, and what it is doing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from graceq.store import atomic_write_json

log = logging.getLogger("graceq.lock")

LOCK_NAME = "coordinator.lock"
DEFAULT_TIMEOUT_S = 60.0
TAKEOVER_SETTLE_S = 0.5  # s between replacing a stale lease and checking that it is still ours


class CampaignLocked(RuntimeError):
    """Another live coordinator holds the campaign; the message names it."""


class LeaseLost(RuntimeError):
    """This coordinator's lease was taken over by another process: it must stop writing."""


def lock_timeout() -> float:
    """The heartbeat age (s) after which a lease is stale: GRACEQ_LOCK_TIMEOUT or 60 s."""
    try:
        return float(os.environ.get("GRACEQ_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


@dataclass
class Holder:
    """What a lock file says about its coordinator (times in s since the epoch)."""

    host: str
    pid: int
    started: float
    stage: str
    stage_since: float
    token: str
    heartbeat: float  # the file's modification time

    @classmethod
    def read(cls, path: Path) -> "Holder | None":
        """The holder recorded in `path`, or None when there is no (readable) lock file."""
        try:
            beat = path.stat().st_mtime
            record = json.loads(path.read_text())
            return cls(host=str(record["host"]), pid=int(record["pid"]), started=float(record["started"]),
                       stage=str(record.get("stage", "")), stage_since=float(record.get("stage_since", beat)),
                       token=str(record.get("token", "")), heartbeat=beat)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_alive(self, timeout_s: float, now: float | None = None) -> bool:
        """Whether this holder still runs: a fresh heartbeat, and (on this host) a live PID."""
        now = time.time() if now is None else now
        if now - self.heartbeat > timeout_s:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # alive, another user's process
                pass
        return True

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"PID {self.pid} on {self.host}, started {started}"


def duration(seconds: float) -> str:
    """A duration for people: '42 s', '12 min 5 s', '3 h 04 min', '2 d 5 h'."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


class CoordinatorLock:
    """The lease of one coordinator on one campaign directory (see the module docstring).

    ``acquire`` takes it or raises :class:`CampaignLocked`; a thread refreshes it until ``release``.
    ``set_stage`` records what the coordinator is doing (shown by `graceq status`) and raises
    :class:`LeaseLost` when another process has taken the lease over. Before ``acquire`` and after
    ``release``, ``set_stage`` does nothing.
    """

    def __init__(self, root: str | Path, timeout_s: float | None = None):
        self.path = Path(root) / LOCK_NAME
        self.timeout_s = lock_timeout() if timeout_s is None else float(timeout_s)
        self.token = secrets.token_hex(8)
        self.started = time.time()
        self.stage = "starting"
        self.stage_since = self.started
        self.held = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                "stage": self.stage, "stage_since": self.stage_since, "token": self.token}

    def acquire(self) -> "CoordinatorLock":
        """Take the campaign's lease, or raise CampaignLocked naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        claim = self.path.with_name(f".{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.{self.token}")
        atomic_write_json(claim, self._record())
        try:
            os.link(claim, self.path)  # atomic: fails when a lock file exists
        except FileExistsError:
            holder = Holder.read(self.path)
            if holder is not None and holder.is_alive(self.timeout_s):
                claim.unlink(missing_ok=True)
                raise CampaignLocked(self._refusal(holder)) from None
            if holder is not None:
                log.warning("taking over the stale lease of %s (last heartbeat %s ago)", holder.describe(),
                            duration(time.time() - holder.heartbeat))
            os.replace(claim, self.path)
            time.sleep(TAKEOVER_SETTLE_S)  # a competitor that replaced it at the same moment shows now
            now = Holder.read(self.path)
            if now is None or now.token != self.token:
                raise CampaignLocked(self._refusal(now) if now else f"{self.path}: another coordinator "
                                     "took this campaign over at the same moment") from None
        else:
            claim.unlink(missing_ok=True)
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="graceq-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _refusal(self, holder: Holder) -> str:
        return (f"{self.path.parent}: a coordinator already runs this campaign ({holder.describe()}, "
                f"stage: {holder.stage or 'unknown'}; last heartbeat {duration(time.time() - holder.heartbeat)} "
                f"ago). Follow it with `graceq status {self.path.parent}`; if that process is gone for good, "
                f"its lease lapses {duration(self.timeout_s)} after its last heartbeat, or delete {self.path}.")

    def _owned(self) -> bool:
        holder = Holder.read(self.path)
        return holder is not None and holder.token == self.token

    def _write(self) -> None:
        with self._mutex:
            if not self.held:
                return
            if not self._owned():
                self.held = False
                self._stop.set()
                log.error("%s: the coordinator lease was taken over by another process", self.path)
                return
            atomic_write_json(self.path, self._record())

    def _beat(self) -> None:
        while not self._stop.wait(max(0.2, self.timeout_s / 6)):
            self._write()

    def set_stage(self, stage: str) -> None:
        """Record the coordinator's current stage (and its start time) in the lock file.

        Raises LeaseLost if another coordinator has taken the campaign over meanwhile.
        """
        if self._thread is None:
            return
        if not self.held:
            raise LeaseLost(f"{self.path.parent}: another coordinator took this campaign over "
                            f"({self._holder_text()}); this one stops")
        self.stage, self.stage_since = stage, time.time()
        self._write()
        if not self.held:
            raise LeaseLost(f"{self.path.parent}: another coordinator took this campaign over "
                            f"({self._holder_text()}); this one stops")

    def _holder_text(self) -> str:
        holder = Holder.read(self.path)
        return holder.describe() if holder else "no lock file"

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._mutex:
            if self.held and self._owned():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "CoordinatorLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def coordinator_lines(root: str | Path, now: float | None = None) -> list[str]:
    """`graceq status` lines about the coordinator: alive or not, since when, its current stage."""
    now = time.time() if now is None else now
    holder = Holder.read(Path(root) / LOCK_NAME)
    if holder is None:
        return ["coordinator not running (start or resume it with `graceq run`)"]
    if holder.is_alive(lock_timeout(), now):
        return [f"coordinator alive: {holder.describe()}, running for {duration(now - holder.started)}",
                f"stage      {holder.stage} (for {duration(now - holder.stage_since)})"]
    return [f"coordinator not running: {holder.describe()} stopped without releasing the campaign "
            f"(last heartbeat {duration(now - holder.heartbeat)} ago, stage {holder.stage}); "
            "`graceq run` resumes it"]


def coordinator_alive(root: str | Path) -> bool:
    """Whether a live coordinator holds the campaign in `root`."""
    holder = Holder.read(Path(root) / LOCK_NAME)
    return holder is not None and holder.is_alive(lock_timeout())
