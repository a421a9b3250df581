"""Bad settings stop `graceq init` with one message naming the file and the problem, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli, settings_text


def _init(tmp_path: Path, text: str):
    settings = tmp_path / "settings.toml"
    settings.write_text(text)
    result = run_cli("init", str(tmp_path / "campaign"), "--settings", str(settings), check=False)
    return settings, result


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"campaign": {"window": 0.0}}, "window must be > 0"),
        ({"campaign": {"window": -2.0}}, "window must be > 0"),
        ({"campaign": {"unit": "furlongs"}}, "furlongs"),
        ({"engine": {"engine": "ase", "calculator": "no_such_package.Calculator"}}, "no_such_package"),
        ({"engine": {"engine": "replay", "source": "/nonexistent/answers.csv"}}, "answers.csv"),
        ({"model": {"n_membres": 10}}, "n_membres"),
    ],
)
def test_bad_settings_are_rejected_before_any_work(roy_small, tmp_path, extra, expected):
    settings, result = _init(tmp_path, settings_text(roy_small, **extra))
    assert result.returncode != 0
    message = result.stderr
    assert expected in message, message
    assert "Traceback" not in message
    assert str(settings) in message or "[engine]" in message or "settings" in message
    assert not (tmp_path / "campaign" / "state.sqlite").exists()


def test_unreadable_pool_names_the_file(tmp_path):
    pool = tmp_path / "pool.extxyz"
    pool.write_text("this is not a structure file\n")
    _, result = _init(tmp_path, settings_text(pool))
    assert result.returncode != 0
    assert str(pool) in result.stderr and "Traceback" not in result.stderr


def test_not_toml(tmp_path):
    _, result = _init(tmp_path, "[campaign\npool = ")
    assert result.returncode != 0 and "not valid TOML" in result.stderr


def test_existing_campaign_is_not_overwritten(roy_small, tmp_path):
    settings, first = _init(tmp_path, settings_text(roy_small))
    assert first.returncode == 0, first.stderr
    second = run_cli("init", str(tmp_path / "campaign"), "--settings", str(settings), check=False)
    assert second.returncode != 0 and "already exists" in second.stderr


def test_a_started_campaign_refuses_settings_its_decisions_depend_on(roy_small, tmp_path):
    settings, first = _init(tmp_path, settings_text(roy_small))
    assert first.returncode == 0, first.stderr
    result = run_cli("run", str(tmp_path / "campaign"), "--window", "3", "--quiet", check=False)
    assert result.returncode != 0 and "--window cannot change" in result.stderr
