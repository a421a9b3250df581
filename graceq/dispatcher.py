"""The task server: sends tasks, watches their output files, re-sends lost ones, yields results.

The coordinator decides *what* runs (Colmena's thinker); this module owns *how* (Colmena's task
server): task ids, the leases that workers hold while they work, delivery counting, the rule that
says a task is lost, re-sends, max attempts, engines that run jobs out of band (``submit`` then
``poll``), retries of a send while the broker is down, and the error files of failed tasks.

Every task writes one output file by atomic rename (``graceq.tasks``); the dispatcher waits for
files, never for the result backend. A task in flight is *lost* when the delivery we sent started
and then stopped beating its lease (its worker died, or was paused longer than the lease), or never
started within the queueing allowance (its message went with a broker restart, or sits unacked in
Redis until the visibility timeout). A lost task is sent again under the same task id; the first
holder of a fresh lease does the work, every other delivery returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from graceq.store import CampaignPaths, artifact_ok, atomic_write_bytes, atomic_write_json, error_file

log = logging.getLogger("graceq.dispatcher")

#: a file in a job's directory that says the engine's scheduler holds the job (submit returned
#: before the job ended): the dispatcher polls the engine for it and never re-sends it
SUBMITTED = "submitted.json"


class TaskError(RuntimeError):
    """A worker could not do a task; the message carries the worker's reason."""


#: s without any output landing before graceq asks the broker whether anyone consumes the queue
NO_WORKER_AFTER_S = 20.0


class LeaseLost(RuntimeError):
    """This worker's lease was taken over (it was paused or cut off for longer than the lease)."""


# -- leases ---------------------------------------------------------------------------------------
class Lease:
    """A task's claim by one worker: a file whose mtime a thread refreshes while the worker lives.

    A fresh lease held by someone else means the task runs elsewhere (a duplicate delivery must not
    run it again); a stale one means its worker died or stopped, and the task may be taken over,
    resuming from the engine's checkpoint. Each claim carries a token: only its holder may beat,
    release it or write the task's result, so that a worker paused past the lease (SIGSTOP, a
    frozen VM) and then resumed finds it has lost the task and does nothing more.
    """

    def __init__(self, path: Path, timeout_s: float):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def is_fresh(self) -> bool:
        """Held by a live worker: beaten within the timeout, and not by a dead process of this host."""
        try:
            if time.time() - self.path.stat().st_mtime >= self.timeout_s:
                return False
        except FileNotFoundError:
            return False
        holder = self._holder()
        if holder is None:
            return False
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:  # its worker process was killed: Celery re-delivers at once
                return False
            except (PermissionError, KeyError, ValueError):
                pass
        return True

    def holds(self) -> bool:
        """Whether this claim is still the lease's current holder."""
        holder = self._holder()
        return holder is not None and holder.get("token") == self.token

    def acquire(self) -> bool:
        """Claim the task; False when a live worker already holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        claim = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}")
        atomic_write_json(claim, {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                                  "token": self.token})
        try:
            os.link(claim, self.path)  # atomic, and fails if someone holds the lease
        except FileExistsError:
            if self.is_fresh():
                claim.unlink(missing_ok=True)
                return False
            os.replace(claim, self.path)  # take over a dead (or stopped) worker's task
        else:
            claim.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def seize(self) -> None:
        """Claim the task even from a live holder (a cancelled job): the holder's next beat raises
        LeaseLost, and it writes nothing more (``write_if_held``). Not beaten: released at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        claim = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}")
        atomic_write_json(claim, {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                                  "token": self.token})
        os.replace(claim, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout_s / 6)):
            try:
                self.beat()
            except LeaseLost:
                return

    def beat(self) -> None:
        """Refresh the lease now (engines call this between optimiser steps).

        Raises LeaseLost when another worker has taken the task over: the caller must stop and
        write nothing, since the new holder runs the task (in the same working directory).
        """
        if not self.holds():
            self._stop.set()
            raise LeaseLost(f"{self.path}: the task was taken over by another worker")
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def write_if_held(self, path: Path, value: Any) -> bool:
        """Write ``value`` as JSON to ``path`` (atomic rename) only while this claim holds the lease."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{self.token}.tmp")
        atomic_write_bytes(tmp, json.dumps(value, indent=1).encode())
        if not self.holds():
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, path)
        return True

    def release(self) -> None:
        """Stop beating; remove the lease file only if this claim still holds it."""
        self._stop.set()
        if self.holds():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lease_file(output: Path) -> Path:
    """The lease of the task that writes ``output`` (featurize and fit tasks)."""
    return output.with_name(f".{output.name}.lease")


def lease_files(root: Path):
    """Every lease file of the campaign in ``root``: reference jobs' (``jobs/<idx>/lease.json``) and
    those of the featurize and fit tasks (:func:`lease_file` of their outputs)."""
    root = Path(root)
    for pattern in ("jobs/*/lease.json", "artifacts/.*.lease", "artifacts/features/.*.lease", "iterations/*/.*.lease"):
        yield from root.glob(pattern)


def count_delivery(job_dir: Path) -> int:
    """One more delivery of a job that this worker now holds the lease of; returns the count."""
    counter = job_dir / "deliveries"
    try:
        count = int(counter.read_text()) + 1
    except (FileNotFoundError, ValueError):
        count = 1
    atomic_write_json(counter, count)
    return count


def job_is_lost(beat: float | None, sent_at: float, now: float, lease_timeout_s: float,
                resend_unstarted_after_s: float) -> bool:
    """Whether a task without its output must be sent again (times in s since the epoch).

    ``beat`` is its lease's last heartbeat (None: no lease). Lost: the delivery we sent started and
    then stopped beating (its worker died), or it never started within the allowed queueing time
    (its message may be gone with a broker restart).
    """
    died = beat is not None and beat >= sent_at and now - beat > lease_timeout_s
    unstarted = (beat is None or beat < sent_at) and now - sent_at > resend_unstarted_after_s
    return died or unstarted


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def reference_task_id(campaign_id: str, idx: int) -> str:
    """Deterministic task id (campaign, kind, structure): the same id for every re-send."""
    return f"graceq-{campaign_id}-dft-{idx:06d}"


# -- sending --------------------------------------------------------------------------------------
def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors of a broker or result backend that is down for a while (a restart, a network cut)."""
    from kombu.exceptions import OperationalError

    errors: list[type[BaseException]] = [OperationalError, ConnectionError, TimeoutError]
    try:
        import redis.exceptions

        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover - redis is a dependency of the scale-out mode only
        pass
    return tuple(errors)


