"""Settings: defaults that follow DESIGN.md, a TOML round trip, and the batch size by pool size."""

from __future__ import annotations

import pytest

from graceq.config import ConfigError, batch_size, load_settings, settings_from_dict, write_settings


@pytest.mark.parametrize("n_pool, expected", [(100, 5), (264, 13), (499, 24), (500, 50), (1999, 50),
                                              (2000, 100), (100_000, 100)])
def test_default_batch_size_follows_the_pool_size(n_pool, expected):
    assert batch_size(None, n_pool) == expected


def test_an_explicit_batch_size_wins():
    assert batch_size(7, 100_000) == 7


def test_defaults_are_the_seed_settings(tmp_path):
    s = settings_from_dict({"campaign": {"pool": "pool.extxyz"}})
    assert (s.descriptor.n_max, s.descriptor.l_max, s.descriptor.cutoff, s.descriptor.n_compressed) == (14, 9, 4.5, 5)
    assert (s.model.n_members, s.model.subsample, s.model.cv, s.model.train_fraction) == (256, 0.5, 5, 0.8)
    assert s.model.alphas == pytest.approx([10.0**k for k in range(-10, 2)])
    assert s.campaign.p_conv_target == 0.99 and s.engine.engine == "replay"


def test_round_trip_keeps_every_value(tmp_path):
    s = settings_from_dict({"campaign": {"pool": str(tmp_path / "p.extxyz"), "window": 2.5, "unit": "kcal/mol"},
                            "engine": {"engine": "ase", "calculator": "gfnff", "fmax": 0.02}})
    write_settings(s, tmp_path / "s.toml")
    again = load_settings(tmp_path / "s.toml")
    assert again.model_dump() == s.model_dump()


def test_relative_pool_is_resolved_against_the_settings_file(tmp_path):
    (tmp_path / "s.toml").write_text('[campaign]\npool = "data/pool.extxyz"\n')
    assert load_settings(tmp_path / "s.toml").campaign.pool == str((tmp_path / "data" / "pool.extxyz").resolve())


def test_every_bad_field_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"campaign": {"pool": "p", "window": -1, "n_init": 0}}, source="my.toml")
    message = str(err.value)
    assert "my.toml" in message and "campaign.window" in message and "campaign.n_init" in message


def test_async_settings_default_to_waiting_for_running_jobs_and_reject_a_non_boolean(tmp_path):
    s = settings_from_dict({"campaign": {"pool": "p", "mode": "async", "slots": 4}})
    assert s.campaign.cancel_on_stop is False
    (tmp_path / "s.toml").write_text('[campaign]\npool = "p"\nmode = "async"\ncancel_on_stop = true\n')
    assert load_settings(tmp_path / "s.toml").campaign.cancel_on_stop is True
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"campaign": {"pool": "p", "cancel_on_stop": "sometimes"}}, source="my.toml")
    assert "campaign.cancel_on_stop" in str(err.value)
