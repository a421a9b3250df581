"""Shared fixtures: small pools cut from the bundled landscapes, a private Redis, real workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest

GRACEQ = [sys.executable, "-m", "graceq.cli"]

# Tests that start system daemons (a SLURM cluster) or a browser run only when the CI script asks for
# them (it installs the packages first and exports this variable): the test command itself never
# installs a system package, and a developer's `python -m pytest` never starts munged or slurmctld.
SYSTEM_TESTS_VARIABLE = "GRACEQ_TEST_SYSTEM"
SYSTEM_TOOLS = {
    "slurm": ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol"),
    "browser": ("chromium",),
}


def system_test_skip_reason(marker: str, environ=os.environ) -> str | None:
    """Why a test marked `slurm` or `browser` must skip here, or None when it may run."""
    if environ.get(SYSTEM_TESTS_VARIABLE) != "1":
        return (f"{marker} tests start system daemons or a browser: they run only when "
                f"{SYSTEM_TESTS_VARIABLE}=1 (set by .ci/run after it installs the packages)")
    tools = SYSTEM_TOOLS[marker]
    missing = [t for t in tools if not (shutil.which(t) or (t == "chromium" and shutil.which("chromium-browser")))]
    if missing:
        return f"{marker} tests need {', '.join(missing)} on the PATH (.ci/run installs them)"
    if marker == "slurm" and os.geteuid() != 0:
        return "slurm tests start munged, slurmctld and slurmd: they need root"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker in SYSTEM_TOOLS:
            if item.get_closest_marker(marker) is not None:
                reason = system_test_skip_reason(marker)
                if reason:
                    item.add_marker(pytest.mark.skip(reason=reason))


def bundled(*parts: str) -> Path:
    return Path(str(files("graceq").joinpath("data", *parts)))


def load_retro():
    """benchmarks/retro.py as a module (the benchmarks folder is not a package)."""
    return load_benchmark("retro")


def load_benchmark(stem: str):
    """benchmarks/<stem>.py as a module (the benchmarks folder is not a package)."""
    import importlib.util

    name = f"graceq_{stem}_benchmark"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """Wait until `proc` listens on 127.0.0.1:port; fail with its name if it exits or stays silent."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on port {port} within {timeout} s")


def celery_client(broker: str):
    """A Celery client of its own for this broker (graceq's queues, JSON only), like another node's.

    Not graceq's module-level app: Celery caches that app's result backend and connection pool, so
    one process that talks to two brokers in turn must not reconfigure it.
    """
    from celery import Celery
    from kombu import Exchange, Queue

    from graceq.app import QUEUES

    client = Celery("graceq-test-client", broker=broker, backend=broker)
    client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                       result_accept_content=["json"],
                       task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES])
    return client


def write_subset(source: Path, target: Path, step: int, limit: int | None = None) -> Path:
    """Every `step`-th frame of a bundled pool, as a new extxyz file (tests never read ../shared)."""
    from ase.io import read, write

    frames = read(source, ":")[::step][:limit]
    write(target, frames, format="extxyz")
    return target


@pytest.fixture(scope="session")
def roy_small(tmp_path_factory) -> Path:
    """66 ROY structures (every 4th of ROY-264), with energy_ff and energy_ref in kJ/mol per cell."""
    return write_subset(bundled("roy264", "roy264.extxyz"), tmp_path_factory.mktemp("pool") / "roy66.extxyz", 4)


def settings_text(pool: Path, **extra) -> str:
    campaign = dict(pool=str(pool), unit="kJ/mol", window=5.0, n_init=12, n_batch=6, seed=3)
    campaign.update(extra.pop("campaign", {}))
    sections = {"campaign": campaign, "model": {"n_members": 64, "members_per_task": 16},
                "descriptor": {"chunk_size": 8}}
    for key, value in extra.items():
        sections.setdefault(key, {}).update(value)
    import tomli_w

    return tomli_w.dumps(sections)


@pytest.fixture
def redis_url():
    """A private redis-server on a free port (nothing on disk), stopped after the test."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


class Workers:
    """`graceq worker` processes started like a user on another node would, stopped at the end."""

    def __init__(self, broker: str, log_dir: Path):
        self.broker = broker
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, queues: str = "featurize,fit,dft", concurrency: int = 1, name: str | None = None,
              env: dict | None = None, args: tuple = ()) -> subprocess.Popen:
        name = name or f"w{len(self.procs)}@%h"
        log = open(self.log_dir / f"worker{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            GRACEQ + ["worker", "--queues", queues, "--concurrency", str(concurrency), "--name", name,
                      "--broker", self.broker, "--loglevel", "INFO", *args],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})), start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


@pytest.fixture
def workers(redis_url, tmp_path):
    pool = Workers(redis_url, tmp_path)
    yield pool
    pool.stop()


def picks_of(campaign_dir: Path) -> list[tuple[int, int]]:
    """(structure index, iteration) of every pick, in sampling order."""
    with sqlite3.connect(Path(campaign_dir) / "state.sqlite") as db:
        return db.execute("SELECT idx, iteration FROM picks ORDER BY iteration, rank").fetchall()


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, check: bool = True):
    result = subprocess.run(GRACEQ + list(args), capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"graceq {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- a single-node SLURM cluster (tests marked slurm) -----------------------------------------
SLURM_SETUP = Path(__file__).resolve().parent / "slurm_setup.sh"


def _stop_daemon(name: str, pidfile: str, timeout: float = 20) -> None:
    """TERM the daemon whose pid its pidfile records, wait for it to exit (KILL after `timeout` s)."""
    try:
        pid = int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM cluster, started by tests/slurm_setup.sh and stopped afterwards.

    Only the daemons that the script started (it names them on stdout) are stopped: a cluster that
    ran before the tests keeps running.
    """
    proc = subprocess.run(["bash", str(SLURM_SETUP)], capture_output=True, text=True, timeout=300)
    started = [line.split()[1:3] for line in proc.stdout.splitlines() if line.startswith("started ")]
    try:
        if proc.returncode == 2:
            pytest.skip(f"cannot start SLURM here: {proc.stderr.strip()[-500:]}")
        assert proc.returncode == 0, f"tests/slurm_setup.sh failed:\n{proc.stdout}\n{proc.stderr}"
        yield socket.gethostname()
    finally:
        # slurmd before slurmctld before munged: each one's peers are still up while it shuts down
        order = {"slurmd": 0, "slurmctld": 1, "munged": 2}
        for name, pidfile in sorted(started, key=lambda s: order.get(s[0], 9)):
            _stop_daemon(name, pidfile)
