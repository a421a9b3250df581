"""What `graceq run`, `demo`, `report` print when their output goes to a log file (not a terminal).

No progress bars off a terminal, the per-iteration lines with --quiet too, a unit on every energy,
"resuming at iteration N", a reprinted demo that says so, and a report before any iteration that
says so instead of printing None.
"""

from __future__ import annotations

import re

import pytest

from conftest import run_cli, settings_text

ITERATION_LINE = re.compile(r"iteration +\d+: +\d+ reference calls, best -?\d+\.\d{3} kJ/mol/molecule, ")


@pytest.fixture(scope="module")
def campaign(roy_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("output")
    settings = folder / "settings.toml"
    settings.write_text(settings_text(roy_small, campaign={"budget": 18}))
    run_cli("init", str(folder / "campaign"), "--settings", str(settings))
    return folder / "campaign"


def _no_bars(text: str) -> None:
    assert "\r" not in text and "%|" not in text and "it/s" not in text, text[-2000:]


def test_report_before_any_iteration_says_so(campaign):
    result = run_cli("report", str(campaign))
    assert "no iteration has finished yet" in result.stdout
    assert "None" not in result.stdout


def test_quiet_keeps_the_iteration_lines_with_units_and_no_bars(campaign):
    result = run_cli("run", str(campaign), "--quiet", "--max-iterations", "1")
    assert ITERATION_LINE.search(result.stdout), result.stdout
    assert "resuming" not in result.stdout
    _no_bars(result.stdout + result.stderr)


def test_a_resumed_run_says_where_it_resumes_and_shows_no_bars_off_a_terminal(campaign):
    result = run_cli("run", str(campaign))  # progress on, but stdout/stderr are pipes
    assert "resuming at iteration 1 (12 reference results stored)" in result.stdout, result.stdout
    assert ITERATION_LINE.search(result.stdout)
    _no_bars(result.stdout + result.stderr)
    assert "stop: budget" in result.stdout


def test_a_finished_demo_says_it_reprints_an_earlier_campaign(campaign):
    result = run_cli("demo", str(campaign), "--quiet")
    assert "finished earlier (stop: budget); reprinting its result" in result.stdout
    assert "graceq demo --fresh" in result.stdout
    assert "nothing to do" in result.stdout
