"""Trust boundaries: what a worker runs, which messages it serves, which results count.

Three parties meet in a graceq deployment (README, "Security model"):

- the **worker operator** runs ``graceq worker`` as some user; that user's files, credentials and
  CPU hours are what an attacker wants;
- the **campaign author** writes ``settings.toml`` and owns the campaign directory; on a shared
  pool the author is not the operator, so a settings file must not be able to run code as the
  operator (``calculator = "subprocess.Popen"`` with ``shell = true`` once did exactly that);
- the **broker** (Redis) carries messages: whoever can write to it can send any task with any
  arguments, so a message is checked before it may touch the disk.

What this module gives:

- :func:`settings_code_allowed`: the operator's switch (``graceq worker --allow-code`` or
  ``GRACEQ_ALLOW_SETTINGS_CODE=1``). Off on broker workers by default: engines and calculators
  then come only from the registry (graceq's names, ASE's own calculator classes, and entry
  points of installed packages; see ``graceq.engines``). A process that is not a broker worker
  (``graceq init``/``run``, embedded workers of one's own campaign) runs the author's own
  settings and allows code unless told otherwise.
- :class:`CheckedTask`: the base class of every graceq task (``app.py`` passes it as
  ``task_cls``). Before a task body runs it verifies the message signature (when a key is
  configured), that ``campaign_dir`` is a campaign under one of the worker's campaign roots
  (``--campaign-root``/``GRACEQ_CAMPAIGN_ROOTS``), and that indices are non-negative integers
  within the campaign. Nothing is written before these checks pass; a refused message is logged
  and fails, and the worker goes on serving.
- :func:`check_result` / :func:`read_result` / :func:`reject`: a result file is checked against
  what was sent before it counts, and a bad one is moved to ``results/rejected/`` with its reason.
- Message signing (optional): with ``GRACEQ_SIGNING_KEY`` (or ``GRACEQ_SIGNING_KEY_FILE``) every
  published task carries an HMAC-SHA256 over its name, id and arguments, and workers refuse
  unsigned or mis-signed messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from celery import Task
from celery.signals import before_task_publish, worker_init

log = logging.getLogger("graceq.trust")

ENV_ALLOW_CODE = "GRACEQ_ALLOW_SETTINGS_CODE"
ENV_ROOTS = "GRACEQ_CAMPAIGN_ROOTS"
ENV_SIGNING_KEY = "GRACEQ_SIGNING_KEY"
ENV_SIGNING_KEY_FILE = "GRACEQ_SIGNING_KEY_FILE"
SIGNATURE_HEADER = "graceq_signature"

#: the outcomes a result file may report (graceq.engines.base.STATUSES)
KNOWN_STATUSES = ("converged", "unstable", "failed")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# set in the worker's main process before its pool forks (the children inherit it)
_role = {"worker": False}


class UntrustedMessage(Exception):
    """A task message this worker refuses to serve; the message says why and what to change."""


class CodeNotAllowed(ValueError):
    """A settings file names code (module:Class, a program to run) that the worker's operator did not allow."""


# -- the operator's switches ----------------------------------------------------------------
def _embedded() -> bool:
    return bool(os.environ.get("GRACEQ_EMBEDDED_DIR")) and not os.environ.get("GRACEQ_BROKER_URL")


def _broker_worker() -> bool:
    """This process is a worker of a shared broker (not an embedded one, not the author's own tools)."""
    return _role["worker"] and not _embedded()