def send_task(task, args: list, task_id: str, retry_for_s: float = 900.0,
              say: Callable[[str], None] = log.warning) -> None:
    """Publish one task; while the broker is unreachable, try again with backoff for retry_for_s s.

    Celery's own publish retry gives up after about a second; a Redis restart takes longer, and a
    coordinator that exits then leaves the campaign stalled until someone restarts it.
    """
    transient = _transient_errors()
    deadline = time.monotonic() + retry_for_s
    wait = 0.5
    while True:
        try:
            task.apply_async(args=args, task_id=task_id)
            return
        except transient as exc:
            if time.monotonic() + wait > deadline:
                raise TaskError(
                    f"cannot send task {task_id}: the broker has been unreachable for {retry_for_s:.0f} s "
                    f"({type(exc).__name__}: {exc}); check that Redis runs, then `graceq run` again"
                ) from None
            say(f"the broker is unreachable ({type(exc).__name__}: {exc}); sending {task_id} again in {wait:.1f} s")
            time.sleep(wait)
            wait = min(2 * wait, 30.0)


@dataclass
class TaskSpec:
    """One featurize or fit task: what to send, and the file that says it is done."""

    task: Any                 # a Celery task of graceq.tasks
    args: list
    task_id: str
    output: Path
    sent_at: float = 0.0
    losses: int = 0           # deliveries that started and then lost their worker


@dataclass
class TaskGroup:
    """Tasks sent together (the chunks of the pool, the members of a committee); done when all are."""

    desc: str
    specs: list[TaskSpec]
    done: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.specs)


