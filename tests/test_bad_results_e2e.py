"""Bad result files cost nothing (issue 10): each kind of bad file is planted in a live campaign,
rejected with a logged reason, its job is sent again, and the campaign makes the same picks as an
undisturbed run, recording nothing twice.

Needs `graceq.trust.accept_result` in the coordinator's ingest (see the issue-10 report); until the
lead wires it in after the issue-9 merge, GRACEQ_TEST_RESULT_CHECKS_WIRED=1 runs it."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import GRACEQ, picks_of, run_cli, settings_text

#: kind -> how the planted file is made from (structure name, a neighbour's name, the task id sent)
BAD = {
    "truncated": lambda name, other, tid: json.dumps({"name": name, "status": "converged", "energy": -1.0})[:25],
    "empty": lambda name, other, tid: "",
    "wrong name": lambda name, other, tid: json.dumps(
        {"name": other, "status": "converged", "energy": -1.0, "atoms": None, "task_id": tid}),
    "wrong task id": lambda name, other, tid: json.dumps(
        {"name": name, "status": "converged", "energy": -1.0, "atoms": None, "task_id": tid + "-forged"}),
    "NaN energy": lambda name, other, tid: json.dumps(
        {"name": name, "status": "converged", "energy": math.nan, "atoms": None, "task_id": tid}),
    "unknown status": lambda name, other, tid: json.dumps(
        {"name": name, "status": "done", "energy": -1.0, "atoms": None, "task_id": tid}),
}
REASONS = {"truncated": "not valid JSON", "empty": "empty file", "wrong name": "structure name",
           "wrong task id": "task id", "NaN energy": "finite energy", "unknown status": "unknown status"}


def _settings(tmp_path: Path, pool: Path) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(settings_text(pool, campaign={"n_init": 12, "n_batch": 6, "budget": 30},
                                  engine={"engine": "replay", "delay_s": 1.5}, runtime={"workers": 2}))
    return path


def test_bad_result_files_are_rejected_and_cost_nothing(roy_small, tmp_path):
    settings = _settings(tmp_path, roy_small)
    undisturbed = tmp_path / "undisturbed"
    run_cli("run", str(undisturbed), "--settings", str(settings), "--quiet", timeout=900)

    target = tmp_path / "disturbed"
    run = subprocess.Popen(GRACEQ + ["-v", "run", str(target), "--settings", str(settings), "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    planted: dict[str, int] = {}
    kinds = list(BAD)
    deadline = time.time() + 900
    while run.poll() is None and kinds:
        assert time.time() < deadline
        try:
            with sqlite3.connect(target / "state.sqlite") as db:
                jobs = db.execute("SELECT j.idx, j.task_id, s.name FROM jobs j JOIN structures s USING (idx) "
                                  "JOIN picks p USING (idx) ORDER BY p.iteration DESC, p.rank DESC").fetchall()
                names = [r[0] for r in db.execute("SELECT name FROM structures ORDER BY idx")]
        except sqlite3.Error:
            jobs = []
        for idx, task_id, name in jobs:  # the last-sent jobs of the batch: still queued
            if not kinds:
                break
            out = target / "results" / f"{idx:06d}.json"
            if idx in planted.values() or out.exists() or (target / "jobs" / f"{idx:06d}" / "lease.json").exists():
                continue
            kind = kinds.pop(0)
            out.parent.mkdir(exist_ok=True)
            with open(out.with_name(f".plant-{idx}"), "w") as fh:
                fh.write(BAD[kind](name, names[(idx + 1) % len(names)], task_id))
            os.replace(out.with_name(f".plant-{idx}"), out)
            planted[kind] = idx
            break
        time.sleep(0.05)
    out, _ = run.communicate(timeout=900)
    log = out.decode()
    assert run.returncode == 0, log
    assert sorted(planted) == sorted(BAD)

    reasons = {json.loads(p.read_text())["file"]: json.loads(p.read_text())["reason"]
               for p in (target / "results" / "rejected").glob("*.reason.json")}
    for kind, idx in planted.items():
        reason = reasons[str(target.resolve() / "results" / f"{idx:06d}.json")]
        assert REASONS[kind] in reason, (kind, reason)
    assert log.count("rejected result") == len(BAD)  # graceq.trust.reject logs each one
    assert picks_of(target) == picks_of(undisturbed)
    with sqlite3.connect(target / "state.sqlite") as db, sqlite3.connect(undisturbed / "state.sqlite") as ref:
        mine = db.execute("SELECT idx, status, energy_ref FROM results ORDER BY idx").fetchall()
        theirs = ref.execute("SELECT idx, status, energy_ref FROM results ORDER BY idx").fetchall()
        assert mine == theirs  # every planted job was re-run and recorded once, with its true answer
        attempts = dict(db.execute("SELECT idx, attempts FROM jobs").fetchall())
    assert all(attempts[idx] == 2 for idx in planted.values())
