"""Campaign files follow the user's umask, so that colleagues can read results on a shared disk.

mkstemp (used for every atomic write) creates files with mode 0600 whatever the umask; graceq's
files must instead get 0666 & ~umask, like any file the user's tools write.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from graceq.store import atomic_save_npy, atomic_write_json


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        import numpy as np

        atomic_save_npy(tmp_path / "b.npy", np.zeros(3))
        (tmp_path / "plain.txt").write_text("what open() makes\n")
    finally:
        os.umask(old)
    for name in ("a.json", "b.npy", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_campaign_is_readable_by_the_group_under_umask_022(roy_small, tmp_path):
    from conftest import GRACEQ, settings_text

    settings = tmp_path / "settings.toml"
    settings.write_text(settings_text(roy_small))
    subprocess.run(GRACEQ + ["run", str(tmp_path / "campaign"), "--settings", str(settings), "--quiet",
                             "--max-iterations", "1"], check=True, capture_output=True,
                   preexec_fn=lambda: os.umask(0o022))
    files = [p for p in (tmp_path / "campaign").rglob("*") if p.is_file()]
    assert any(p.parent.name == "results" for p in files) and any(p.suffix == ".npz" for p in files)
    private = [str(p) for p in files if not stat.S_IMODE(p.stat().st_mode) & 0o044]
    assert not private, f"files others cannot read: {private}"