def settings_code_allowed() -> bool:
    """Whether a settings file may name code (module:Class engines and calculators, programs).

    ``GRACEQ_ALLOW_SETTINGS_CODE`` decides when set (``graceq worker`` always sets it: 1 with
    ``--allow-code``, else 0). Unset: allowed, except in a worker of a shared broker, because a
    process that is not such a worker (``graceq init``, ``graceq run``, a script, an embedded
    worker of the author's own campaign) runs its own user's settings.
    """
    value = os.environ.get(ENV_ALLOW_CODE, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return not _broker_worker()


def code_refusal(what: str, how: str = "") -> CodeNotAllowed:
    """The error (logged as a warning) for a settings file that names code on a worker that runs none."""
    message = (
        f"{what}: a settings file may not name code here; this worker runs only registered engines "
        "and calculators (graceq's names, ASE's own calculators, entry points of installed packages). "
        f"{how}The worker's operator can allow settings code with `graceq worker --allow-code` "
        f"({ENV_ALLOW_CODE}=1), which lets every campaign author run code as the worker's user."
    )
    log.warning("refused: %s", message)
    return CodeNotAllowed(message)


def campaign_roots() -> list[Path]:
    """The folders whose campaigns this worker serves (resolved); empty: any campaign directory.

    From ``GRACEQ_CAMPAIGN_ROOTS`` (os.pathsep-separated; ``graceq worker --campaign-root``
    sets it). An embedded worker serves only its own campaign (the folder its broker lives in).
    """
    if _embedded():
        return [Path(os.environ["GRACEQ_EMBEDDED_DIR"]).resolve().parent]
    raw = os.environ.get(ENV_ROOTS, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


# -- message signing ------------------------------------------------------------------------
_key_cache: dict[tuple, bytes] = {}


def signing_key() -> bytes | None:
    """The shared signing secret (GRACEQ_SIGNING_KEY, or the first line of GRACEQ_SIGNING_KEY_FILE), or None."""
    value = os.environ.get(ENV_SIGNING_KEY)
    if value:
        return value.encode()
    path = os.environ.get(ENV_SIGNING_KEY_FILE)
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise UntrustedMessage(f"{ENV_SIGNING_KEY_FILE}={path}: cannot read the signing key ({exc})") from None
    cache_key = (path, stat.st_mtime_ns, stat.st_size)
    if cache_key not in _key_cache:
        if stat.st_mode & 0o077:
            log.warning("%s: the signing key file is readable by others (mode %o); chmod 600 it",
                        path, stat.st_mode & 0o777)
        key = Path(path).read_text().strip().encode()
        if not key:
            raise UntrustedMessage(f"{ENV_SIGNING_KEY_FILE}={path}: the signing key file is empty")
        _key_cache.clear()
        _key_cache[cache_key] = key
    return _key_cache[cache_key]


def signature(key: bytes, task_name: str, task_id: str, args: Iterable, kwargs: dict | None) -> str:
    """HMAC-SHA256 (hex) over the task name, id and JSON arguments, as both ends see them."""
    payload = json.dumps([task_name, task_id, list(args or ()), dict(kwargs or {})],
                         sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


@before_task_publish.connect
def _sign_message(sender=None, body=None, headers=None, **_) -> None:
    """Add the signature header to every task this process publishes, when a key is configured."""
    key = signing_key()
    if key is None or headers is None or not isinstance(body, (list, tuple)) or len(body) < 2:
        return
    headers[SIGNATURE_HEADER] = signature(key, headers.get("task", sender), headers.get("id"), body[0], body[1])


@worker_init.connect
def _worker_starts(**_) -> None:
    """Mark this process as a broker worker (code off unless allowed) and log its trust policy."""
    _role["worker"] = True
    roots = campaign_roots()
    log.warning(
        "graceq worker trust policy: settings code %s; campaign roots: %s; message signing: %s",
        "ALLOWED" if settings_code_allowed() else "refused",
        ", ".join(map(str, roots)) if roots else "ANY campaign directory (set --campaign-root)",
        "required" if signing_key() else "off",
    )


# -- checks of a message before its task runs ------------------------------------------------
def _non_negative_int(name: str, value: Any, below: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UntrustedMessage(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise UntrustedMessage(f"{name} must be >= 0, got {value}")
    if below is not None and value >= below:
        raise UntrustedMessage(f"{name} {value} is out of range: {what} (< {below})")
    return value


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def check_campaign_dir(campaign_dir: Any, roots: list[Path] | None = None) -> Path:
    """Return the resolved campaign directory a message names, or raise UntrustedMessage.

    It must exist, be a graceq campaign (pool.json and settings.toml), lie inside one of the
    ``roots`` (all, when none are configured), and its folders the worker writes into must not
    lead out of it through symbolic links.
    """
    roots = campaign_roots() if roots is None else roots
    if not isinstance(campaign_dir, str) or not campaign_dir:
        raise UntrustedMessage(f"campaign_dir must be a path, got {campaign_dir!r}")
    try:
        root = Path(campaign_dir).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UntrustedMessage(f"campaign_dir {campaign_dir}: not a directory here ({exc})") from None
    if roots and not any(_inside(root, r) for r in roots):
        raise UntrustedMessage(
            f"campaign_dir {root} is outside this worker's campaign roots ({', '.join(map(str, roots))}); "
            "the worker's operator adds roots with `graceq worker --campaign-root DIR`"
        )
    if not root.is_dir() or not (root / "pool.json").is_file() or not (root / "settings.toml").is_file():
        raise UntrustedMessage(f"campaign_dir {root} is not a graceq campaign (no pool.json or settings.toml)")
    for sub in ("results", "jobs", "artifacts", "iterations"):
        if (root / sub).is_symlink() or ((root / sub).exists() and not _inside(root / sub, root)):
            raise UntrustedMessage(f"campaign_dir {root}: {sub}/ is a link out of the campaign; refused")
    return root


def pool_size(root: Path) -> int:
    """Number of pool structures of a campaign (pool.json), or UntrustedMessage."""
    try:
        n = json.loads((root / "pool.json").read_text())["n_structures"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UntrustedMessage(f"{root / 'pool.json'}: unreadable ({type(exc).__name__}: {exc})") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UntrustedMessage(f"{root / 'pool.json'}: n_structures must be a positive integer, got {n!r}")
    return n


def pool_name(root: Path, idx: int) -> str:
    """The pool's name of structure idx (structures.db, read through graceq.pooldb; nothing is written)."""
    from graceq.pool import InputError
    from graceq.pooldb import read_frames_db

    try:
        return str(read_frames_db(root / "structures.db", [idx])[0].info["name"])
    except (InputError, KeyError) as exc:
        raise UntrustedMessage(f"{root / 'structures.db'}: no name for pool index {idx} ({exc})") from None
    except Exception as exc:  # a damaged database is the campaign's problem, not a reason to crash
        raise UntrustedMessage(f"{root / 'structures.db'}: unreadable ({type(exc).__name__}: {exc})") from None


def check_arguments(task_name: str, arguments: dict[str, Any], roots: list[Path] | None = None) -> None:
    """Check a task's named arguments before it runs; raises UntrustedMessage.

    By argument name, so that every task (today's and tomorrow's) gets the same rules:
    ``campaign_dir`` (see :func:`check_campaign_dir`), ``idx`` (< pool size, and ``name`` must be
    its pool name), ``iteration`` (<= pool size: every iteration labels a structure), ``chunk``,
    ``start``/``stop`` (0 <= start < stop; pool rows for featurize), ``sample`` (pool rows),
    ``species`` (atomic numbers), ``alpha``/``ridge_lambda`` (finite, > 0).
    """
    if "campaign_dir" not in arguments:
        return
    root = check_campaign_dir(arguments["campaign_dir"], roots)
    n = pool_size(root)
    if "idx" in arguments:
        idx = _non_negative_int("idx", arguments["idx"], n, f"the campaign has {n} pool structures")
        if (root / "jobs" / f"{idx:06d}").is_symlink():
            raise UntrustedMessage(f"{root}/jobs/{idx:06d} is a link; refused")
        if "name" in arguments:
            expected = pool_name(root, idx)
            if arguments["name"] != expected:
                raise UntrustedMessage(
                    f"structure {idx} of {root} is named {expected!r}, the message says {arguments['name']!r}"
                )
    if "iteration" in arguments:
        it = _non_negative_int("iteration", arguments["iteration"], n + 1, "an iteration labels a structure")
        if (root / "iterations" / f"{it:04d}").is_symlink():
            raise UntrustedMessage(f"{root}/iterations/{it:04d} is a link; refused")
    if "chunk" in arguments:
        _non_negative_int("chunk", arguments["chunk"], n, "chunks of the pool")
    if "start" in arguments or "stop" in arguments:
        start = _non_negative_int("start", arguments.get("start"))
        stop = _non_negative_int("stop", arguments.get("stop"))
        if stop <= start:
            raise UntrustedMessage(f"start {start} must be < stop {stop}")
        if task_name == "graceq.featurize" and stop > n:
            raise UntrustedMessage(f"stop {stop} is past the pool's {n} structures")
    if "sample" in arguments:
        if not isinstance(arguments["sample"], list) or not arguments["sample"]:
            raise UntrustedMessage("sample must be a non-empty list of pool indices")
        for i in arguments["sample"]:
            _non_negative_int("sample index", i, n, f"the campaign has {n} pool structures")
    if "species" in arguments:
        if not isinstance(arguments["species"], list) or not arguments["species"]:
            raise UntrustedMessage("species must be a non-empty list of atomic numbers")
        for z in arguments["species"]:
            _non_negative_int("atomic number", z, 119, "atomic numbers")
    for key in ("alpha", "ridge_alpha", "ridge_lambda"):  # the ridge regulariser, by any of its names
        if key in arguments:
            value = arguments[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise UntrustedMessage(f"{key} (the ridge regulariser) must be a finite number > 0, got {value!r}")


def check_engine_policy(root: Path) -> None:
    """Refuse (UntrustedMessage) a campaign whose [engine] settings name code this worker may not run."""
    from graceq.config import ConfigError, load_settings
    from graceq.engines import check_engine_settings

    try:
        settings = load_settings(root / "settings.toml")
    except ConfigError as exc:
        raise UntrustedMessage(str(exc)) from None
    try:
        check_engine_settings(settings.engine.model_dump())
    except CodeNotAllowed as exc:
        raise UntrustedMessage(f"{root / 'settings.toml'} [engine]: {exc}") from None
    except Exception:  # e.g. a calculator package missing here: the task reports it as a failed result
        pass
    check_files_read(root, settings)


def _package_data() -> Path:
    from importlib.resources import files

    return Path(str(files("graceq") / "data")).resolve()


def check_files_read(root: Path, settings, roots: list[Path] | None = None) -> None:
    """Refuse (UntrustedMessage) a campaign whose engine would read a file outside this worker's
    campaign roots (e.g. a replay ``source`` naming another user's data): a worker of a shared
    broker started with ``--campaign-root`` reads campaign data from those folders only (and
    graceq's own bundled data). No roots, or not such a worker: nothing is checked, the author's
    own processes read the author's own files."""
    from graceq.engines import engine_class

    roots = (campaign_roots() if _broker_worker() else []) if roots is None else roots
    if not roots:
        return
    engine = settings.engine.model_dump()
    try:
        cls = engine_class(engine.get("engine", "replay"), allow_code=False)
        meta = json.loads((root / "pool.json").read_text())
    except Exception:  # refused or unreadable elsewhere (check_engine_settings, pool_size)
        return
    for name in cls.files_read(engine, meta.get("source")):
        path = Path(name).expanduser().resolve()
        if not any(_inside(path, r) for r in [*roots, _package_data()]):
            raise UntrustedMessage(
                f"{root / 'settings.toml'} [engine]: the {cls.name or 'engine'} engine would read {path}, outside "
                f"this worker's campaign roots ({', '.join(map(str, roots))}); put the file inside a campaign "
                "root, or the worker's operator adds its folder with `graceq worker --campaign-root DIR`"
            )


def check_message(task: Task, args: tuple, kwargs: dict) -> None:
    """Every check a worker makes before a task body runs; raises UntrustedMessage (logged)."""
    import inspect

    key = signing_key()
    if key is not None:
        sent = getattr(task.request, SIGNATURE_HEADER, None)  # message headers become request attributes
        if not sent:
            raise UntrustedMessage("the message is not signed and this worker requires signatures "
                                   f"({ENV_SIGNING_KEY}); send it from a coordinator that has the key")
        expected = signature(key, task.name, task.request.id, args, kwargs)
        if not hmac.compare_digest(str(sent), expected):
            raise UntrustedMessage("the message signature does not match its task, id and arguments")
    try:
        bound = inspect.signature(task.run).bind(*args, **kwargs)
    except TypeError as exc:
        raise UntrustedMessage(f"arguments do not fit the task: {exc}") from None
    arguments = dict(bound.arguments)
    check_arguments(task.name, arguments)
    if task.name == "graceq.run_reference":
        check_engine_policy(Path(arguments["campaign_dir"]).resolve())


class CheckedTask(Task):
    """Celery's Task with graceq's message checks before the body runs (app.py: ``task_cls``).

    A refused message is logged with its reason and raises :class:`UntrustedMessage`: Celery marks
    it failed and acknowledges it, nothing was written, and the worker takes the next message.
    A direct call (Python code, not a message) is not checked.
    """

    def __call__(self, *args, **kwargs):
        if not self.request.called_directly:
            try:
                check_message(self, args, kwargs)
            except UntrustedMessage as exc:
                log.warning("refused task %s[%s] on %s: %s", self.name, self.request.id,
                            socket.gethostname(), exc)
                raise
        return super().__call__(*args, **kwargs)


# -- results checked before they count --------------------------------------------------------
def read_result(path: str | Path) -> tuple[dict | None, str | None]:
    """Return (record, None) for a readable result file, else (None, reason): empty, truncated, not an object."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if not raw.strip():
        return None, "empty file"
    try:
        record = json.loads(raw)
    except ValueError as exc:
        return None, f"not valid JSON (truncated or corrupt: {exc})"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    return record, None


def _finite_matrix(value, shape: tuple[int, int]) -> bool:
    try:
        import numpy as np

        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return False
    return array.shape == shape and bool(np.isfinite(array).all())


def check_result(record: Any, expected_name: str, expected_task_id: str | None,
                 numbers: Iterable[int] | None = None, expected_idx: int | None = None) -> str | None:
    """Return why a result record must not count, or None when it may be ingested.

    ``record`` is a parsed results/<idx>.json; ``expected_name`` the pool name of the structure the
    coordinator sent; ``expected_task_id`` the task id it sent (None for records the coordinator
    writes itself, e.g. a batch scheduler's poll); ``numbers`` the pool structure's atomic numbers
    (its composition; None skips the structure check); ``expected_idx`` its pool index.
    Checks: a JSON object; name and task id as sent; idx as sent; a known status; a finite energy
    (campaign unit, total per cell) for "converged" and none otherwise; a non-negative step count;
    and a returned structure with a finite 3x3 cell of non-zero volume (Å) and finite positions (Å)
    of the pool structure's composition.
    """
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    name = record.get("name")
    if name != expected_name:
        return f"structure name {name!r} is not the one sent ({expected_name!r})"
    if expected_task_id is not None and record.get("task_id") != expected_task_id:
        return f"task id {record.get('task_id')!r} is not the one sent ({expected_task_id!r})"
    if expected_idx is not None and "idx" in record and record["idx"] != expected_idx:
        return f"pool index {record['idx']!r} is not the one sent ({expected_idx})"
    status = record.get("status")
    if status not in KNOWN_STATUSES:
        return f"unknown status {status!r} (known: {', '.join(KNOWN_STATUSES)})"
    energy = record.get("energy")
    if status == "converged":
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not math.isfinite(energy):
            return f"status 'converged' needs a finite energy, got {energy!r}"
    elif energy is not None:
        return f"status {status!r} must carry no energy, got {energy!r}"
    steps = record.get("n_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return f"n_steps must be a non-negative integer, got {steps!r}"
    if not isinstance(record.get("message", ""), str):
        return "message must be text"
    atoms = record.get("atoms")
    if atoms is None:
        return None
    if not isinstance(atoms, dict):
        return f"atoms must be an object with numbers, positions, cell and pbc, got {type(atoms).__name__}"
    got = atoms.get("numbers")
    if not isinstance(got, list) or not got or any(isinstance(z, bool) or not isinstance(z, int) for z in got):
        return "atoms.numbers must be a non-empty list of atomic numbers"
    if numbers is not None:
        want = sorted(int(z) for z in numbers)
        if sorted(got) != want:
            return (f"returned structure has {len(got)} atoms of another composition than the pool "
                    f"structure's {len(want)}")
    if not _finite_matrix(atoms.get("positions"), (len(got), 3)):
        return f"atoms.positions must be {len(got)} finite 3-vectors (Å)"
    if not _finite_matrix(atoms.get("cell"), (3, 3)):
        return "atoms.cell must be a finite 3x3 matrix (Å)"
    import numpy as np

    if abs(float(np.linalg.det(np.asarray(atoms["cell"], dtype=float)))) < 1e-6:
        return "atoms.cell has zero volume"
    pbc = atoms.get("pbc", [True, True, True])
    if not (isinstance(pbc, list) and len(pbc) == 3 and all(isinstance(p, bool) for p in pbc)):
        return "atoms.pbc must be three booleans"
    return None


def reject(path: str | Path, reason: str) -> Path:
    """Move a result file to results/rejected/ with its reason beside it; returns the new path.

    The file leaves results/ at once (a re-sent job writes a fresh one there), keeps its content
    for a post-mortem, and ``<name>.reason.json`` says why, when and on which host.
    """
    path = Path(path)
    folder = path.parent / "rejected"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000_000:09d}"
    target = folder / f"{path.stem}.{stamp}{path.suffix}"
    os.replace(path, target)
    from graceq.store import atomic_write_json

    atomic_write_json(target.with_name(target.name + ".reason.json"),
                      {"file": str(path), "reason": reason, "rejected_at": time.time(),
                       "host": socket.gethostname()})
    log.warning("rejected result %s: %s (moved to %s)", path, reason, target)
    return target


def accept_result(path: str | Path, expected_name: str, expected_task_id: str | None,
                  numbers: Iterable[int] | None = None, expected_idx: int | None = None) -> dict | None:
    """The record of a result file when it may count; else None, the file moved to results/rejected/.

    One call for the coordinator's ingest: :func:`read_result`, then :func:`check_result`, then
    :func:`reject` with the reason (logged). None means the job has no result: send it again under
    the attempt rules.
    """
    record, reason = read_result(path)
    if reason is None:
        reason = check_result(record, expected_name, expected_task_id, numbers, expected_idx)
    if reason is not None:
        reject(path, reason)
        return None
    return record


def run_flower(argv: list[str], metrics_public: bool = False) -> None:
    """Run Celery's Flower on the graceq app, with /metrics behind Flower's own authentication.

    Flower 2.x serves /metrics to anyone (mher/flower#1342: its authentication was taken off on
    purpose); unless ``metrics_public``, its handler first asks Flower's ``current_user``, which
    answers 401 without the basic-auth credentials (or the OAuth cookie).
    """
    import sys

    if not metrics_public:
        import tornado.web
        from flower.views import monitor

        original = monitor.Metrics.get

        async def get(self):
            if not self.current_user:
                raise tornado.web.HTTPError(401)
            return await original(self)

        monitor.Metrics.get = get
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", "graceq.app", "flower", *argv]
    celery_main()
