"""docker-compose.yml and deploy/: checked as files, then run as the processes they declare.

There is no Docker engine here, so the compose file is parsed (PyYAML) and its variables are
substituted the way compose does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``). Then
the very commands its services declare are started as local processes: Redis with the compose
file's settings and a password, one worker per queue (two of the scalable dft one), Flower and the
coordinator, which runs a small ROY campaign through them. Only what a container would change is
changed: the Redis host and port, the /campaigns and /flower mount points, Flower's listen address.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote
from importlib.resources import files
from pathlib import Path

import pytest

from conftest import free_port, wait_port

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
SERVICES = {"redis", "coordinator", "worker-featurize", "worker-fit", "worker-dft", "flower"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH", re.I)
REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")


# -- compose's variable substitution -------------------------------------------------------------
class MissingVariable(ValueError):
    pass


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute variables as docker compose does (the forms this project uses)."""

    def substitute(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return env.get(match.group("named"), "")
        form = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", match.group("braced"), re.S)
        if form is None:
            raise ValueError(f"invalid interpolation {match.group(0)!r}")
        name, op, arg = form.groups()
        value = env.get(name)
        if op is None:
            return value or ""
        if op in (":-", "-"):
            return value if (value if op == ":-" else value is not None) else arg
        if op in (":?", "?"):
            if not (value if op == ":?" else value is not None):
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return value
        return arg if (value if op == ":+" else value is not None) else ""

    return _VAR.sub(substitute, text)


def resolve(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None, text: str | None = None) -> dict:
    """The compose file as a dict (YAML anchors and merge keys applied), variables substituted if env."""
    doc = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    return doc if env is None else resolve(doc, env)


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def hard_coded_secrets(doc: dict) -> list[str]:
    """Places in an (unsubstituted) compose document where a secret is written instead of referenced."""
    found = []

    def visit(node, where: str, key: str = ""):
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, f"{where}.{k}", str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{where}[{i}]")
                if v == "--requirepass" and i + 1 < len(node) and not REFERENCE.match(str(node[i + 1])):
                    found.append(f"{where}[{i + 1}]: --requirepass {node[i + 1]!r}")
        elif isinstance(node, str):
            for userinfo in re.findall(r"[a-z]+://([^@/\s]*)@", node):
                password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
                if password and not REFERENCE.match(password):
                    found.append(f"{where}: password in URL {node!r}")
            if SECRET_KEY.search(key) and not REFERENCE.match(node):
                found.append(f"{where}: {key}={node!r}")

    visit(doc, "compose")
    return found


def container_environment(service: dict, bin_dir: Path) -> dict[str, str]:
    """The environment a service's command sees in its container: the service's environment, passed
    through its entrypoint (which builds GRACEQ_BROKER_URL with the password URL-quoted); tini is
    left out, and ``bin_dir`` holds the image's graceq-entrypoint (workers/entrypoint.sh)."""
    shutil.copy(REPO / "workers" / "entrypoint.sh", bin_dir / "graceq-entrypoint")
    (bin_dir / "graceq-entrypoint").chmod(0o755)
    entrypoint = service["entrypoint"]
    assert entrypoint[:2] == ["tini", "--"]
    env = dict(os.environ, **environment_of(service))
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(entrypoint[2:] + ["env", "-0"], env=env, capture_output=True, timeout=60, check=True)
    seen = dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
    return {k: v for k, v in seen.items() if k in environment_of(service) or k.startswith("GRACEQ_")}


def _graceq() -> list[str]:
    exe = Path(sys.executable).with_name("graceq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graceq.cli"]






# a base64-like secret with every character that needs quoting in a URL (issue 12)
ENV = {"REDIS_PASSWORD": "pw/+" + secrets.token_hex(8) + "#?@:=%", "GRACEQ_FLOWER_BASIC_AUTH": "ops:" + secrets.token_hex(8)}


# -- (a) the files --------------------------------------------------------------------------------
def test_compose_declares_the_stack(tmp_path):
    services = load_compose(ENV)["services"]
    assert set(services) == SERVICES

    args = services["redis"]["command"]
    assert args[0] == "redis-server"
    options = {args[i].lstrip("-"): args[i + 1] for i in range(1, len(args) - 1, 2)}
    assert options["appendonly"] == "yes"
    assert options["appendfsync"] == "everysec"
    assert options["maxmemory-policy"] == "noeviction"
    assert options["requirepass"] == ENV["REDIS_PASSWORD"]
    assert "healthcheck" in services["redis"]

    queues = {}
    for name in ("worker-featurize", "worker-fit", "worker-dft"):
        cmd = services[name]["command"]
        assert cmd[:2] == ["graceq", "worker"]
        queues[name] = cmd[cmd.index("--queues") + 1]
    assert queues == {"worker-featurize": "featurize", "worker-fit": "fit", "worker-dft": "dft"}
    # dft scales with --scale: nothing that two replicas could not share
    assert "container_name" not in services["worker-dft"] and "ports" not in services["worker-dft"]

    coordinator = services["coordinator"]["command"]
    assert coordinator[:3] == ["graceq", "run", "/campaigns/demo"]
    for name in ("coordinator", "worker-featurize", "worker-fit", "worker-dft"):
        s = services[name]
        assert any(v.endswith(":/campaigns") for v in s["volumes"]), f"{name} lacks the shared /campaigns"
        seen = container_environment(s, tmp_path)
        assert seen["GRACEQ_BROKER_URL"] == f"redis://:{quote(ENV['REDIS_PASSWORD'], safe='')}@redis:6379/0"
        assert "REDIS_PASSWORD" not in seen  # the command sees the URL only
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"

    flower = services["flower"]
    assert flower["command"][:2] == ["graceq", "flower"]
    assert environment_of(flower)["GRACEQ_FLOWER_BASIC_AUTH"] == ENV["GRACEQ_FLOWER_BASIC_AUTH"]
    assert "--persistent-db" in flower["command"]
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])


