"""Benchmark task dispatch: embedded folder broker against Redis, and the per-task cost of Redis.

    python benchmarks/dispatch.py [--json] [--pool PATH] [--iterations N] [--tasks 1000]

In one run, on the same pool and the same settings (the bundled ROY-264 and the demo's settings
unless told otherwise):

1. ``embedded``: ``graceq run`` with no broker (kombu's folder transport, one worker with 2
   processes started by graceq);
2. ``redis``: ``graceq run --broker redis://...`` with 2 separate ``graceq worker -c 1`` processes
   already running (a private redis-server on a free port, nothing on disk).

Each campaign runs ``--max-iterations N`` iterations in one coordinator process. An iteration's wall
time is the time between consecutive iterations' commits in ``state.sqlite`` (reference jobs, the
committee fit through the ``fit`` queue, the decision); iteration 0 also waits for the featurisation,
reported apart. Both campaigns must pick the same structures (same seed).

3. ``noop``: 1,000 sequential round trips of ``graceq.noop`` through Redis to one worker process
   (send, execute, result back through the Redis result backend): median, p99, max in ms; and the
   throughput of 1,000 no-ops sent at once to 2 worker processes.

``--signing`` measures the cost of message signing instead (no campaigns): the no-op round trip
through Redis to one worker without a key and with ``GRACEQ_SIGNING_KEY`` (the sender adds an
HMAC-SHA256 header, the worker verifies it before the task runs), in alternating blocks
(A B A B ...) so that a change of machine load hits both alike; and the CPU time of one signature
in-process (µs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

GRACEQ = [sys.executable, "-m", "graceq.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)


def start_worker(broker: str, queues: str, name: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        GRACEQ + ["worker", "--queues", queues, "--concurrency", "1", "--name", name, "--broker", broker,
                  "--loglevel", "WARNING"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"),
    )


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_workers(broker: str, n: int, timeout: float = 60) -> None:
    """Until n workers answer a ping (they consume as soon as they answer)."""
    from graceq import app as app_module

    app_module.configure(broker_url=broker)
    deadline = time.time() + timeout
    while time.time() < deadline:
        replies = app_module.app.control.ping(timeout=1.0) or []
        if len(replies) >= n:
            return
    raise RuntimeError(f"only {len(replies)} of {n} workers answered within {timeout} s")


def settings_toml(pool: Path, seed: int) -> str:
    import tomli_w

    return tomli_w.dumps({
        "campaign": {"pool": str(pool), "unit": "kJ/mol", "window": 5.0, "n_init": 20, "n_batch": 10,
                     "p_conv_target": 0.99, "seed": seed},
        "engine": {"engine": "replay"},
        "runtime": {"workers": 2},
    })


def run_campaign(folder: Path, settings: Path, iterations: int, broker: str | None) -> dict:
    """Run a fresh campaign for `iterations` iterations; the per-iteration wall times from the store."""
    argv = GRACEQ + ["run", str(folder), "--settings", str(settings), "--quiet",
                     "--max-iterations", str(iterations)]
    env = dict(os.environ)
    env.pop("GRACEQ_BROKER_URL", None)
    if broker:
        argv += ["--broker", broker]
    start = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    end = time.time()
    total = end - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with sqlite3.connect(folder / "state.sqlite") as db:
        finished = [r[0] for r in db.execute("SELECT finished FROM iterations ORDER BY iteration")]
        picks = db.execute("SELECT idx, iteration FROM picks ORDER BY iteration, rank").fetchall()
    features_at = (folder / "artifacts" / "features.npy").stat().st_mtime
    per_iteration = [b - a for a, b in zip(finished, finished[1:])]
    return {
        "total_s": round(total, 2),
        "featurize_s": round(features_at - start, 2),
        "iteration0_s": round(finished[0] - features_at, 2),
        "iteration_s": [round(t, 2) for t in per_iteration],
        "iteration_median_s": round(statistics.median(per_iteration), 2) if per_iteration else None,
        "after_last_iteration_s": round(end - finished[-1], 2),  # summary, stopping workers, exit
        "iterations": len(finished),
        "picks": picks,
    }


def noop_round_trips(broker: str, n: int, raw: bool = False):
    """n sequential send -> execute -> result round trips of graceq.noop; times in ms (all, with raw)."""
    from graceq import app as app_module
    from graceq.tasks import noop

    app_module.configure(broker_url=broker)
    for k in range(20):  # warm up connections and the worker's pool
        noop.apply_async(args=[k], queue="dft").get(timeout=30)
    times = []
    for k in range(n):
        start = time.perf_counter()
        value = noop.apply_async(args=[k], queue="dft").get(timeout=30)
        times.append((time.perf_counter() - start) * 1000)
        assert value == k
    if raw:
        return times
    times.sort()
    return {
        "tasks": n,
        "median_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[int(0.99 * (n - 1))], 2),
        "max_ms": round(times[-1], 2),
        "mean_ms": round(statistics.fmean(times), 2),
    }


def noop_throughput(broker: str, n: int) -> dict:
    """n no-ops sent at once, collected in order; tasks per second end to end."""
    from celery import group

    from graceq.tasks import noop

    start = time.perf_counter()
    result = group(noop.s(k).set(queue="dft") for k in range(n)).apply_async()
    values = result.get(timeout=300)
    elapsed = time.perf_counter() - start
    assert values == list(range(n))
    return {"tasks": n, "workers": 2, "wall_s": round(elapsed, 2), "tasks_per_s": round(n / elapsed, 1)}


def signing_overhead(work: Path, n: int, blocks: int = 3) -> dict:
    """No-op round trips without and with message signing, alternating blocks of n; times in ms."""
    from graceq import trust

    redis, broker = start_redis(work)
    procs = [redis]
    times: dict[str, list[float]] = {"unsigned": [], "signed": []}
    key = os.urandom(32).hex()
    try:
        for block in range(blocks):
            for mode in ("unsigned", "signed"):
                if mode == "signed":
                    os.environ[trust.ENV_SIGNING_KEY] = key  # the sender (this process) and the worker
                else:
                    os.environ.pop(trust.ENV_SIGNING_KEY, None)
                worker = start_worker(broker, "dft", f"sign-{mode}-{block}@%h", work / f"worker-{mode}.log")
                procs.append(worker)
                wait_workers(broker, 1)
                block_times = noop_round_trips(broker, n, raw=True)
                times[mode] += block_times
                stop([worker])
                procs.remove(worker)
                if mode == "signed":
                    log = (work / "worker-signed.log").read_text()
                    assert "message signing: required" in log, "the worker did not require signatures"
                    assert "refused task" not in log, "the signing worker refused a signed message"
    finally:
        os.environ.pop(trust.ENV_SIGNING_KEY, None)
        stop(list(reversed(procs)))
    out = {}
    for mode, values in times.items():
        values.sort()
        out[mode] = {"tasks": len(values), "median_ms": round(statistics.median(values), 3),
                     "p99_ms": round(values[int(0.99 * (len(values) - 1))], 3),
                     "mean_ms": round(statistics.fmean(values), 3)}
    out["median_overhead_ms"] = round(out["signed"]["median_ms"] - out["unsigned"]["median_ms"], 3)
    args = ["/srv/graceq/campaigns/roy-264-production", 123, "0123_ABCDEF"]
    k = 20000
    start = time.perf_counter()
    for i in range(k):
        trust.signature(key.encode(), "graceq.run_reference", f"graceq-0123456789ab-it0007-dft-{i:06d}", args, {})
    out["signature_cpu_us"] = round((time.perf_counter() - start) / k * 1e6, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=str(files("graceq") / "data" / "roy264" / "roy264.extxyz"))
    parser.add_argument("--iterations", type=int, default=4, help="iterations per campaign")
    parser.add_argument("--tasks", type=int, default=1000, help="no-op round trips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--signing", action="store_true",
                        help="measure message signing (no-op round trips without/with a key) instead")
    args = parser.parse_args()

    if args.signing:
        work = Path(tempfile.mkdtemp(prefix="graceq-signing-"))
        try:
            load = [round(x, 2) for x in os.getloadavg()]
            figures = signing_overhead(work, args.tasks)
            figures.update(cores=os.cpu_count(), load_average_before=load,
                           load_average_after=[round(x, 2) for x in os.getloadavg()])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if args.json:
            print(json.dumps(figures, indent=1))
            return
        u, g = figures["unsigned"], figures["signed"]
        print(f"{figures['cores']} cores (load {figures['load_average_before']} -> {figures['load_average_after']})")
        print(f"graceq.noop round trip, unsigned: median {u['median_ms']} ms, p99 {u['p99_ms']} ms ({u['tasks']} tasks)")
        print(f"graceq.noop round trip, signed:   median {g['median_ms']} ms, p99 {g['p99_ms']} ms ({g['tasks']} tasks)")
        print(f"signing overhead per task: {figures['median_overhead_ms']} ms (median); one HMAC-SHA256 signature "
              f"{figures['signature_cpu_us']} µs of CPU")
        return

    work = Path(tempfile.mkdtemp(prefix="graceq-dispatch-"))
    procs: list[subprocess.Popen] = []
    try:
        pool = work / "pool.extxyz"
        shutil.copyfile(args.pool, pool)
        settings = work / "settings.toml"
        settings.write_text(settings_toml(pool, args.seed))
        # the machine is shared: the load says how much the figures owe to other processes
        figures: dict = {"pool": args.pool, "cores": os.cpu_count(),
                         "load_average_before": [round(x, 2) for x in os.getloadavg()]}

        figures["embedded"] = run_campaign(work / "embedded", settings, args.iterations, None)

        redis, broker = start_redis(work)
        procs.append(redis)
        workers = [start_worker(broker, "featurize,fit,dft", f"bench{k}@%h", work / f"worker{k}.log")
                   for k in range(2)]
        procs += workers
        wait_workers(broker, 2)
        figures["redis"] = run_campaign(work / "redis", settings, args.iterations, broker)
        same = figures["embedded"].pop("picks") == figures["redis"].pop("picks")
        figures["same_picks"] = same

        # the no-op overhead: one worker for the round trips, both for the throughput
        stop(workers[1:])
        figures["noop_round_trip"] = noop_round_trips(broker, args.tasks)
        workers.append(start_worker(broker, "dft", "bench2@%h", work / "worker2.log"))
        procs.append(workers[-1])
        wait_workers(broker, 2)
        figures["noop_throughput"] = noop_throughput(broker, args.tasks)
        figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        stop(list(reversed(procs)))
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(figures, indent=1))
        return
    e, r, n, t = figures["embedded"], figures["redis"], figures["noop_round_trip"], figures["noop_throughput"]
    print(f"pool {figures['pool']}, {figures['cores']} cores (load {figures['load_average_before']} -> "
          f"{figures['load_average_after']}); same picks: {figures['same_picks']}")
    for label, f in (("embedded (folder broker, 2 processes)", e), ("redis + 2 worker processes", r)):
        print(f"{label:40s} featurize {f['featurize_s']:7.2f} s, iteration 0 {f['iteration0_s']:6.2f} s, "
              f"later iterations median {f['iteration_median_s']} s {f['iteration_s']}, total {f['total_s']} s")
    print(f"graceq.noop round trip through Redis ({n['tasks']} tasks): median {n['median_ms']} ms, "
          f"p99 {n['p99_ms']} ms, max {n['max_ms']} ms")
    print(f"graceq.noop fan-out of {t['tasks']} to 2 workers: {t['tasks_per_s']} tasks/s")


if __name__ == "__main__":
    main()
