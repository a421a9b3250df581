"""The campaign store (issue 12): checkpointed at every commit, read-only for `status`, artifacts
checked when read, and `init` refusing another campaign's files.

Real processes and files: a writer SIGKILLed by the kernel, SQLite's own files copied as a backup
would copy them, artifacts truncated on disk and recomputed by real embedded Celery workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, settings_text
from graceq.store import ArtifactError, CampaignStore, artifact_ok, load_artifact

WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from graceq.store import CampaignStore

    store = CampaignStore(sys.argv[1])
    store.add_structures(["a", "b", "c"], np.array([10, 10, 10]), np.array([1.0, 2.0, 3.0]))
    store.set_meta("campaign_id", "killed")
    with store.transaction() as db:
        store.add_picks(db, 0, [0, 1])
    store.add_result(0, "converged", -1.0, 5, "")
    store.add_result(1, "converged", -2.0, 6, "")
    with store.transaction() as db:       # the commit that records iteration 0 and its picks
        store.add_iteration(db, 0, {"p_conv": 0.5})
        store.add_picks(db, 1, [2])
    print("committed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit: the WAL is never cleaned up
""")


def test_a_copy_without_the_wal_keeps_the_campaign_after_sigkill(tmp_path):
    """Issue 12: after SIGKILL state.sqlite was 4 KB and everything lived in -wal."""
    live, copy = tmp_path / "live", tmp_path / "copy"
    proc = subprocess.run([sys.executable, "-c", WRITER, str(live)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "committed" in proc.stdout, proc.stderr
    assert (live / "state.sqlite-wal").exists()  # the writer did not get to close its connection
    copy.mkdir()
    shutil.copy(live / "state.sqlite", copy / "state.sqlite")  # a backup that forgot -wal and -shm
    store = CampaignStore(copy, readonly=True)
    assert store.n_structures() == 3
    assert store.get_meta("campaign_id") == "killed"
    assert store.picks() == [(0, 0), (1, 0), (2, 1)]
    assert sorted(store.results()) == [0, 1]
    assert [it["iteration"] for it in store.iterations()] == [0]
    store.close()


def test_checkpoint_after_every_transaction_empties_the_wal(tmp_path):
    store = CampaignStore(tmp_path)
    store.add_structures(["a"], np.array([4]), np.array([0.0]))
    assert (tmp_path / "state.sqlite-wal").stat().st_size == 0
    assert (tmp_path / "state.sqlite").stat().st_size > 4096
    store.close()


def test_readonly_store_never_creates_or_changes_state(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no campaign here"):
        CampaignStore(empty, readonly=True)
    assert list(empty.iterdir()) == []
    (empty / "state.sqlite").touch()  # what an old `graceq status` left behind
    with pytest.raises(FileNotFoundError, match="no campaign here"):
        CampaignStore(empty, readonly=True)
    assert (empty / "state.sqlite").stat().st_size == 0

    store = CampaignStore(tmp_path / "c")
    store.add_structures(["a"], np.array([4]), np.array([0.0]))
    store.close()
    before = (tmp_path / "c" / "state.sqlite").read_bytes()
    reader = CampaignStore(tmp_path / "c", readonly=True)
    assert reader.n_structures() == 1
    with pytest.raises(Exception, match="readonly"):
        reader.set_meta("x", 1)
    reader.close()
    assert (tmp_path / "c" / "state.sqlite").read_bytes() == before


def test_status_on_a_folder_without_a_campaign_says_so_and_writes_nothing(tmp_path):
    result = run_cli("status", str(tmp_path), check=False)
    assert result.returncode != 0
    assert "no campaign here" in result.stderr and "graceq init" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_a_folder_with_another_campaigns_artifacts(tmp_path, roy_small):
    settings = tmp_path / "settings.toml"
    settings.write_text(settings_text(roy_small))
    target = tmp_path / "campaign"
    (target / "artifacts").mkdir(parents=True)
    np.save(target / "artifacts" / "features.npy", np.zeros((5, 3)))  # of a 5-structure pool
    (target / "iterations" / "0000").mkdir(parents=True)
    result = run_cli("init", str(target), "--settings", str(settings), check=False)
    assert result.returncode != 0
    assert "artifacts/" in result.stderr and "iterations/" in result.stderr
    assert "new or empty directory" in result.stderr
    assert not (target / "state.sqlite").exists() and not (target / "settings.toml").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["npy", "npz", "json"])
def test_load_artifact_names_a_truncated_file_and_moves_it_aside(tmp_path, kind):
    path = tmp_path / f"thing.{kind}"
    if kind == "npy":
        np.save(path, np.arange(1000.0))
    elif kind == "npz":
        np.savez(path, coef=np.ones((64, 50)), intercept=np.zeros(64))
    else:
        path.write_text(json.dumps({"alpha": 0.1, "cv_rmse": list(range(50))}))
    assert artifact_ok(path)
    _truncate(path)
    with pytest.raises(ArtifactError, match=f"thing.{kind}.*corrupt or truncated.*thing.{kind}.corrupt"):
        load_artifact(path)
    assert not path.exists() and (tmp_path / f"thing.{kind}.corrupt").exists()
    assert not artifact_ok(path)  # missing now: to be recomputed


def test_load_artifact_checks_the_keys(tmp_path):
    path = tmp_path / "members.npz"
    np.savez(path, coef=np.ones(3))
    with pytest.raises(ArtifactError, match="missing intercept"):
        load_artifact(path, ("coef", "intercept"))
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "absent.npz")


def test_corrupt_artifacts_are_recomputed_not_a_crash_loop(tmp_path, roy_small):
    """Issue 12: a truncated members .npz crashed every resume with BadZipFile, naming no file.
    Here the features, a feature chunk, the projection, the training set, lambda and a members
    file are truncated together; the coordinator moves each aside, has it recomputed by real
    embedded workers, and gets the same features and the same committee."""
    from graceq import app as app_module
    from graceq.coordinator import Coordinator, EmbeddedWorkers
    from graceq.dispatcher import Dispatcher

    settings = tmp_path / "settings.toml"
    settings.write_text(settings_text(roy_small))
    campaign = tmp_path / "campaign"
    run_cli("run", str(campaign), "--settings", str(settings), "--max-iterations", "1", "--quiet")
    it0 = campaign / "iterations" / "0000"
    files = [campaign / "artifacts" / "features.npy", campaign / "artifacts" / "features" / "chunk_00001.npy",
             campaign / "artifacts" / "projection.npz", it0 / "train.npz", it0 / "lambda.json",
             it0 / "members_0016_0032.npz"]
    before = {f: load_artifact(f) for f in files}
    for f in files:
        _truncate(f)

    coordinator = Coordinator(campaign, progress=False)
    app_module.configure(embedded_dir=coordinator.paths.broker)
    with EmbeddedWorkers(coordinator.paths, 1) as workers:
        coordinator.workers = workers
        coordinator.dispatcher = Dispatcher(coordinator.paths, coordinator.store, coordinator.settings,
                                            coordinator.campaign_id, coordinator.names,
                                            check_workers=workers.check, say=lambda message: None)
        features = coordinator.ensure_features()
        coordinator.fit_committee(coordinator.view(), features, 0)
        coordinator.workers = None
    for f in files:
        assert f.with_name(f.name + ".corrupt").exists(), f
        again = load_artifact(f)
        pairs = [(again[k], before[f][k]) for k in before[f]] if isinstance(again, dict) else [(again, before[f])]
        assert not isinstance(again, dict) or sorted(again) == sorted(before[f])
        for new, old in pairs:
            new, old = np.asarray(new), np.asarray(old)
            if new.dtype.kind in "fc":  # recomputed: equal to round-off
                np.testing.assert_allclose(new, old, rtol=1e-9, atol=1e-12)
            else:
                np.testing.assert_array_equal(new, old)
    np.testing.assert_allclose(features, before[files[0]], rtol=1e-9, atol=1e-12)

    # a truncated reference result: moved aside to results/rejected/ with its reason (the job is
    # sent again), not a JSONDecodeError on every restart
    result = sorted((campaign / "results").glob("*.json"))[0]
    _truncate(result)
    idx = int(result.stem)
    assert coordinator.dispatcher._checked(idx, result, coordinator.store.jobs()[idx][0]) is None
    rejected = [f for f in (campaign / "results" / "rejected").glob(f"{result.stem}.*.json")
                if not f.name.endswith(".reason.json")]
    assert not result.exists() and len(rejected) == 1
    assert (rejected[0].with_name(rejected[0].name + ".reason.json")).exists()
