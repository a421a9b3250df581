"""Flower as a person sees it: Redis-backed workers of each queue, tasks run, pages in headless Chromium.

Starts a private redis-server with a password, one `graceq worker` per queue (featurize, fit, dft)
and `graceq flower` with basic auth from GRACEQ_FLOWER_BASIC_AUTH, sends `graceq.noop` tasks to each
queue through the app, then opens Flower in headless Chromium (credentials in the URL) and reads the
pages' DOM after their JavaScript ran: the workers list, each worker's active queues, the task list
and one task's page. A request without credentials, or with wrong ones, gets 401.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_port, celery_client

pytestmark = pytest.mark.browser

QUEUES = ("featurize", "fit", "dft")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-dev-shm-usage",
]






def _chromium() -> str:
    """The chromium binary (conftest.py skips this module's tests when it is absent: nothing is installed)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (.ci/run installs it and sets GRACEQ_TEST_SYSTEM=1)")
    return path


def _graceq() -> list[str]:
    exe = Path(sys.executable).with_name("graceq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graceq.cli"]


class Stack:
    """The processes of one test, each in its own session, stopped (TERM, then KILL) at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **(env or {})))
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def flower_stack(tmp_path):
    chromium = _chromium()
    stack = Stack(tmp_path)
    password = secrets.token_hex(16)
    user, flower_password = "graceq", secrets.token_hex(12)
    redis_port, flower_port = free_port(), free_port()
    redis = stack.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--requirepass", password])
    try:
        wait_port(redis_port, redis, "redis-server")
        broker = f"redis://:{password}@127.0.0.1:{redis_port}/0"
        env = {"GRACEQ_BROKER_URL": broker}
        for queue in QUEUES:
            stack.start(f"worker-{queue}", _graceq() + ["worker", "--queues", queue, "--concurrency", "1",
                                                        "--loglevel", "INFO"], env=env)
        flower = stack.start("flower", _graceq() + ["flower", "--port", str(flower_port)],
                             env=dict(env, GRACEQ_FLOWER_BASIC_AUTH=f"{user}:{flower_password}"))
        wait_port(flower_port, flower, "graceq flower")
        yield {"chromium": chromium, "broker": broker, "port": flower_port, "user": user,
               "password": flower_password, "stack": stack, "folder": tmp_path}
    finally:
        stack.stop()




def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _dump_dom(chromium: str, url: str, profile: Path, budget_ms: int = 8000) -> str:
    """The page's DOM after its scripts ran (headless Chromium, a fresh profile)."""
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"chromium --dump-dom {url} failed: {proc.stderr[-2000:]}"
    return proc.stdout


def _wait_for_workers(base: str, auth, names_like: tuple[str, ...], timeout: float = 60) -> dict:
    import json

    deadline = time.time() + timeout
    seen: dict = {}
    while time.time() < deadline:
        status, body = _get(f"{base}/api/workers?refresh=1", auth)
        if status == 200:
            seen = json.loads(body)
            if all(any(k in name for name in seen) for k in names_like):
                return seen
        time.sleep(1)
    raise AssertionError(f"Flower did not see workers of {names_like} within {timeout} s: {sorted(seen)}")


def test_flower_shows_workers_of_each_queue_and_finished_tasks(flower_stack, tmp_path):
    s = flower_stack
    base = f"http://127.0.0.1:{s['port']}"
    auth = (s["user"], s["password"])

    # authentication: refused without or with wrong credentials, accepted with them
    assert _get(f"{base}/workers")[0] == 401
    assert _get(f"{base}/api/workers")[0] == 401
    assert _get(f"{base}/workers", (s["user"], "wrong"))[0] == 401
    workers = _wait_for_workers(base, auth, tuple(f"graceq-{q}-" for q in QUEUES))

    # a few tasks on each queue, through Redis, as the coordinator sends them
    client = celery_client(s["broker"])
    results = {}
    for queue in QUEUES:
        for k in range(3):
            value = 100 * QUEUES.index(queue) + k
            results[(queue, value)] = client.send_task("graceq.noop", args=[value], queue=queue)
    for (queue, value), result in results.items():
        assert result.get(timeout=60, interval=0.05) == value
    client.close()
    # every queue's worker did its own queue's tasks
    for queue in QUEUES:
        log = s["stack"].log(f"worker-{queue}")
        assert "graceq.noop" in log and "succeeded" in log, log[-2000:]
    task_ids = {r.id for r in results.values()}

    # Flower's event stream lands asynchronously: wait until its API knows every task
    import json

    deadline = time.time() + 60
    while time.time() < deadline:
        status, body = _get(f"{base}/api/tasks?limit=100", auth)
        known = json.loads(body) if status == 200 else {}
        if task_ids <= {tid for tid, t in known.items() if t.get("state") == "SUCCESS"}:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"Flower's API did not report all tasks as SUCCESS: {body[:1000]}")

    # the pages, in headless Chromium, credentials in the URL
    authed = f"http://{s['user']}:{s['password']}@127.0.0.1:{s['port']}"
    dom = _dump_dom(s["chromium"], f"{authed}/workers", tmp_path / "profile-workers")
    names = sorted(workers)
    for queue in QUEUES:
        assert any(f"graceq-{queue}-" in n for n in names)
    for name in names:
        assert name in dom, f"worker {name} not on Flower's workers page"
    # each worker's page lists the queue it consumes
    for queue in QUEUES:
        name = next(n for n in names if f"graceq-{queue}-" in n)
        page = _dump_dom(s["chromium"], f"{authed}/worker/{name}", tmp_path / f"profile-{queue}")
        queues_table = page[page.index('id="worker-queues"'):]
        queues_table = queues_table[:queues_table.index("</tbody>")]
        assert re.findall(r"<td>([\w-]+)</td>", queues_table)[:1] == [queue], queues_table
    # the task list (filled by the page's JavaScript from Flower's datatable endpoint)
    dom = _dump_dom(s["chromium"], f"{authed}/tasks", tmp_path / "profile-tasks", budget_ms=15000)
    shown = [tid for tid in task_ids if tid in dom]
    assert len(shown) == len(task_ids), f"{len(shown)} of {len(task_ids)} tasks on the tasks page"
    assert "graceq.noop" in dom and "SUCCESS" in dom
    one = next(iter(results.values()))
    dom = _dump_dom(s["chromium"], f"{authed}/task/{one.id}", tmp_path / "profile-task")
    assert "graceq.noop" in dom and "SUCCESS" in dom

    # without credentials the browser gets no page
    dom = _dump_dom(s["chromium"], f"{base}/workers", tmp_path / "profile-anon")
    assert not any(name in dom for name in names)

    # a screenshot, kept beside the logs for a person to look at
    subprocess.run([s["chromium"], *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}",
                    "--window-size=1400,900", f"--screenshot={tmp_path / 'flower-workers.png'}",
                    "--virtual-time-budget=5000", f"{authed}/workers"], capture_output=True, timeout=120)
    assert (tmp_path / "flower-workers.png").stat().st_size > 10_000
