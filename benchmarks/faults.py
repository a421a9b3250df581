"""Fault injection on real processes: does a campaign survive each fault, and at what cost?

    python benchmarks/faults.py --json [--short] [--scenarios NAME ...] [--runs 10] [--redis-down-s 60]

A small campaign (every 8th structure of the bundled ROY-264, 32 members, batches of 4, a budget of
16 reference calls: initial batch + 2 iterations) runs with the real coordinator (`graceq run`),
real Celery workers (embedded, or `graceq worker` processes on a private Redis) and the replay
engine wrapped by ``benchmarks/fault_engine.py`` (which logs every completed reference run and can
hold a poison structure). The coordinator runs under a supervisor that restarts it 1 s after a
non-zero exit, as systemd's ``Restart=on-failure`` does; a campaign not finished within
``--timeout`` counts as stalled.

Per scenario: ``runs``; ``lost`` (reference results of the undisturbed campaign missing or
different at the end); ``duplicated`` (reference jobs whose result the engine kept more than
once: run to completion twice); ``reruns`` (engine runs beyond the first, including a re-run of a
job whose first result could not be written, e.g. on a full disk, which is its recovery);
``same_picks`` (every pick, in order, equal to the undisturbed campaign's); ``recover_s`` (wall
time of the disturbed campaign minus the undisturbed one's, averaged over runs: what the fault
cost); ``stalled`` (runs that did not finish) and ``restarts`` (coordinator restarts).

Runtime settings chosen so that recoveries show within minutes: lease_timeout 3 s,
resend_unstarted_after 20 s, replay answers taking 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUDGET = 16
SCENARIOS = [
    "coordinator_sigkill", "copy_without_wal", "worker_sigkill_featurize", "worker_sigkill_fit",
    "worker_sigkill_reference", "all_workers_sigkill_during_fit", "disk_full", "sigstop_past_lease",
    "redis_restart_aof", "redis_down", "truncated_result", "poison_job", "two_coordinators", "worker_sigkill_idle",
]
SHORT = ["coordinator_sigkill", "copy_without_wal"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graceq_cmd() -> list[str]:
    return [sys.executable, "-m", "graceq.cli"]


def environment() -> dict:
    path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("GRACEQ_BROKER_URL", None)
    return env


def write_pool(folder: Path) -> Path:
    from ase.io import read, write

    from graceq.data import __file__ as _  # noqa: F401  (the bundled data ships with the package)

    source = REPO / "graceq" / "data" / "roy264" / "roy264.extxyz"
    target = folder / "roy33.extxyz"
    write(target, read(source, ":")[::8], format="extxyz")
    return target


def settings_toml(pool: Path, engine: dict | None = None) -> str:
    import tomli_w

    return tomli_w.dumps({
        "campaign": {"pool": str(pool), "unit": "kJ/mol", "window": 5.0, "n_init": 8, "n_batch": 4, "seed": 3,
                     "budget": BUDGET},
        "descriptor": {"chunk_size": 4, "fit_sample": 33},
        "model": {"n_members": 32, "members_per_task": 8},
        "engine": dict({"engine": "fault_engine:CountingReplay", "delay_s": 0.5}, **(engine or {})),
        "runtime": {"workers": 2, "lease_timeout": 3.0, "resend_unstarted_after": 20.0, "max_attempts": 3,
                    "poll_interval": 0.2},
    })


# -- reading a campaign ---------------------------------------------------------------------------
def picks_of(campaign: Path) -> list:
    with sqlite3.connect(f"{(campaign / 'state.sqlite').as_uri()}?mode=ro", uri=True) as db:
        return db.execute("SELECT idx, iteration FROM picks ORDER BY iteration, rank").fetchall()


def results_of(campaign: Path) -> dict:
    with sqlite3.connect(f"{(campaign / 'state.sqlite').as_uri()}?mode=ro", uri=True) as db:
        return {r[0]: (r[1], None if r[2] is None else round(r[2], 6))
                for r in db.execute("SELECT idx, status, energy_ref FROM results")}


def duplicated_runs(campaign: Path, log_name: str = "kept.log") -> int:
    """Jobs whose result the engine kept more than once (kept.log), or, with ``runs.log``, runs
    beyond the first (re-runs of a job whose first result could not be written count here too)."""
    return sum(max(0, len(log.read_text().splitlines()) - 1) for log in campaign.glob(f"jobs/*/{log_name}"))


def lost_results(campaign: Path, reference: dict) -> int:
    try:
        got = results_of(campaign)
    except sqlite3.Error:
        return len(reference)
    return sum(1 for idx, value in reference.items() if got.get(idx) != value)


# -- processes ------------------------------------------------------------------------------------
class Redis:
    """A private redis-server with AOF in a folder of its own, on a free loopback port."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis flushes its AOF and exits
            self.proc.wait(timeout=30)


