"""The provenance record for summary.json, on a real embedded campaign."""

from __future__ import annotations

import calendar
import json
import time
from importlib import metadata

import pytest

from conftest import run_cli, settings_text
from graceq.jobs import job_table
from graceq.provenance import provenance, settings_hash


@pytest.fixture(scope="module")
def campaign(roy_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("provenance")
    settings = folder / "settings.toml"
    settings.write_text(settings_text(roy_small))
    start = time.time()
    run_cli("run", str(folder / "campaign"), "--settings", str(settings), "--quiet", "--max-iterations", "1")
    return folder / "campaign", start, time.time()


def test_provenance_records_versions_settings_times_and_job_hours(campaign):
    root, start, end = campaign
    record = provenance(root)
    json.dumps(record)  # JSON-safe, as summary.json needs
    import graceq

    assert record["graceq"] == graceq.__version__
    assert record["dependencies"]["numpy"] == metadata.version("numpy")
    assert record["dependencies"]["ase"] == metadata.version("ase")
    assert record["settings_sha256"] == settings_hash(root) and len(record["settings_sha256"]) == 64
    assert start - 5 <= calendar.timegm(time.strptime(record["created"], "%Y-%m-%dT%H:%M:%SZ")) <= end
    assert 0 < record["wall_time_s"] <= end - start + 5
    jobs = [j for j in job_table(root) if j.state in ("converged", "unstable", "failed")]
    assert record["reference_jobs"]["n_finished"] == len(jobs) == 12
    assert record["reference_jobs"]["wall_hours"] == pytest.approx(sum(j.run_time_s for j in jobs) / 3600, abs=1e-5)
    assert record["reference_jobs"]["cpu_hours"] is None


def test_the_settings_hash_changes_with_a_setting_and_not_with_layout(campaign, tmp_path):
    import shutil

    root, _, _ = campaign
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    before = settings_hash(copy)
    text = (copy / "settings.toml").read_text()
    (copy / "settings.toml").write_text("# a comment changes nothing\n" + text)
    assert settings_hash(copy) == before
    (copy / "settings.toml").write_text(text.replace("budget = 0", "budget = 30"))
    assert settings_hash(copy) != before