class Doorbell:
    """Ends the dispatcher's wait for outputs early: rings when a task of the campaign changes state
    on a Redis result backend (a worker publishes a task's state there after the task returned, so
    after its output file was written).

    Only a hint: the outputs are still the files, and with no ring the dispatcher looks at them
    again after the poll interval, as it always did (no Redis result backend, the embedded
    broker, a dropped connection, a missed message). Each thread that waits (the coordinator's
    loop, its refit) says when it starts a look (:meth:`looking`): a ring from then on ends its
    next wait, so that a result published during the look is not slept through.
    """

    def __init__(self, campaign_id: str):
        self._rings = 0
        self._rang = threading.Condition()
        self._looked = threading.local()
        self._stop = threading.Event()
        from graceq.app import app

        backend = app.backend
        client = getattr(backend, "client", None)
        if not (hasattr(client, "pubsub") and hasattr(backend, "get_key_for_task")):
            return  # not a Redis result backend: the waits are the poll interval
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.psubscribe(backend.get_key_for_task(f"graceq-{campaign_id}-") + b"*")
        except Exception as exc:  # the broker's reachability is the send path's business
            log.info("no doorbell on the result backend (%s); looking every poll interval", exc)
            return
        threading.Thread(target=self._listen, args=(pubsub,), daemon=True, name="graceq-doorbell").start()

    def _listen(self, pubsub) -> None:
        try:
            while not self._stop.is_set():
                try:
                    message = pubsub.get_message(timeout=0.5)
                except Exception as exc:  # redis-py reconnects (and subscribes again) on the next call
                    log.info("doorbell: %s", exc)
                    self._stop.wait(1.0)
                    continue
                if message is not None:
                    with self._rang:
                        self._rings += 1
                        self._rang.notify_all()
        finally:
            pubsub.close()

    def looking(self) -> None:
        """This thread starts a look at the outputs."""
        self._looked.rings = self._rings

    def wait(self, timeout_s: float) -> None:
        """Return after a ring since this thread's last look, or after timeout_s."""
        seen = getattr(self._looked, "rings", self._rings)
        with self._rang:
            self._rang.wait_for(lambda: self._rings != seen, timeout_s)

    def close(self) -> None:
        self._stop.set()


