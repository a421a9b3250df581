"""`graceq jobs` and `graceq retry` on a real embedded campaign whose replay source lacks some answers.

The replay source (a CSV) first misses every third structure: those reference jobs fail. `graceq jobs`
lists them (state, attempts, worker, start, run time, outcome, log); after the missing answers are
added, `graceq retry --failed` and `graceq run` send exactly those jobs again, and the picks (the
decisions already taken) stay as they were, in the same order.
"""

from __future__ import annotations

import csv
import socket
import sqlite3
from pathlib import Path

import pytest
import tomli_w
from ase.io import read

from conftest import picks_of, run_cli
from graceq.jobs import RetryError, job_table, retry
from graceq.lock import CampaignLocked, CoordinatorLock


def _source(path: Path, frames, skip: set[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "energy_ref"])
        for atoms in frames:
            if str(atoms.info["name"]) not in skip:
                writer.writerow([atoms.info["name"], repr(float(atoms.info["energy_ref"]))])
    return path


@pytest.fixture(scope="module")
def failed_campaign(roy_small, tmp_path_factory):
    """A campaign that stopped on its budget (18 calls, 2 iterations) with some jobs failed."""
    folder = tmp_path_factory.mktemp("jobs")
    frames = read(roy_small, ":")
    skip = {str(a.info["name"]) for k, a in enumerate(frames) if k % 3 == 0}
    source = _source(folder / "answers.csv", frames, skip)
    settings = folder / "settings.toml"
    settings.write_text(tomli_w.dumps({
        "campaign": {"pool": str(roy_small), "unit": "kJ/mol", "window": 5.0, "n_init": 12, "n_batch": 6,
                     "seed": 3, "budget": 18},
        "model": {"n_members": 64, "members_per_task": 16}, "descriptor": {"chunk_size": 8},
        "engine": {"engine": "replay", "source": str(source)},
    }))
    campaign = folder / "campaign"
    run_cli("run", str(campaign), "--settings", str(settings), "--quiet")
    return campaign, frames, source, skip


def test_jobs_lists_every_reference_job_with_its_outcome(failed_campaign):
    campaign, _, _, skip = failed_campaign
    table = job_table(campaign)
    assert [j.idx for j in table] == [i for i, _ in picks_of(campaign)]
    failed = [j for j in table if j.state == "failed"]
    assert failed and {j.name for j in failed} <= skip
    for j in table:
        assert j.attempts == 1 and j.host == socket.gethostname()
        assert j.started is not None and 0 <= j.run_time_s < 600
        assert j.log is not None and Path(j.log).exists()
    assert all("no entry named" in j.message for j in failed)
    out = run_cli("jobs", str(campaign), "--state", "failed").stdout.splitlines()
    assert out[0].split()[:4] == ["name", "iter", "state", "attempts"]
    assert len(out) == 1 + len(failed)
    assert all(" failed " in line for line in out[1:])


def test_retry_sends_failed_jobs_again_and_keeps_the_decisions(failed_campaign):
    campaign, frames, source, skip = failed_campaign
    before = picks_of(campaign)
    failed = sorted(j.name for j in job_table(campaign) if j.state == "failed")
    converged = next(j.name for j in job_table(campaign) if j.state == "converged")

    # refused: a job whose result stands, a name that is not there, a coordinator that runs
    with pytest.raises(RetryError, match=f"{converged} is converged"):
        retry(campaign, [converged])
    with pytest.raises(RetryError, match="no reference job for 'nonesuch'"):
        retry(campaign, ["nonesuch"])
    holder = CoordinatorLock(campaign).acquire()
    try:
        with pytest.raises(CampaignLocked):
            retry(campaign, failed=True)
    finally:
        holder.release()
    assert sorted(j.name for j in job_table(campaign) if j.state == "failed") == failed

    out = run_cli("retry", str(campaign), "--failed").stdout
    assert f"{len(failed)} job" in out and all(name in out for name in failed)
    assert {j.name: j.state for j in job_table(campaign) if j.name in failed} == {n: "waiting" for n in failed}
    _source(source, frames, skip=set())  # the missing answers now exist
    run_cli("run", str(campaign), "--quiet")

    assert picks_of(campaign) == before, "a retry must not change the picks already taken"
    table = {j.name: j for j in job_table(campaign)}
    assert all(table[n].state == "converged" and table[n].retries == 1 for n in failed)
    with sqlite3.connect(campaign / "state.sqlite") as db:
        history = sorted(r[0] for r in db.execute(
            "SELECT s.name FROM retried_results r JOIN structures s USING (idx) WHERE r.status = 'failed'"))
        stats = db.execute("SELECT stats FROM iterations ORDER BY iteration DESC LIMIT 1").fetchone()[0]
    assert history == failed
    assert '"stop": "budget"' in stats
    assert "0 failed" in run_cli("status", str(campaign)).stdout
