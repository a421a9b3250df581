"""The Celery app and its configuration (DESIGN.md section 8).

Two ways to run, with the same tasks and the same messages:

- **scale-out**: ``GRACEQ_BROKER_URL=redis://[:password@]host:port/db`` (``rediss://`` for TLS);
  results go to the same Redis unless ``GRACEQ_RESULT_BACKEND`` names another. With ``rediss://``
  the server certificate is verified against ``GRACEQ_BROKER_CA`` (a PEM CA bundle; the system's
  CAs when unset); ``GRACEQ_BROKER_CERT``/``GRACEQ_BROKER_KEY`` give a client certificate when
  Redis asks for one (``tls-auth-clients``); ``GRACEQ_BROKER_CERT_REQS`` is ``required``
  (default), ``optional`` or ``none`` (no verification: testing only).
- **embedded** (no broker configured): kombu's folder transport (``graceq.broker``: the
  ``filesystem://`` transport with atomic message files) with its message folder
  inside the campaign directory (``GRACEQ_EMBEDDED_DIR``), and worker processes started by
  ``graceq run``. No server to start; messages are still serialised, routed and consumed by real
  Celery workers.

Choices that follow Celery's documentation and issue tracker: JSON only on the wire (pickle is a
remote-code-execution risk); late acknowledgement with ``task_reject_on_worker_lost`` so that a
killed worker's task is delivered again; prefetch 1 because reference jobs are long; a Redis
visibility timeout (``GRACEQ_VISIBILITY_TIMEOUT``, s, default 12 h) above the longest task so that
Redis does not re-deliver running jobs; results kept 7 days. The result backend is never the only
copy of anything: workers write their results as files in the campaign directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

import graceq.broker  # noqa: F401  (registers the embedded graceqfs:// transport)
import graceq.trust  # noqa: F401  (connects message signing and the worker's trust policy)

QUEUES = ("featurize", "fit", "dft")

# every task checks its message before its body runs (graceq.trust.CheckedTask)
app = Celery("graceq", include=["graceq.tasks"], task_cls="graceq.trust:CheckedTask")


def redact(url: str | None) -> str:
    """A broker URL fit for logs: the password replaced by ``**``; never raises.

    Parsed by hand, not with urllib or kombu: a password with ``/``, ``#``, ``?`` or ``@`` that was
    not URL-quoted (base64 secrets) breaks their parsers, which then raise with the start of the
    password in the message. Everything between ``scheme://`` and the last ``@`` is the userinfo;
    its password (after the first ``:``; the whole userinfo if there is no ``:`` or the user name
    has odd characters) is masked, and so is a ``password=`` query parameter. A URL without
    ``scheme://`` is not printed at all.
    """
    if not url:
        return "embedded"
    try:
        scheme, sep, rest = str(url).partition("://")
        if not sep:
            return "<broker URL not of the form scheme://host...: not shown>"
        rest = re.sub(r"(?i)(password=)[^&]*", r"\1**", rest)
        userinfo, at, hostpart = rest.rpartition("@")
        if at:
            user, colon, _ = userinfo.partition(":")  # a user name is shown only if it is plainly one
            userinfo = f"{user}:**" if colon and re.fullmatch(r"[A-Za-z0-9._-]*", user) else "**"
        return f"{scheme}://{userinfo}{at}{hostpart}"
    except Exception:  # a log line must never be what stops graceq
        return "<broker URL: not shown>"


def tls_options(url: str) -> dict | None:
    """SSL options for a ``rediss://`` URL from GRACEQ_BROKER_CA/_CERT/_KEY/_CERT_REQS, else None.

    Celery's Redis result backend refuses a ``rediss://`` URL without ``ssl_cert_reqs``; kombu's
    broker transport takes the same keys (``broker_use_ssl``, ``redis_backend_use_ssl``).
    """
    if not url or not url.startswith("rediss://"):
        return None
    import ssl

    reqs = os.environ.get("GRACEQ_BROKER_CERT_REQS", "required").strip().lower()
    levels = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    if reqs not in levels:
        raise ValueError(f"GRACEQ_BROKER_CERT_REQS={reqs!r}: use required, optional or none")
    options: dict = {"ssl_cert_reqs": levels[reqs]}
    for env, key in (("GRACEQ_BROKER_CA", "ssl_ca_certs"), ("GRACEQ_BROKER_CERT", "ssl_certfile"),
                     ("GRACEQ_BROKER_KEY", "ssl_keyfile")):
        value = os.environ.get(env)
        if value:
            if not Path(value).expanduser().is_file():
                raise ValueError(f"{env}={value}: no such file")
            options[key] = str(Path(value).expanduser())
    return options


def _forget_connections() -> None:
    """Drop the broker connections and producers the app has cached: once configured again (a
    second campaign in one process), it must not go on sending to the previous broker or folder."""
    from kombu import pools

    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    pools.reset()


def configure(broker_url: str | None = None, embedded_dir: str | Path | None = None) -> str:
    """Configure the app for Redis (broker_url) or the embedded folder broker; returns the mode."""
    _forget_connections()
    visibility_s = float(os.environ.get("GRACEQ_VISIBILITY_TIMEOUT", 12 * 3600))
    conf = dict(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_expires=7 * 24 * 3600,
        task_default_queue="dft",
        task_default_exchange="dft",
        task_default_routing_key="dft",
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_routes={
            "graceq.fit_projection": {"queue": "featurize"},
            "graceq.featurize": {"queue": "featurize"},
            "graceq.select_lambda": {"queue": "fit"},
            "graceq.fit_members": {"queue": "fit"},
            "graceq.run_reference": {"queue": "dft"},
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if broker_url:
        options = {"visibility_timeout": visibility_s}
        backend = os.environ.get("GRACEQ_RESULT_BACKEND", broker_url)
        conf.update(
            broker_url=broker_url,
            result_backend=backend,
            broker_transport_options=options,
            result_backend_transport_options=options,
            broker_use_ssl=tls_options(broker_url),
            redis_backend_use_ssl=tls_options(backend),
        )
        mode = "redis" if broker_url.startswith("redis") else "broker"
    elif embedded_dir:
        folder = Path(embedded_dir).resolve()
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf.update(
            broker_url="graceqfs://localhost/",
            broker_transport_options={
                "data_folder_in": str(folder / "queue"),
                "data_folder_out": str(folder / "queue"),
                "control_folder": str(folder / "control"),
                "processed_folder": str(folder / "processed"),
                "store_processed": False,
                "polling_interval": 0.1,  # s; the folder is polled, not pushed
            },
            # the folder transport has no fan-out worth using: no remote control, no events
            worker_enable_remote_control=False,
            worker_send_task_events=False,
            task_send_sent_event=False,
            result_backend=None,
            task_ignore_result=True,
        )
        mode = "embedded"
    else:
        mode = "unconfigured"
    app.conf.update(conf)
    return mode


def configure_from_environment() -> str:
    """Configure from GRACEQ_BROKER_URL or GRACEQ_EMBEDDED_DIR (what `celery -A graceq.app` sees)."""
    return configure(
        broker_url=os.environ.get("GRACEQ_BROKER_URL") or None,
        embedded_dir=os.environ.get("GRACEQ_EMBEDDED_DIR") or None,
    )


configure_from_environment()
