"""The test command installs nothing and starts no system daemon unless .ci/run asks for it.

Runs the SLURM and browser test modules in a child pytest without GRACEQ_TEST_SYSTEM, with a PATH
whose `apt-get`, `apt` and `dpkg` only log that they were called: every test must skip with a reason
that names the variable, nothing may call the package manager, and no munged/slurmctld/slurmd may be
left running (or have been started).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import system_test_skip_reason

HERE = Path(__file__).resolve().parent


def _daemons() -> set[str]:
    out = subprocess.run(["ps", "-eo", "pid=,comm="], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines()
            if line.split()[-1] in ("munged", "slurmctld", "slurmd", "slurmstepd")}


def test_system_tests_skip_without_the_variable_and_install_nothing(tmp_path):
    calls = tmp_path / "package-manager-calls.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("apt-get", "apt", "dpkg"):
        (fake / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 1\n')
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "GRACEQ_TEST_SYSTEM"}
    env["PATH"] = f"{fake}:{env.get('PATH', '/usr/bin:/bin')}"
    before = _daemons()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(HERE / "test_slurm.py"), str(HERE / "test_flower_browser.py")],
                          capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" not in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) >= 2 and all("GRACEQ_TEST_SYSTEM=1" in line for line in skipped), proc.stdout[-3000:]
    assert not calls.exists(), calls.read_text()
    assert _daemons() <= before, f"daemons started by the tests: {_daemons() - before}"


def test_skip_reasons_name_what_is_missing(monkeypatch):
    assert "GRACEQ_TEST_SYSTEM=1" in system_test_skip_reason("slurm", environ={})
    monkeypatch.setenv("PATH", "/nonexistent")
    reason = system_test_skip_reason("browser", environ={"GRACEQ_TEST_SYSTEM": "1"})
    assert reason is not None and "chromium" in reason
    reason = system_test_skip_reason("slurm", environ={"GRACEQ_TEST_SYSTEM": "1"})
    assert reason is not None and "slurmctld" in reason and "sbatch" in reason
