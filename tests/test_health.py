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