def test_no_secret_is_hard_coded():
    raw = load_compose()
    assert hard_coded_secrets(raw) == []
    # compose refuses to start without the secrets
    for missing in ENV:
        with pytest.raises(MissingVariable, match=missing):
            load_compose({k: v for k, v in ENV.items() if k != missing})
    # the check finds a written-in password, wherever it is
    text = COMPOSE.read_text()
    for bad in (text.replace('"${REDIS_PASSWORD:?set REDIS_PASSWORD (e.g. openssl rand -hex 24)}"', "hunter2", 1),
                text.replace('REDIS_PASSWORD: "${REDIS_PASSWORD:?set REDIS_PASSWORD (e.g. openssl rand -hex 24)}"',
                             'GRACEQ_BROKER_URL: "redis://:hunter2@redis:6379/0"', 1),
                text.replace('"${GRACEQ_FLOWER_BASIC_AUTH:?set GRACEQ_FLOWER_BASIC_AUTH=user:password}"',
                             "admin:hunter2", 1)):
        assert bad != text
        assert hard_coded_secrets(yaml.safe_load(bad)), "a hard-coded secret went unnoticed"
    for path in [COMPOSE, REPO / "workers" / "Dockerfile", REPO / "workers" / "entrypoint.sh",
                 *sorted((REPO / "deploy").rglob("*.*"))]:
        assert "hunter2" not in path.read_text()
        # documentation writes placeholders (redis://:PASSWORD@...), never a password
        written = [p for p in re.findall(r"rediss?://:([^$@\s{]+)@", path.read_text())
                   if not re.fullmatch(r"[A-Z_]+|<[^>]+>", p)]
        assert not written, f"{path}: a password in a URL"


def test_every_service_command_is_a_working_graceq_command(tmp_path):
    services = load_compose(ENV)["services"]
    for name, service in services.items():
        if name == "redis":
            continue
        cmd = service["command"]
        assert cmd[0] == "graceq"
        # all options are parsed before --help is acted on: a wrong option fails here
        proc = subprocess.run(_graceq() + cmd[1:] + ["--help"], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, **container_environment(service, tmp_path)))
        assert proc.returncode == 0, f"{name}: {' '.join(cmd)} --help failed: {proc.stderr}"
        assert f"Usage: graceq {cmd[1]}" in proc.stdout.replace("python -m graceq.cli", "graceq")
    proc = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0


def test_image_files_are_consistent():
    dockerfile = (REPO / "workers" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile, re.M):
        for part in source.split():
            assert (REPO / part).exists(), f"workers/Dockerfile copies {part}, which does not exist"
    assert "USER graceq" in dockerfile
    entry = REPO / "workers" / "entrypoint.sh"
    assert os.access(entry, os.X_OK)
    assert subprocess.run(["sh", "-n", str(entry)]).returncode == 0
    build = load_compose(ENV)["services"]["worker-dft"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).resolve() == (REPO / "workers" / "Dockerfile")


@pytest.fixture
def secured_redis(tmp_path):
    port = free_port()
    password = secrets.token_hex(12)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", password], stdout=subprocess.DEVNULL)
    wait_port(port, proc, "redis-server")
    yield port, password
    proc.terminate()
    proc.wait(timeout=10)