# -- the dispatcher -------------------------------------------------------------------------------
class Dispatcher:
    """Sends a campaign's tasks and collects their outputs; re-sends what was lost.

    Parameters
    ----------
    paths : the campaign's directory layout.
    store : the campaign's store (jobs table: when each reference job was sent, how often).
    settings : the campaign's settings (``runtime`` for leases and re-sends, ``engine`` for
        polling jobs that an engine runs out of band).
    names : pool structure names, by pool index.
    check_workers : called while waiting; raises when the embedded workers died.
    say : where messages for the user go.
    """

    def __init__(self, paths: CampaignPaths, store, settings, campaign_id: str, names,
                 check_workers: Callable[[], None] | None = None, say: Callable[[str], None] = log.info):
        self.paths = paths
        self.store = store
        self.settings = settings
        self.campaign_id = campaign_id
        self.names = names
        self.check_workers = check_workers
        self.say = say
        self.in_flight: set[int] = set()   # reference jobs sent and without a collected result
        self._engine = None
        self._quiet_since: float | None = None   # s since the epoch: nothing landed from then on
        self._probed_at = 0.0
        self._bell: Doorbell | None = None  # started by the first wait
        self._bell_lock = threading.Lock()

    # -- settings read defensively: new keys that config.py may not declare yet --
    @property
    def _rt(self):
        return self.settings.runtime

    @property
    def retry_for_s(self) -> float:
        return float(self._rt.send_retry_for)

    def _send(self, task, args: list, task_id: str, output: Path | None = None) -> None:
        if output is not None:  # an earlier failure's reason must not stop the new attempt
            error_file(output).unlink(missing_ok=True)
        send_task(task, args, task_id, self.retry_for_s, self.say)

    def idle(self, queues=()) -> None:
        """Wait a poll interval, or less when the result backend rings (:class:`Doorbell`); check
        that the embedded workers live, or, on a broker, that someone consumes the ``queues`` the
        campaign waits on."""
        if self.check_workers is not None:
            self.check_workers()
        else:
            self._hint_unconsumed(queues)
        with self._bell_lock:
            if self._bell is None:
                self._bell = Doorbell(self.campaign_id)
        self._bell.wait(self.settings.runtime.poll_interval)

    def _looking(self) -> None:
        if self._bell is not None:
            self._bell.looking()

    def close(self) -> None:
        """Stop listening for the result backend's rings."""
        if self._bell is not None:
            self._bell.close()

    def progressed(self) -> None:
        """Something landed: the campaign is not stalled."""
        self._quiet_since = None

    def _hint_unconsumed(self, queues) -> None:
        """After ``NO_WORKER_AFTER_S`` without progress, ask the broker who consumes the queues
        waited on (Celery's inspect/active_queues, every ``NO_WORKER_AFTER_S``); say which has no
        worker and the command that starts one. The campaign keeps waiting."""
        now = time.time()
        if self._quiet_since is None:
            self._quiet_since = now
        if not queues or now - self._quiet_since < NO_WORKER_AFTER_S or now - self._probed_at < NO_WORKER_AFTER_S:
            return
        self._probed_at = now
        from graceq.app import app
        from graceq.health import no_consumer_message, queue_consumers

        for queue in sorted(set(queues)):
            try:
                consumers = queue_consumers(app, queue)
            except Exception as exc:  # a broker that does not answer: the send path reports it
                log.info("could not ask who consumes %s: %s", queue, exc)
                return
            if not consumers:
                self.say(no_consumer_message(queue, app.conf.broker_url, now - self._quiet_since))

    # -- featurize and fit tasks ----------------------------------------------------------------
    def start(self, specs: list[TaskSpec], desc: str) -> TaskGroup:
        """Send every task whose output is missing; returns the group to watch."""
        group = TaskGroup(desc, specs)
        for spec in specs:
            if artifact_ok(spec.output):  # a corrupt one is moved aside (named in the log) and redone
                group.done.add(spec.task_id)
            else:
                self._resend(spec)
        return group

    def _resend(self, spec: TaskSpec) -> None:
        spec.sent_at = time.time()
        self._send(spec.task, spec.args, spec.task_id, spec.output)

    def check(self, group: TaskGroup) -> bool:
        """Note the outputs that landed, re-send lost tasks; True when the group is complete.

        A worker's error file stops the campaign with the worker's reason; a task lost more than
        ``max_attempts`` times does too (it keeps killing its worker: out of memory, most likely).
        """
        self._looking()
        rt = self._rt
        now = time.time()
        waiting = []
        died = False
        for spec in group.specs:
            if spec.task_id in group.done:
                continue
            if spec.output.exists():
                group.done.add(spec.task_id)
                continue
            error = error_file(spec.output)
            if error.exists():
                try:
                    reason = json.loads(error.read_text())["error"]
                except (ValueError, KeyError, FileNotFoundError):
                    reason = f"see {error}"
                raise TaskError(f"{group.desc} failed on a worker: {reason} (task {spec.task_id}, {error})")
            beat = _mtime(lease_file(spec.output))
            if beat is None or beat < spec.sent_at:
                waiting.append(spec)
            if job_is_lost(beat, spec.sent_at, now, rt.lease_timeout, rt.resend_unstarted_after):
                if beat is not None and beat >= spec.sent_at:
                    spec.losses += 1
                    died = True
                if spec.losses >= rt.max_attempts:
                    raise TaskError(
                        f"{group.desc}: task {spec.task_id} lost its worker {spec.losses} times "
                        f"(it writes {spec.output}); see the workers' logs (out of memory?), then `graceq run` again"
                    )
                self.say(f"{group.desc}: task {spec.task_id} lost its worker; sending it again")
                self._resend(spec)
        if died:  # the dead worker may have taken other tasks from the queue without starting them
            for spec in waiting:
                if spec.sent_at < now:
                    self._resend(spec)
        return group.complete

    def wait(self, group: TaskGroup, bar=None) -> None:
        """Block until every task of the group has written its output."""
        from graceq.app import app

        queues = {app.conf.task_routes.get(spec.task.name, {}).get("queue", "dft") for spec in group.specs}
        seen = len(group.done)
        self.progressed()
        while not self.check(group):
            if len(group.done) > seen:
                self.progressed()
            if bar is not None:
                bar.update(len(group.done) - seen)
            seen = len(group.done)
            self.idle(queues)
        if bar is not None:
            bar.update(len(group.done) - seen)

    def run(self, specs: list[TaskSpec], desc: str, bar=None) -> None:
        """Send the tasks and wait for all their outputs."""
        self.wait(self.start(specs, desc), bar)

    # -- reference jobs -------------------------------------------------------------------------
    @property
    def engine(self):
        """The campaign's engine, built on first use (only to poll jobs it runs out of band)."""
        if self._engine is None:
            from graceq.engines import make_engine

            meta = json.loads(self.paths.pool_meta.read_text())
            self._engine = make_engine(self.settings.engine.model_dump(), self.settings.campaign.unit,
                                       meta.get("source"))
        return self._engine

    def send(self, idx: int, count: bool = True) -> None:
        """Send reference job idx; ``count`` is False for a resumed campaign's re-send (no new attempt)."""
        from graceq import tasks

        task_id = reference_task_id(self.campaign_id, idx)
        self.store.record_sent(idx, task_id, count=count)
        self.in_flight.add(int(idx))
        self._send(tasks.run_reference, [str(self.paths.root), int(idx), str(self.names[idx])], task_id)

    def track(self, indices) -> None:
        """Take over jobs sent by an earlier coordinator: re-send those that may have been lost.

        A job with a result file, one its engine's scheduler holds, or one a live worker holds is
        only watched; every other one is sent again (a duplicate is harmless: the worker sees the
        result or the live lease and returns; a lost message is not).
        """
        jobs = self.store.jobs()
        for i in indices:
            i = int(i)
            self.in_flight.add(i)
            job_dir = self.paths.job_dir(i)
            if self.paths.result(i).exists() or (job_dir / SUBMITTED).exists():
                continue
            if i in jobs and Lease(job_dir / "lease.json", self._rt.lease_timeout).is_fresh():
                continue
            self.send(i, count=i not in jobs)

    def arrivals(self) -> list[tuple[int, dict]]:
        """The results that landed since the last look, in pool-index order; re-sends lost jobs.

        Jobs that an engine runs out of band are polled through the engine, and their results
        written here. A job lost ``max_attempts`` times gets a failed result.
        """
        self._looking()
        landed = []
        missing = []
        rejected = []
        jobs = None  # read once per look, and only when a result landed
        for i in sorted(self.in_flight):
            path = self.paths.result(i)
            if path.exists():
                jobs = self.store.jobs() if jobs is None else jobs
                record = self._checked(i, path, jobs.get(i, (None,))[0])
                if record is None:
                    rejected.append(i)
                else:
                    landed.append((i, record))
            else:
                missing.append(i)
        self._resend_rejected(rejected)
        submitted = [i for i in missing if (self.paths.job_dir(i) / SUBMITTED).exists()]
        if submitted:
            answers = self.engine.poll([self.paths.job_dir(i) for i in submitted])
            for i in submitted:
                result = answers[self.paths.job_dir(i)]
                if result is not None:
                    landed.append((i, self._write_polled(i, result)))
        self._resend_lost([i for i in missing if i not in set(submitted)])
        for i, _ in landed:
            self.in_flight.discard(i)
        return sorted(landed, key=lambda item: item[0])

    def cancel(self, reason: str) -> list[int]:
        """Cancel the reference jobs in flight: each gets a failed result (``reason``), recorded
        when it lands like any other; returns the jobs cancelled.

        The dispatcher seizes the job's lease before it writes the result, so that the worker running
        it stops at its next heartbeat and writes nothing (a result it wrote first is kept: it lands
        as it is); a delivery still queued finds the result and returns. The task is also revoked
        (terminated where it runs), when the broker can say so to the workers. A job that an engine's
        scheduler holds (``submitted.json``) is left to finish: the engine interface has no cancel.
        """
        from graceq.engines import ReferenceResult

        jobs = self.store.jobs()
        cancelled = []
        for i in sorted(self.in_flight):
            job_dir = self.paths.job_dir(i)
            result = self.paths.result(i)
            if result.exists() or (job_dir / SUBMITTED).exists():
                continue
            task_id = jobs[i][0]
            lease = Lease(job_dir / "lease.json", self._rt.lease_timeout)
            lease.seize()
            try:
                record = dict(ReferenceResult.failed(str(self.names[i]), reason).to_json(), idx=int(i), task_id=task_id)
                tmp = result.with_name(f".{result.name}.cancel.tmp")
                atomic_write_json(tmp, record)
                try:
                    os.link(tmp, result)  # never over a result the worker wrote first
                except FileExistsError:
                    pass
                else:
                    cancelled.append(i)
                finally:
                    tmp.unlink(missing_ok=True)
            finally:
                lease.release()
            self._revoke(task_id)
        return cancelled

    def _revoke(self, task_id: str) -> None:
        """Ask the workers to drop (or terminate) a task; best effort: the lease already stops it."""
        from graceq.app import app

        try:
            app.control.revoke(task_id, terminate=True, signal="SIGTERM")
        except Exception as exc:  # a broker without broadcast (the embedded folder broker)
            log.info("could not revoke %s: %s", task_id, exc)

    def _checked(self, idx: int, path: Path, task_id: str | None) -> dict | None:
        """The result record of job idx when it may count (graceq.trust: readable, the name and task
        id that were sent, a known status, a finite energy, the pool's composition); else None, the
        file moved to results/rejected/ with the reason."""
        from graceq import trust
        from graceq.pooldb import read_frames_db

        numbers = read_frames_db(self.paths.structures, [idx])[0].numbers
        return trust.accept_result(path, str(self.names[idx]), task_id, numbers, expected_idx=idx)

    def _resend_rejected(self, rejected: list[int]) -> None:
        """A rejected result counts as a lost job: sent again under the attempt rules."""
        from graceq.engines import ReferenceResult

        jobs = self.store.jobs()
        for i in rejected:
            task_id, _, attempts = jobs[i]
            if attempts >= self._rt.max_attempts:
                failed = ReferenceResult.failed(str(self.names[i]), f"{attempts} results rejected (results/rejected/)")
                atomic_write_json(self.paths.result(i), dict(failed.to_json(), idx=int(i), task_id=task_id))
            else:
                self.say(f"the result of {self.names[i]} was rejected (results/rejected/); sending the job again")
                self.send(i)

    def _write_polled(self, idx: int, result) -> dict:
        """The result file of a job that ended out of band: the job's own record (compute host, job
        id) under the engine's verdict."""
        from graceq.engines.base import JOB_RESULT

        try:
            record = json.loads((self.paths.job_dir(idx) / JOB_RESULT).read_text())
        except (FileNotFoundError, ValueError):
            record = {}
        record.update(result.to_json(), idx=int(idx), task_id=self.store.jobs()[idx][0])
        atomic_write_json(self.paths.result(idx), record)
        return record

    def _resend_lost(self, missing: list[int]) -> None:
        from graceq.engines import ReferenceResult

        if not missing:
            return
        rt = self._rt
        jobs = self.store.jobs()
        now = time.time()
        waiting = []
        died = False
        for i in missing:
            _, sent_at, attempts = jobs[i]
            beat = _mtime(self.paths.job_dir(i) / "lease.json")
            if beat is None or beat < sent_at:
                waiting.append(i)
            if not job_is_lost(beat, sent_at, now, rt.lease_timeout, rt.resend_unstarted_after):
                continue
            died = died or (beat is not None and beat >= sent_at)
            if attempts >= rt.max_attempts:  # a job that kills its worker must not loop for ever
                lost = ReferenceResult.failed(str(self.names[i]), f"lost its worker {attempts} times")
                atomic_write_json(self.paths.result(i), dict(lost.to_json(), idx=int(i), task_id=jobs[i][0]))
            else:
                self.say(f"job {self.names[i]} lost its worker; sending it again")
                self.send(i)
        if died:  # the dead worker may have taken queued jobs without starting them: not an attempt
            for i in waiting:
                if jobs[i][1] < now and not self.paths.result(i).exists():
                    self.send(i, count=False)

    def results(self, bar=None) -> Iterator[tuple[int, dict]]:
        """Every result of the jobs in flight as it lands; ends when none is in flight."""
        self.progressed()
        while self.in_flight:
            landed = self.arrivals()
            yield from landed
            if landed:
                self.progressed()
            if bar is not None and landed:
                bar.update(len(landed))
            if self.in_flight and not landed:
                self.idle(("dft",))
