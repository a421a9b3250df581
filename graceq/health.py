"""Is anyone listening? The workers that consume a queue, asked through the broker.

A campaign whose `dft` queue has no worker waits for ever at "reference jobs: 0%". The
coordinator can ask the workers directly: Celery's remote control ``inspect().active_queues()``
broadcasts through the broker and every live worker answers with the queues it consumes, within
``timeout`` seconds. No answer for a queue means no worker consumes it now (or none could answer in
time): the message from :func:`no_consumer_message` says which queue and which command starts a
worker for it. The broadcast needs a broker with fanout exchanges (Redis, RabbitMQ); the embedded
folder broker has none, and there the coordinator starts its own workers anyway.
"""

from __future__ import annotations


def queue_consumers(app, queue: str, timeout: float = 2.0) -> list[str]:
    """Names of the live workers that consume `queue` (sorted); [] when none answered in `timeout` s."""
    answers = app.control.inspect(timeout=timeout).active_queues() or {}
    return sorted(worker for worker, queues in answers.items()
                  if any(q.get("name") == queue for q in (queues or [])))


def no_consumer_message(queue: str, broker_url: str | None, waited_s: float) -> str:
    """What to tell a user whose `queue` has had no worker for `waited_s` seconds."""
    from graceq.app import redact

    return (f"no worker consumes the '{queue}' queue on {redact(broker_url)} (none for {waited_s:.0f} s); "
            f"the campaign waits. Start one on a node that sees the campaign directory: "
            f"`graceq worker --queues {queue} --broker <the same URL>` (or GRACEQ_BROKER_URL)")