def test_entrypoint_waits_for_redis_and_never_prints_the_password(secured_redis):
    port, password = secured_redis
    entry = str(REPO / "workers" / "entrypoint.sh")
    good = dict(os.environ, GRACEQ_BROKER_URL=f"redis://:{password}@127.0.0.1:{port}/0")
    proc = subprocess.run([entry, "graceq", "--version"], capture_output=True, text=True, env=good, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "version" in proc.stdout
    bad = dict(os.environ, GRACEQ_BROKER_URL=f"redis://:wrong-{password}@127.0.0.1:{port}/0")
    proc = subprocess.run([entry, "graceq", "--version"], capture_output=True, text=True, env=bad, timeout=60)
    assert proc.returncode != 0 and "refused the password" in proc.stderr
    assert password not in proc.stdout + proc.stderr
    unreachable = dict(os.environ, GRACEQ_BROKER_URL=f"redis://:{password}@127.0.0.1:{free_port()}/0",
                       GRACEQ_BROKER_WAIT="2")
    proc = subprocess.run([entry, "graceq", "--version"], capture_output=True, text=True, env=unreachable,
                          timeout=60)
    assert proc.returncode != 0 and "unreachable" in proc.stderr and password not in proc.stderr


def test_systemd_units_verify_and_run_graceq_commands(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    graceq = shutil.which("graceq") or str(Path(sys.executable).with_name("graceq"))
    units = sorted((REPO / "deploy" / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"graceq-coordinator@.service", "graceq-flower.service"}
    instances = []
    for unit in units:
        text = unit.read_text().replace("/opt/graceq/venv/bin/graceq", graceq)
        name = unit.name.replace("@.service", "@demo.service" if "coordinator" in unit.name else "@dft.service")
        (tmp_path / name).write_text(text)
        instances.append(name)
        assert "EnvironmentFile=/etc/graceq/graceq.env" in text
        assert not SECRET_KEY.search(" ".join(l for l in text.splitlines() if l.startswith(("ExecStart", "Environment="))))
        execstart = next(l for l in text.splitlines() if l.startswith("ExecStart=")).split("=", 1)[1].split()
        args = [a.replace("%i", "dft" if "worker" in unit.name else "demo") for a in execstart[1:]]
        if args[0] == "run":
            args[1] = str(tmp_path)  # the campaign path: only the options matter for --help
        proc = subprocess.run([graceq, *args, "--help"], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, GRACEQ_BROKER_URL="redis://127.0.0.1:1/0"))
        assert proc.returncode == 0, f"{unit.name}: {' '.join(execstart)} --help: {proc.stderr}"
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *[f"./{n}" for n in instances]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


# -- (b) the stack as local processes ---------------------------------------------------------------
class Stack:
    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(list(self.procs.values())):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _roy_campaign_files(folder: Path) -> None:
    """A 53-structure ROY pool (every 5th of ROY-264) and its settings, as a user puts them in campaigns/."""
    import tomli_w
    from ase.io import read, write

    folder.mkdir(parents=True, exist_ok=True)
    frames = read(str(files("graceq") / "data" / "roy264" / "roy264.extxyz"), ":")[::5]
    write(folder / "roy53.extxyz", frames, format="extxyz")
    (folder / "roy.toml").write_text(tomli_w.dumps({
        "campaign": {"pool": "roy53.extxyz", "unit": "kJ/mol", "window": 5.0, "n_init": 10, "n_batch": 5,
                     "budget": 25, "seed": 7},
        "engine": {"engine": "replay"},
        "descriptor": {"chunk_size": 8, "fit_sample": 53},
        "model": {"n_members": 64, "members_per_task": 16},
        "runtime": {"workers": 2},
    }))


def _get(url: str, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _picks(campaign: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(campaign / "state.sqlite") as db:
        return db.execute("SELECT idx, iteration FROM picks ORDER BY iteration, rank").fetchall()


def test_the_declared_commands_run_a_campaign_as_local_processes(tmp_path):
    import redis as redis_client

    campaigns, flower_dir = tmp_path / "campaigns", tmp_path / "flower"
    flower_dir.mkdir()
    _roy_campaign_files(campaigns)
    redis_port, flower_port = free_port(), free_port()
    env_vars = dict(ENV, GRACEQ_CAMPAIGN="roy", GRACEQ_SETTINGS="roy.toml", GRACEQ_FEATURIZE_CONCURRENCY="1",
                    GRACEQ_FIT_CONCURRENCY="1", GRACEQ_DFT_CONCURRENCY="1")
    services = load_compose(env_vars)["services"]

    def local(value: str) -> str:
        """What a container would see differently: the Redis host and the mount points."""
        value = value.replace("@redis:6379/", f"@127.0.0.1:{redis_port}/")
        for mount, folder in (("/campaigns", campaigns), ("/flower", flower_dir)):
            if value == mount or value.startswith(mount + "/"):
                value = str(folder) + value[len(mount):]
        return value

    def argv_env(name: str) -> tuple[list[str], dict]:
        service = services[name]
        cmd = [local(a) for a in service["command"]]
        if name == "redis":
            env = {k: local(v) for k, v in environment_of(service).items()}
        else:
            env = {k: local(v) for k, v in container_environment(service, tmp_path).items()}
        return (_graceq() + cmd[1:] if cmd[0] == "graceq" else cmd), dict(os.environ, **env)

    stack = Stack(tmp_path)
    try:
        argv, env = argv_env("redis")
        (tmp_path / "redis-data").mkdir()
        redis = stack.start("redis", argv + ["--port", str(redis_port), "--bind", "127.0.0.1",
                                             "--dir", str(tmp_path / "redis-data")], env)
        wait_port(redis_port, redis, "redis-server")
        client = redis_client.Redis(port=redis_port, password=ENV["REDIS_PASSWORD"])
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis(port=redis_port).ping()

        for name in ("worker-featurize", "worker-fit", "worker-dft"):
            argv, env = argv_env(name)
            stack.start(name, argv, env)
        argv, env = argv_env("worker-dft")  # docker compose up --scale worker-dft=2
        stack.start("worker-dft-2", argv, env)
        argv, env = argv_env("flower")
        argv[argv.index("--address") + 1] = "127.0.0.1"
        argv[argv.index("--port") + 1] = str(flower_port)
        flower = stack.start("flower", argv, env)
        wait_port(flower_port, flower, "flower")

        argv, env = argv_env("coordinator")
        assert argv[-4:] == [str(campaigns / "roy"), "--settings", str(campaigns / "roy.toml"), "--quiet"]
        coordinator = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=420)
        assert coordinator.returncode == 0, f"coordinator failed:\n{coordinator.stdout}\n{coordinator.stderr}"

        # Flower behind basic auth sees every worker
        assert _get(f"http://127.0.0.1:{flower_port}/api/workers")[0] == 401
        status, body = _get(f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", ENV["GRACEQ_FLOWER_BASIC_AUTH"])
        assert status == 200
        workers = json.loads(body)
        assert sum("graceq-dft-" in w for w in workers) == 2
        assert any("graceq-featurize-" in w for w in workers) and any("graceq-fit-" in w for w in workers)
    finally:
        stack.stop()

    campaign = campaigns / "roy"
    summary = json.loads((campaign / "summary.json").read_text())
    assert summary["n_pool"] == 53 and summary["iterations"]
    assert summary["n_reference_calls"] == len(_picks(campaign)) <= 25
    assert ENV["REDIS_PASSWORD"] not in coordinator.stdout + coordinator.stderr
    # each queue's tasks ran on that queue's service
    def ran(task: str, log: str) -> int:  # the worker's "Task NAME[id] succeeded" lines
        return len(re.findall(rf"Task {re.escape(task)}\[[^\]]+\] succeeded", log))

    assert ran("graceq.featurize", stack.log("worker-featurize")) >= 7  # 53 structures, chunks of 8
    assert ran("graceq.fit_members", stack.log("worker-fit")) >= 4  # 64 members, 16 per task
    dft = [ran("graceq.run_reference", stack.log(n)) for n in ("worker-dft", "worker-dft-2")]
    assert sum(dft) >= summary["n_reference_calls"] and min(dft) > 0, dft  # both replicas took jobs
    for other in ("worker-featurize", "worker-fit"):
        assert ran("graceq.run_reference", stack.log(other)) == 0
    assert ran("graceq.featurize", stack.log("worker-fit") + stack.log("worker-dft")) == 0
    # Redis kept its append-only file on the data volume
    assert any((tmp_path / "redis-data").rglob("*.aof"))

    # the same campaign, embedded (no broker): the same picks
    embedded = subprocess.run(_graceq() + ["run", str(tmp_path / "embedded"), "--settings",
                                           str(campaigns / "roy.toml"), "--quiet"],
                              capture_output=True, text=True, timeout=420,
                              env={k: v for k, v in os.environ.items() if k != "GRACEQ_BROKER_URL"})
    assert embedded.returncode == 0, embedded.stderr
    assert _picks(tmp_path / "embedded") == _picks(campaign)
