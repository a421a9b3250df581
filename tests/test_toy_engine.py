"""A new scheduler engine is one file: a toy non-blocking engine, defined here, runs a campaign.

``ToyBatchEngine`` stands for a batch scheduler (PBS, LSF, Flux): ``submit`` writes the job and
starts it as a detached process, then returns at once; the job writes ``result.json`` when it ends,
which the base class's ``poll`` reads. Nothing outside this file knows it: the campaign names it as
``engine = "test_toy_engine:ToyBatchEngine"``, and real Celery workers run the campaign.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import picks_of, run_cli, settings_text

from graceq.engines.replay import ReplayEngine

JOB = """
import json, os, sys, time
workdir = sys.argv[1]
time.sleep(float(sys.argv[2]))
record = json.load(open(os.path.join(workdir, "answer.json")))
record["scheduler_pid"] = os.getpid()
tmp = os.path.join(workdir, ".result.tmp")
json.dump(record, open(tmp, "w"))
os.replace(tmp, os.path.join(workdir, "result.json"))
"""


class ToyBatchEngine(ReplayEngine):
    """Replay answers, handed out by a detached 'scheduler' process a while after submission."""

    name = "toy-batch"
    SETTINGS = ReplayEngine.SETTINGS | {"job_s"}

    def __init__(self, settings, unit, pool_source=None):
        settings = dict(settings)
        self.job_s = float(settings.pop("job_s", 1.0))
        super().__init__(settings, unit, pool_source)

    def submit(self, atoms, name, workdir, heartbeat=None):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if (workdir / "answer.json").exists():  # submitted before: never a second job
            return
        (workdir / "answer.json").write_text(json.dumps(self.run(atoms, name).to_json()))
        subprocess.Popen([sys.executable, "-c", JOB, str(workdir), str(self.job_s)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_toy_batch_scheduler_engine_runs_a_campaign_with_no_change_outside_this_file(roy_small, tmp_path):
    tests_dir = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    campaign = {"n_init": 12, "budget": 18}
    runs = {}
    for label, engine in (("replay", {"engine": "replay"}),
                          ("toy", {"engine": "test_toy_engine:ToyBatchEngine", "job_s": 1.5})):
        folder = tmp_path / label
        folder.mkdir()
        (folder / "settings.toml").write_text(settings_text(roy_small, campaign=campaign, engine=engine))
        run_cli("run", str(folder / "campaign"), "--settings", str(folder / "settings.toml"), "--quiet",
                env=env, timeout=1500)
        runs[label] = folder / "campaign"
    toy = runs["toy"]
    assert picks_of(toy) == picks_of(runs["replay"])  # the same answers, so the same decisions
    picks = [i for i, _ in picks_of(toy)]
    assert len(picks) == 18
    for idx in picks:
        job = toy / "jobs" / f"{idx:06d}"
        # the task returned before the job ended (the scheduler held it), and the coordinator
        # collected the job's own record by polling the engine
        assert (job / "submitted.json").exists(), f"job {idx} was not left to the scheduler"
        record = json.loads((toy / "results" / f"{idx:06d}.json").read_text())
        assert record["idx"] == idx and record["scheduler_pid"] > 0
        assert record["status"] in ("converged", "unstable", "failed")
