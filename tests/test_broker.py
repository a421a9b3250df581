"""The embedded folder broker delivers every message exactly once, whole, to competing consumers."""

from __future__ import annotations

import multiprocessing as mp
import time
from queue import Empty

from kombu import Connection

import graceq.broker  # noqa: F401  (registers graceqfs://)


def _options(folder):
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"), "control_folder": str(folder / "control"),
            "polling_interval": 0.01}


def _consume(folder, out, produced, deadline_s):
    """Take messages until the producer is done and the queue is empty (or the deadline passes)."""
    with Connection("graceqfs://localhost/", transport_options=_options(folder)) as conn:
        queue = conn.SimpleQueue("dft")
        got = []
        end = time.time() + deadline_s
        while time.time() < end:
            try:
                message = queue.get(timeout=0.2)
            except Empty:
                if produced.is_set():
                    break
                continue
            got.append(message.payload["n"])
            message.ack()
        out.put(got)


def test_two_consumers_racing_a_producer_get_each_message_once(tmp_path):
    out = mp.Queue()
    produced = mp.Event()
    consumers = [mp.Process(target=_consume, args=(tmp_path, out, produced, 120)) for _ in range(2)]
    for proc in consumers:
        proc.start()
    n = 400
    with Connection("graceqfs://localhost/", transport_options=_options(tmp_path)) as conn:
        queue = conn.SimpleQueue("dft")
        for i in range(n):
            queue.put({"n": i, "padding": "x" * 20000})  # large enough to be caught half-written
    produced.set()
    received = out.get(timeout=150) + out.get(timeout=150)
    for proc in consumers:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    assert sorted(received) == list(range(n)), "a message was lost or delivered twice"
    assert list((tmp_path / "queue").iterdir()) == []


def test_configured_again_the_app_sends_to_the_new_folder(tmp_path):
    """A process that configures the app for a second campaign (the test suite does, a script may)
    sends to the second campaign's broker folder, not to the first one's cached connection."""
    from graceq import app as app_module
    from graceq import tasks

    first, second = tmp_path / "first", tmp_path / "second"
    try:
        app_module.configure(embedded_dir=first)
        tasks.noop.apply_async(args=[1], queue="fit")
        assert len(list((first / "queue").glob("*.msg"))) == 1
        app_module.configure(embedded_dir=second)
        tasks.noop.apply_async(args=[2], queue="fit")
        assert len(list((first / "queue").glob("*.msg"))) == 1
        assert len(list((second / "queue").glob("*.msg"))) == 1
    finally:
        app_module.configure_from_environment()
