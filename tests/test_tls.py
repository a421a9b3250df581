"""rediss:// for real: a campaign through a TLS-only redis-server started here, with a CA and
certificates that the test makes with openssl; the server certificate is verified
(GRACEQ_BROKER_CA) and Redis asks for a client certificate (GRACEQ_BROKER_CERT/_KEY)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import GRACEQ, bundled, free_port, wait_port, write_subset


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=300)


def _redis_has_tls() -> str | None:
    """None when the tools are here, else why not (whether redis-server speaks TLS shows at start)."""
    if shutil.which("redis-server") is None:
        return "no redis-server on this machine"
    if shutil.which("openssl") is None:
        return "no openssl to make the test certificates"
    return None


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    reason = _redis_has_tls()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=graceq test CA", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "san.cnf"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'graceq worker'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", *extra, cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return d


@pytest.fixture
def tls_redis(pki, tmp_path):
    """redis-server on a TLS port only (no plain port), password and client certificates required."""
    port = free_port()
    password = os.urandom(12).hex()
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\nrequirepass {password}\n"
        f"tls-cert-file {pki / 'server.crt'}\ntls-key-file {pki / 'server.key'}\n"
        f"tls-ca-cert-file {pki / 'ca.crt'}\ntls-auth-clients yes\n"
    )
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=open(tmp_path / "redis.log", "wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, "redis-server (TLS)")
    except AssertionError:
        log = (tmp_path / "redis.log").read_text(errors="replace")
        if proc.poll() is not None and "tls" in log.lower():  # e.g. Debian's redis built without BUILD_TLS
            pytest.skip(f"this redis-server cannot serve TLS: {log.strip().splitlines()[-1]}")
        raise
    yield f"rediss://:{password}@127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def _tls_env(pki: Path, client_cert: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACEQ_BROKER")}
    env["GRACEQ_BROKER_CA"] = str(pki / "ca.crt")
    if client_cert:
        env.update(GRACEQ_BROKER_CERT=str(pki / "client.crt"), GRACEQ_BROKER_KEY=str(pki / "client.key"))
    return env


def _probe() -> str:
    """A script that opens one connection the way graceq's app does (broker_use_ssl from the environment)."""
    return ("from kombu import Connection; from graceq.app import tls_options; import sys; "
            "url = open(sys.argv[1]).read().strip(); "
            "c = Connection(url, ssl=tls_options(url), connect_timeout=5); "
            "c.ensure_connection(max_retries=1); c.default_channel.client.ping(); print('ok')")


def test_a_campaign_runs_through_rediss(pki, tls_redis, tmp_path):
    import sys

    broker_file = tmp_path / "broker_url"
    broker_file.write_text(tls_redis + "\n")
    broker_file.chmod(0o600)
    env = _tls_env(pki)

    # the certificate checks are real: no CA -> verification fails; no client certificate -> refused
    probe = _probe()
    ok = subprocess.run([sys.executable, "-c", probe, str(broker_file)], capture_output=True, text=True,
                        env=env, timeout=300)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    no_ca = {k: v for k, v in env.items() if k != "GRACEQ_BROKER_CA"}
    bad = subprocess.run([sys.executable, "-c", probe, str(broker_file)], capture_output=True, text=True,
                         env=no_ca, timeout=300)
    assert bad.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in bad.stderr, bad.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", probe, str(broker_file)], capture_output=True, text=True,
                         env=_tls_env(pki, client_cert=False), timeout=300)
    assert bad.returncode != 0

    pool = write_subset(bundled("roy264", "roy264.extxyz"), tmp_path / "roy12.extxyz", 22)
    settings = tmp_path / "settings.toml"
    settings.write_text(f'[campaign]\npool = "{pool}"\nunit = "kJ/mol"\nwindow = 5.0\nn_init = 8\nn_batch = 2\n'
                        'budget = 10\n[model]\nn_members = 16\nmembers_per_task = 8\n[descriptor]\nchunk_size = 4\n'
                        'n_max = 4\nl_max = 2\nn_compressed = 2\n')
    worker = subprocess.Popen(GRACEQ + ["worker", "--broker-file", str(broker_file), "-c", "1", "--loglevel", "INFO",
                                        "--campaign-root", str(tmp_path)],
                              stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    try:
        run = subprocess.run(GRACEQ + ["run", str(tmp_path / "camp"), "--settings", str(settings), "--quiet",
                                       "--broker-file", str(broker_file)],
                             capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
    with sqlite3.connect(tmp_path / "camp" / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results WHERE status = 'converged'").fetchone()[0] == 10
    log = (tmp_path / "worker.log").read_text()
    assert "rediss://" in log and "ready." in log
    assert tls_redis.split("@")[0].split(":")[-1] not in log  # the password is masked in the log