class Workers:
    """`graceq worker` processes (each a Celery main process and its pool), one session each."""

    def __init__(self, broker: str, folder: Path, n: int = 2):
        self.broker, self.folder, self.n = broker, folder, n
        self.procs: list[subprocess.Popen] = []
        self.start()

    def start(self) -> None:
        for k in range(self.n):
            log = open(self.folder / f"worker{k}.log", "ab")
            self.procs.append(subprocess.Popen(
                # --allow-code: the campaigns name benchmarks/fault_engine.py, which a worker refuses
                # otherwise since issue 10 (the embedded workers of `graceq run` allow it)
                graceq_cmd() + ["worker", "--broker", self.broker, "--concurrency", "1", "--name",
                                f"fault{k}-{len(self.procs)}@%h", "--loglevel", "WARNING", "--allow-code",
                                "--campaign-root", str(self.folder.parent)],
                env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = [p for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []


def pool_children(coordinator_pid: int) -> list[int]:
    """PIDs of the Celery pool processes under a coordinator (its embedded worker's children)."""
    import psutil

    try:
        parent = psutil.Process(coordinator_pid)
        return [c.pid for w in parent.children() for c in w.children()]
    except psutil.Error:
        return []


def lease_holder(campaign: Path) -> int | None:
    for lease in sorted(campaign.glob("jobs/*/lease.json")):
        try:
            return int(json.loads(lease.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def wait_for(condition, timeout: float, every: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


class Run:
    """One supervised campaign: the coordinator restarted 1 s after a failure, until it exits 0."""

    def __init__(self, campaign: Path, broker: str | None, timeout: float):
        self.campaign, self.broker, self.timeout = campaign, broker, timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.stalled = False
        self.paused = threading.Event()    # set: the supervisor waits before a restart (a fault works)
        self.given_up = threading.Event()  # set: no restart at all
        self.wall_s = 0.0

    def command(self) -> list[str]:
        cmd = graceq_cmd() + ["run", str(self.campaign), "--quiet"]
        return cmd + (["--broker", self.broker] if self.broker else [])

    def start(self) -> subprocess.Popen:
        log = open(self.campaign.parent / f"{self.campaign.name}.coordinator.log", "ab")
        self.proc = subprocess.Popen(self.command(), env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self.proc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def supervise(self, fault=None) -> "Run":
        """Run the coordinator to the campaign's end, restarting it 1 s after each exit that is not
        the end; ``fault(run)`` runs in a thread. ``paused`` holds restarts, ``given_up`` ends."""
        t0 = time.time()
        deadline = t0 + self.timeout
        self.start()
        if fault is not None:
            threading.Thread(target=fault, args=(self,), daemon=True).start()
        while True:
            try:
                code = self.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
                self.stalled = True
                break
            while self.paused.is_set() and time.time() < deadline:
                time.sleep(0.05)
            if self.given_up.is_set() or (code == 0 and self._finished()):
                break
            if time.time() > deadline:
                self.stalled = True
                break
            self.restarts += 1
            time.sleep(1.0)
            self.start()
        self.wall_s = time.time() - t0
        return self

    def _finished(self) -> bool:
        try:
            with sqlite3.connect(f"{(self.campaign / 'state.sqlite').as_uri()}?mode=ro", uri=True) as db:
                row = db.execute("SELECT stats FROM iterations ORDER BY iteration DESC LIMIT 1").fetchone()
            return row is not None and json.loads(row[0]).get("stop") is not None
        except sqlite3.Error:
            return False


# -- the benchmark --------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.workdir or tempfile.mkdtemp(prefix="graceq-faults-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.pool = write_pool(self.root)
        self.settings = self.root / "settings.toml"
        self.settings.write_text(settings_toml(self.pool))
        self.fresh = self.root / "template-fresh"       # after `init`
        subprocess.run(graceq_cmd() + ["init", str(self.fresh), "--settings", str(self.settings)],
                       env=environment(), check=True, capture_output=True)
        ref = self.copy(self.fresh, "reference-full")
        self.ref_full = Run(ref, None, args.timeout).supervise()
        self.featurized = self.root / "template-featurized"  # with the reference's features
        shutil.copytree(self.fresh, self.featurized)
        shutil.copytree(ref / "artifacts", self.featurized / "artifacts")
        self.ref_picks, self.ref_results = picks_of(ref), results_of(ref)
        if args.short:  # scenarios start from `init`, like the full reference
            self.featurized, self.ref_s = self.fresh, self.ref_full.wall_s
        else:
            again = Run(self.copy(self.featurized, "reference"), None, args.timeout).supervise()
            self.ref_s = again.wall_s
            assert picks_of(again.campaign) == self.ref_picks, "two undisturbed runs disagree"
        self.counter = 0

    def copy(self, template: Path, name: str) -> Path:
        self.counter = getattr(self, "counter", 0) + 1
        target = self.root / f"{name}-{self.counter:03d}"
        shutil.copytree(template, target)
        return target

    def score(self, name: str, runs: list[tuple[Run, Path]], reference_s: float, picks=None, results=None,
              note: str = "") -> dict:
        picks = self.ref_picks if picks is None else picks
        results = self.ref_results if results is None else results
        row = {
            "scenario": name, "runs": len(runs),
            "lost": sum(lost_results(c, results) for _, c in runs),
            "duplicated": sum(duplicated_runs(c) for _, c in runs),
            "reruns": sum(duplicated_runs(c, "runs.log") for _, c in runs),
            "same_picks": all(_safe_picks(c) == picks for _, c in runs),
            "recover_s": round(sum(r.wall_s for r, _ in runs) / len(runs) - reference_s, 1),
            "stalled": sum(r.stalled for r, _ in runs),
            "restarts": sum(r.restarts for r, _ in runs),
        }
        if note:
            row["note"] = note
        return row


def _safe_picks(campaign: Path):
    try:
        return picks_of(campaign)
    except sqlite3.Error:
        return None


# -- scenarios ------------------------------------------------------------------------------------
def coordinator_sigkill(bench: Bench) -> dict:
    rng = random.Random(12)
    runs = []
    for _ in range(bench.args.runs):
        at = rng.uniform(0.5, max(1.0, bench.ref_s - 2.0))

        def fault(run, at=at):
            time.sleep(at)
            run.kill()

        campaign = bench.copy(bench.featurized, "coordinator-sigkill")
        runs.append((Run(campaign, None, bench.args.timeout).supervise(fault), campaign))
    return bench.score("coordinator_sigkill", runs, bench.ref_s, note="SIGKILL at uniform random moments")


def copy_without_wal(bench: Bench) -> dict:
    campaign = bench.copy(bench.featurized, "copy-without-wal")
    run = Run(campaign, None, bench.args.timeout)

    def fault(run):
        wait_for(lambda: len(_safe_picks(campaign) or []) > 8, bench.args.timeout)  # iteration 0 committed
        run.given_up.set()
        run.kill()

    run.supervise(fault)
    backup = bench.root / f"backup-{bench.counter:03d}"
    shutil.copytree(campaign, backup, ignore=shutil.ignore_patterns("state.sqlite-wal", "state.sqlite-shm"))
    resumed = Run(backup, None, bench.args.timeout).supervise()
    resumed.wall_s += run.wall_s
    return bench.score("copy_without_wal", [(resumed, backup)], bench.ref_s)


def _embedded_pool_kill(bench: Bench, name: str, ready, template: Path, reference_s: float) -> dict:
    campaign = bench.copy(template, name.replace("_", "-"))

    def fault(run):
        if wait_for(lambda: ready(campaign), bench.args.timeout):
            for pid in pool_children(run.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break  # one pool process

    run = Run(campaign, None, bench.args.timeout).supervise(fault)
    return bench.score(name, [(run, campaign)], reference_s)


def task_lease_holder(campaign: Path, pattern: str) -> int | None:
    """PID of the pool process that holds the lease of a featurize or fit task (``pattern`` globs
    the lease files, ``.<output>.lease``): the process that is running that task now."""
    for lease in sorted(campaign.glob(pattern)):
        try:
            return int(json.loads(lease.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def _pool_kill_mid_task(bench: Bench, name: str, pattern: str, template: Path, reference_s: float) -> dict:
    """SIGKILL of the pool process that runs a task whose lease matches ``pattern``.

    (Until 2026-12-01 this killed the first pool process of the embedded worker, busy or idle: an
    idle one is not "mid-fit", and billiard then jams the whole embedded worker, see
    ``worker_sigkill_idle``.)"""
    campaign = bench.copy(template, name.replace("_", "-"))

    def fault(run):
        if wait_for(lambda: task_lease_holder(campaign, pattern) is not None, bench.args.timeout, 0.01):
            try:
                os.kill(task_lease_holder(campaign, pattern), signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass

    run = Run(campaign, None, bench.args.timeout).supervise(fault)
    return bench.score(name, [(run, campaign)], reference_s)


def worker_sigkill_featurize(bench: Bench) -> dict:
    return _pool_kill_mid_task(bench, "worker_sigkill_featurize", "artifacts/features/.chunk_*.lease", bench.fresh,
                               bench.ref_full.wall_s)


def worker_sigkill_fit(bench: Bench) -> dict:
    return _pool_kill_mid_task(bench, "worker_sigkill_fit", "iterations/*/.members_*.lease", bench.featurized,
                               bench.ref_s)


def worker_sigkill_idle(bench: Bench) -> dict:
    """SIGKILL of the embedded worker's first pool process once the committee fit is sent, busy or
    idle. An idle billiard pool process blocks in its job pipe's read while holding that pipe's
    process-shared lock; killed there, it leaves the lock taken, and the process that replaces it
    (which inherits the pipe) waits for the lock for ever."""
    def ready(c):
        return any(not list(p.parent.glob("members_*.npz")) for p in c.glob("iterations/*/lambda.json"))
    return _embedded_pool_kill(bench, "worker_sigkill_idle", ready, bench.featurized, bench.ref_s)


def worker_sigkill_reference(bench: Bench) -> dict:
    campaign = bench.copy(bench.featurized, "worker-sigkill-reference")

    def fault(run):
        if wait_for(lambda: lease_holder(campaign) is not None, bench.args.timeout):
            try:
                os.kill(lease_holder(campaign), signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass

    run = Run(campaign, None, bench.args.timeout).supervise(fault)
    return bench.score("worker_sigkill_reference", [(run, campaign)], bench.ref_s)


def sigstop_past_lease(bench: Bench) -> dict:
    campaign = bench.copy(bench.featurized, "sigstop")

    def fault(run):
        if wait_for(lambda: lease_holder(campaign) is not None, bench.args.timeout):
            pid = lease_holder(campaign)
            try:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(3.0 * 3 + 20.0 + 2.0)  # past the lease and the re-send
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, TypeError):
                pass

    run = Run(campaign, None, bench.args.timeout).supervise(fault)
    return bench.score("sigstop_past_lease", [(run, campaign)], bench.ref_s)


def _with_redis(bench: Bench, name: str, fault_of) -> dict:
    folder = bench.root / f"{name}-redis"
    redis = Redis(folder / "redis")
    workers = Workers(redis.url, folder)
    try:
        campaign = bench.copy(bench.featurized, name.replace("_", "-"))
        run = Run(campaign, redis.url, bench.args.timeout).supervise(fault_of(campaign, redis, workers))
        return bench.score(name, [(run, campaign)], bench.ref_s,
                           note="separate `graceq worker` processes on a private Redis")
    finally:
        workers.stop()
        redis.stop()


def all_workers_sigkill_during_fit(bench: Bench) -> dict:
    def fault_of(campaign, redis, workers):
        def fault(run):
            if wait_for(lambda: any(campaign.glob("iterations/*/train.npz")), bench.args.timeout):
                workers.kill()
                workers.start()  # restarted at once
        return fault
    return _with_redis(bench, "all_workers_sigkill_during_fit", fault_of)


def redis_restart_aof(bench: Bench) -> dict:
    def fault_of(campaign, redis, workers):
        def fault(run):
            if wait_for(lambda: lease_holder(campaign) is not None, bench.args.timeout):
                redis.stop()
                redis.start()
        return fault
    return _with_redis(bench, "redis_restart_aof", fault_of)


def redis_down(bench: Bench) -> dict:
    def fault_of(campaign, redis, workers):
        def fault(run):
            if wait_for(lambda: lease_holder(campaign) is not None, bench.args.timeout):
                redis.stop()
                time.sleep(bench.args.redis_down_s)
                redis.start()
        return fault
    row = _with_redis(bench, "redis_down", fault_of)
    row["note"] = f"Redis stopped for {bench.args.redis_down_s:g} s mid-batch"
    return row


def truncated_result(bench: Bench) -> dict:
    campaign = bench.copy(bench.featurized, "truncated-result")

    def fault(run):
        # the coordinator killed while results land; one not yet ingested is truncated on disk
        if not wait_for(lambda: len(list(campaign.glob("results/*.json"))) >= 2, bench.args.timeout, 0.01):
            return
        run.paused.set()
        run.kill()
        run.proc.wait()
        done = results_of(campaign)
        for path in sorted(campaign.glob("results/*.json")):
            if int(path.stem) not in done:
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                break
        run.paused.clear()

    run = Run(campaign, None, bench.args.timeout).supervise(fault)
    return bench.score("truncated_result", [(run, campaign)], bench.ref_s)


def poison_job(bench: Bench) -> dict:
    victim_idx = next(idx for idx, it in bench.ref_picks if it == 1)
    with sqlite3.connect(f"{(bench.fresh / 'state.sqlite').as_uri()}?mode=ro", uri=True) as db:
        victim = db.execute("SELECT name FROM structures WHERE idx = ?", (victim_idx,)).fetchone()[0]
    results = {}
    for mode in ("fail", "kill"):
        template = bench.root / f"template-poison-{mode}"
        shutil.copytree(bench.featurized, template)
        text = (template / "settings.toml").read_text().replace(
            'engine = "fault_engine:CountingReplay"',
            f'engine = "fault_engine:CountingReplay"\npoison = "{victim}"\npoison_mode = "{mode}"')
        (template / "settings.toml").write_text(text)
        campaign = bench.copy(template, f"poison-{mode}")
        results[mode] = (Run(campaign, None, bench.args.timeout).supervise(), campaign)
    baseline = results["fail"][1]
    return bench.score("poison_job", [results["kill"]], results["fail"][0].wall_s, picks=picks_of(baseline),
                       results=results_of(baseline),
                       note=f"{victim} kills its worker every time; compared with a run where it fails")


def two_coordinators(bench: Bench) -> dict:
    campaign = bench.copy(bench.featurized, "two-coordinators")
    runs = [Run(campaign, None, bench.args.timeout) for _ in range(2)]
    threads = [threading.Thread(target=r.supervise) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs[0].wall_s = max(r.wall_s for r in runs)
    runs[0].restarts += runs[1].restarts
    runs[0].stalled = runs[0].stalled or runs[1].stalled
    return bench.score("two_coordinators", [(runs[0], campaign)], bench.ref_s,
                       note="two `graceq run` on one directory, started together")


def disk_full(bench: Bench) -> dict:
    mount = bench.root / "small-disk"
    mount.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"scenario": "disk_full", "runs": 0, "skipped": f"cannot mount a small tmpfs: {proc.stderr.strip()}"}
    try:
        campaign = mount / "campaign"
        shutil.copytree(bench.featurized, campaign)

        def fault(run):
            if wait_for(lambda: lease_holder(campaign) is not None, bench.args.timeout):
                ballast = mount / "ballast"
                with open(ballast, "wb") as handle:  # fill the file system
                    try:
                        while True:
                            handle.write(b"\0" * 2**20)
                    except OSError:
                        pass
                time.sleep(5.0)
                ballast.unlink()  # space freed

        run = Run(campaign, None, bench.args.timeout).supervise(fault)
        row = bench.score("disk_full", [(run, campaign)], bench.ref_s, note="campaign on a 64 MB tmpfs filled for 5 s")
        shutil.copytree(campaign, bench.root / "disk-full-campaign", ignore=shutil.ignore_patterns("broker"))
        return row
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--short", action="store_true",
                        help=f"one run each, from `init` (default scenarios: {', '.join(SHORT)})")
    parser.add_argument("--scenarios", nargs="*", choices=SCENARIOS)
    parser.add_argument("--runs", type=int, default=10, help="runs of coordinator_sigkill")
    parser.add_argument("--redis-down-s", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="s a disturbed campaign may take")
    parser.add_argument("--workdir", help="keep the campaigns here (default: a temporary folder)")
    args = parser.parse_args(argv)
    names = args.scenarios or (SHORT if args.short else SCENARIOS)
    if args.short:
        args.runs = 1
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    bench = Bench(args)
    log(f"undisturbed: {bench.ref_full.wall_s:.1f} s with featurisation, {bench.ref_s:.1f} s without; "
        f"{len(bench.ref_picks)} picks")
    rows = []
    for name in names:
        t0 = time.time()
        rows.append(globals()[name](bench))
        log(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)")
        with open(bench.root / "scenarios.jsonl", "a") as handle:  # kept if a later scenario breaks
            handle.write(json.dumps(rows[-1]) + "\n")
    out = {"undisturbed_s": round(bench.ref_s, 1), "undisturbed_with_features_s": round(bench.ref_full.wall_s, 1),
           "n_picks": len(bench.ref_picks), "scenarios": rows, "workdir": str(bench.root)}
    print(json.dumps(out, indent=None if args.json else 2))
    if not args.workdir:
        shutil.rmtree(bench.root, ignore_errors=True)


if __name__ == "__main__":
    main()
