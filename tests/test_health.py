"""queue_consumers against a real Redis and a real `graceq worker` (no mocks)."""

from __future__ import annotations

import time

from conftest import celery_client
from graceq.health import no_consumer_message, queue_consumers


def test_queue_consumers_names_the_worker_of_each_queue(redis_url, workers):
    client = celery_client(redis_url)
    try:
        start = time.time()
        assert queue_consumers(client, "dft", timeout=1.0) == []  # no worker yet: an answer, not a hang
        assert time.time() - start < 10
        workers.start(queues="dft", name="dft-only@%h")
        deadline = time.time() + 60
        found = []
        while time.time() < deadline and not found:
            found = queue_consumers(client, "dft", timeout=1.0)
        assert len(found) == 1 and found[0].startswith("dft-only@")
        assert queue_consumers(client, "fit", timeout=1.0) == []
    finally:
        client.close()


def test_the_message_names_the_queue_and_the_command_and_hides_the_password():
    message = no_consumer_message("dft", "redis://:s3cret@node7:6379/0", 31.2)
    assert "'dft' queue" in message and "graceq worker --queues dft" in message and "31 s" in message
    assert "s3cret" not in message and "node7" in message


def test_graceq_run_with_no_worker_explains_itself_within_30_s(redis_url, roy_small, tmp_path):
    """A real coordinator on a real Redis with nobody consuming: within 30 s it names the queue and
    the command that starts a worker, and keeps waiting (it has not exited)."""
    import os
    import signal
    import subprocess

    from conftest import GRACEQ, settings_text

    (tmp_path / "settings.toml").write_text(settings_text(roy_small))
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(GRACEQ + ["run", str(tmp_path / "campaign"), "--settings", str(tmp_path / "settings.toml"),
                                      "--quiet"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, GRACEQ_BROKER_URL=redis_url))
    try:
        started = time.time()
        said = ""
        while time.time() - started < 90 and "no worker consumes" not in said:
            time.sleep(1)
            said = (tmp_path / "run.log").read_text()
        elapsed = time.time() - started
        assert "no worker consumes the 'featurize' queue" in said, said
        assert "graceq worker --queues featurize" in said
        assert proc.poll() is None  # it keeps waiting
        # 20 s of silence, then a 2 s inspect; the rest is the start-up before the first send (init)
        assert elapsed < 60, elapsed
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
