"""The delta model's inputs: the descriptor, and the force-field energy as one more column
(``[model] force_field_feature``, ``graceq.campaign.model_inputs``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict

from conftest import load_retro, run_cli, settings_text
from graceq import campaign as cp
from graceq.config import ModelSection


def test_without_the_setting_the_inputs_are_the_descriptor():
    X = np.random.default_rng(0).random((30, 7))
    out = cp.model_inputs(X, np.arange(30.0), ModelSection())
    assert out.shape == X.shape and np.array_equal(out, X)


def test_the_column_is_the_standardised_force_field_energy_with_the_descriptors_total_variance():
    rng = np.random.default_rng(1)
    X = rng.random((50, 9)) * rng.random(9)
    e_ff = rng.normal(-120.0, 7.0, 50)
    out = cp.model_inputs(X, e_ff, ModelSection(force_field_feature=True))
    assert out.shape == (50, 10) and np.array_equal(out[:, :9], X)
    column = out[:, 9]
    # the direct formula: (E - mean) / std * sqrt(weight * sum of the descriptor's variances)
    expected = (e_ff - e_ff.mean()) / e_ff.std() * np.sqrt(cp.FORCE_FIELD_WEIGHT * X.var(axis=0).sum())
    np.testing.assert_allclose(column, expected, rtol=1e-12)
    np.testing.assert_allclose(column.var(), cp.FORCE_FIELD_WEIGHT * X.var(axis=0).sum(), rtol=1e-12)
    # one force-field energy for the whole pool: a column of zeros, never a division by zero
    flat = cp.model_inputs(X, np.full(50, -3.0), ModelSection(force_field_feature=True))
    assert np.array_equal(flat[:, 9], np.zeros(50))


def test_a_force_field_with_the_wrong_energy_scale_is_learnt_only_with_the_column():
    """A planted scale error: the reference compresses the force field's energies by 60 %
    (E_ref = 0.4 E_ff + f(x)), which a ridge on the descriptor alone cannot express. Held-out
    errors with the column are several times smaller."""
    rng = np.random.default_rng(2)
    n, p = 400, 30
    X = rng.random((n, p))
    e_ff = rng.normal(0.0, 20.0, n)                      # kJ/mol per molecule
    e_ref = 0.4 * e_ff + X @ rng.normal(0.0, 1.0, p) + rng.normal(0.0, 0.3, n)
    y = e_ref - e_ff                                     # the delta the model learns
    cv = KFold(5, shuffle=True, random_state=0)

    def rmse(inputs):
        pred = cross_val_predict(RidgeCV(alphas=np.logspace(-8, 2, 21)), inputs, y, cv=cv)
        return float(np.sqrt(np.mean((pred - y) ** 2)))

    alone = rmse(cp.model_inputs(X, e_ff, ModelSection()))
    with_column = rmse(cp.model_inputs(X, e_ff, ModelSection(force_field_feature=True)))
    assert with_column < 0.2 * alone, (alone, with_column)
    assert with_column < 1.0


def test_a_campaign_with_the_column_fits_it_in_the_workers_and_samples_in_the_descriptor(roy_small, tmp_path):
    """Real embedded campaign (Celery fit tasks read the column from train.npz): the initial batch
    is the farthest-point sampling of the descriptor, every member has one more coefficient than
    the descriptor has features, and an in-process replay with the same model inputs
    (benchmarks/retro.py) makes the same picks."""
    folder = tmp_path / "ff"
    folder.mkdir()
    (folder / "settings.toml").write_text(settings_text(roy_small, model={"force_field_feature": True}))
    run_cli("run", str(folder / "campaign"), "--settings", str(folder / "settings.toml"), "--max-iterations", "2",
            "--quiet")
    campaign = folder / "campaign"
    descriptor = np.load(campaign / "artifacts" / "features.npy")
    with sqlite3.connect(campaign / "state.sqlite") as db:
        first = [idx for (idx,) in db.execute("SELECT idx FROM picks WHERE iteration = 0 ORDER BY rank")]
    retro = load_retro()
    pool = retro.load_pool(str(roy_small), "kJ/mol")
    assert first == cp.initial_batch(descriptor, pool.energy_ff_mol, len(first)).tolist()
    members = sorted(Path(campaign).rglob("members_*.npz"))
    assert members, "no fitted members on disk"
    for path in members:
        assert np.load(path)["coef"].shape[1] == descriptor.shape[1] + 1
    check = retro.check_campaign(str(campaign), tmp_path / "cache")
    assert check["same_features"] and check["iterations_compared"] == 2
    assert check["same_picks"], check


@pytest.mark.parametrize("flag", [False, True])
def test_the_retro_benchmark_builds_the_inputs_as_the_setting_says(flag):
    retro = load_retro()
    settings = retro.make_settings("pool.extxyz", "kJ/mol", 5.0, 10, 5, 0, model={"force_field_feature": flag})
    assert settings.model.force_field_feature is flag
    assert retro.CAMPAIGN_METHODS["seed_recipe"]["model"] == {"force_field_feature": False}


def test_turning_the_column_on_in_a_running_campaign_refits_what_was_fitted_without_it(roy_small, tmp_path):
    """The setting edited between two runs: the next fit uses the column; fit files of that
    iteration left from before the change (a coordinator killed during the fit) are dropped
    and fitted again, not mixed with the new inputs."""
    import tomllib

    import tomli_w

    folder = tmp_path / "toggle"
    folder.mkdir()
    (folder / "settings.toml").write_text(settings_text(roy_small))
    campaign = folder / "campaign"
    run_cli("run", str(campaign), "--settings", str(folder / "settings.toml"), "--max-iterations", "1", "--quiet")
    width = np.load(campaign / "artifacts" / "features.npy").shape[1]
    assert np.load(campaign / "iterations" / "0000" / "members_0000_0016.npz")["coef"].shape[1] == width
    # what a coordinator killed during iteration 1's fit, before the change, would have left
    stale = campaign / "iterations" / "0001"
    stale.mkdir(parents=True, exist_ok=True)
    rows = np.arange(12)
    np.savez(stale / "train.npz", rows=rows, y=np.zeros(12), test_rows=np.arange(12, 15), y_test=np.zeros(3),
             subsets=np.zeros((64, 6), dtype=int), inputs_beyond_descriptor=np.zeros((12, 0)))
    np.savez(stale / "members_0000_0016.npz", coef=np.zeros((16, width)), intercept=np.zeros(16))
    settings = tomllib.loads((campaign / "settings.toml").read_text())
    settings.setdefault("model", {})["force_field_feature"] = True
    (campaign / "settings.toml").write_text(tomli_w.dumps(settings))
    run_cli("run", str(campaign), "--max-iterations", "1", "--quiet")
    for path in sorted(stale.glob("members_*.npz")):
        assert np.load(path)["coef"].shape[1] == width + 1, path
    assert np.load(stale / "train.npz")["inputs_beyond_descriptor"].shape[1] == 1


def test_an_async_campaign_with_the_column_replays_its_decisions_from_the_arrival_log(roy_small, tmp_path):
    """Asynchronous mode: the refits run through the fit tasks with the column, the decisions in
    the span of the inputs (steering), and every decision made again from the arrival log gives
    the same picks."""
    from graceq.coordinator import Coordinator

    (tmp_path / "settings.toml").write_text(settings_text(
        roy_small, campaign={"mode": "async", "slots": 4, "refit_every": 3, "n_init": 12, "budget": 24},
        model={"force_field_feature": True}, engine={"engine": "replay", "delay_s": 0.3}))
    target = tmp_path / "campaign"
    run_cli("run", str(target), "--settings", str(tmp_path / "settings.toml"), "--quiet")
    width = np.load(target / "artifacts" / "features.npy").shape[1]
    members = sorted(target.rglob("members_*.npz"))
    assert len(members) >= 8  # the first fit and at least one refit, 4 files of 16 members each
    assert all(np.load(path)["coef"].shape[1] == width + 1 for path in members)
    coordinator = Coordinator(target, progress=False)
    stored: dict[int, list[int]] = {}
    for idx, it in coordinator.store.picks():
        if it:
            stored.setdefault(it, []).append(idx)
    replayed = {n: picks for n, picks in coordinator.replay_decisions().items() if picks}
    assert stored and replayed == stored
