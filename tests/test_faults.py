"""Faults that stalled or jammed a campaign (issue 12), each reproduced; and a short run of the
fault-injection benchmark (benchmarks/faults.py) on real processes."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, settings_text
from graceq.app import redact
from graceq.config import ConfigError, load_settings, settings_from_dict

REPO = Path(__file__).resolve().parent.parent

# base64 secrets and hand-made ones: every character that a URL parser trips on
PASSWORDS = ["ab/cd+ef==", "x#" + secrets.token_hex(6), "q?u=" + secrets.token_hex(6), "p@ss:w/rd#1?",
             "/" + secrets.token_urlsafe(12) + "#", "%zz" + secrets.token_hex(4)]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("template", ["redis://:{}@redis-host:6379/0", "rediss://ops:{}@10.0.0.5:6380/2",
                                      "redis://{}@h/0", "redis://h:6379/0?password={}"])
def test_redact_never_raises_and_never_prints_the_password(password, template):
    """kombu's maybe_sanitize_url raised 'Port could not be cast to integer value as <start of the
    password>' for an unquoted password with / # or ?."""
    shown = redact(template.format(password))
    assert "**" in shown
    for piece in {password[:3], password[-3:]} | {p for p in password.replace("/", " ").replace("#", " ").split()
                                                  if len(p) >= 3}:
        assert piece not in shown, (piece, shown)


def test_redact_keeps_what_helps_and_handles_odd_input():
    assert redact("redis://:secret@redis-host:6379/0") == "redis://:**@redis-host:6379/0"
    assert redact("redis://redis-host:6379/0") == "redis://redis-host:6379/0"
    assert redact(None) == "embedded"
    assert "secret" not in redact("secret-without-scheme")
    assert redact(b"redis://:s@h") != ""  # not a str: still no exception


def test_an_infinite_window_is_rejected_with_the_field_named(tmp_path, roy_small):
    for window in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=r"campaign\.window"):
            settings_from_dict({"campaign": {"pool": "p.extxyz", "window": window}})
    toml = tmp_path / "settings.toml"
    toml.write_text(settings_text(roy_small).replace("window = 5.0", "window = inf"))
    with pytest.raises(ConfigError, match=r"settings.toml.*campaign\.window.*finite"):
        load_settings(toml)
    result = run_cli("init", str(tmp_path / "c"), "--settings", str(toml), check=False)
    assert result.returncode != 0 and "finite" in result.stderr
    toml.write_text(settings_text(roy_small))
    result = run_cli("init", str(tmp_path / "c"), "--settings", str(toml), "--window", "inf", check=False)
    assert result.returncode != 0 and "finite" in result.stderr
    assert not (tmp_path / "c" / "state.sqlite").exists()


def test_fault_injection_short_variant(tmp_path):
    """benchmarks/faults.py on real processes: the coordinator SIGKILLed once the first iteration
    is committed, the campaign copied without state.sqlite-wal (a backup that forgot it), and the
    copy resumed: nothing lost, nothing run twice, the picks of an undisturbed campaign."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py"), "--json", "--short",
                           "--scenarios", "copy_without_wal", "--timeout", "400", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["n_picks"] == 16
    (row,) = out["scenarios"]
    assert row["scenario"] == "copy_without_wal" and row["runs"] == 1
    assert (row["lost"], row["duplicated"], row["same_picks"], row["stalled"]) == (0, 0, True, 0), row
    assert isinstance(row["recover_s"], float)


def test_a_jammed_embedded_worker_is_started_again(tmp_path, roy_small, monkeypatch):
    """An idle pool process SIGKILLed keeps its job pipe's lock (billiard), and the embedded worker
    then took no message for ever: the campaign stalled and the worker outlived its coordinator
    (benchmarks/faults.py worker_sigkill_idle, 2 of 3 runs). Here the pool processes are
    SIGSTOPped, a jam that does not depend on timing: messages wait and no lease beats. check()
    kills the worker's process group and starts it again, and the new worker takes the messages."""
    import os
    import signal
    import time

    import psutil

    from graceq import app as app_module
    from graceq import coordinator, tasks
    from graceq.store import CampaignPaths

    toml = tmp_path / "settings.toml"
    toml.write_text(settings_text(roy_small))
    run_cli("init", str(tmp_path / "c"), "--settings", str(toml))
    paths = CampaignPaths(tmp_path / "c")
    app_module.configure(embedded_dir=paths.broker)
    monkeypatch.setattr(coordinator, "JAMMED_AFTER_S", 3.0)
    workers = coordinator.EmbeddedWorkers(paths, 2).__enter__()
    try:
        first = psutil.Process(workers.proc.pid)
        deadline = time.time() + 60
        while len(first.children()) < 2 and time.time() < deadline:
            time.sleep(0.2)
        pool = first.children()
        assert len(pool) == 2
        time.sleep(1.0)
        for child in pool:
            os.kill(child.pid, signal.SIGSTOP)
        for k in range(4):  # more than the worker prefetches: some wait in the queue folder
            tasks.noop.apply_async(args=[k], queue="fit")
        workers.check()
        assert workers.proc.pid == first.pid  # not before a message has waited JAMMED_AFTER_S
        deadline = time.time() + 60
        while workers.proc.pid == first.pid and time.time() < deadline:
            workers.check()
            time.sleep(0.2)
        assert workers.proc.pid != first.pid, "the jammed embedded worker was not started again"
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in [first, *pool])
        deadline = time.time() + 60
        while list((paths.broker / "queue").glob("*.msg")) and time.time() < deadline:
            time.sleep(0.2)
        assert not list((paths.broker / "queue").glob("*.msg")), "the new worker takes no message"
        workers.check()
        assert workers.proc.poll() is None
    finally:
        workers.__exit__(None, None, None)
