"""benchmarks/retro.py's figure: window structures not yet measured against reference calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import load_retro

RETRO = Path(__file__).resolve().parents[1] / "benchmarks" / "retro.py"


def test_missed_curve_counts_down_at_each_window_structure():
    retro = load_retro()
    # window structures 7 and 2, met at positions 2 and 5 of the order
    assert retro.missed_curve([4, 1, 7, 0, 9, 2, 3], [2, 7]) == [2, 2, 2, 1, 1, 1, 0, 0]
    assert retro.missed_curve([], [5]) == [1]


def _run(seed: int, calls, missed, stop):
    return {"seed": seed, "calls_history": calls, "missed_history": missed, "calls_at_stop": stop,
            "calls_to_full_recall": calls[missed.index(0)]}


def _output() -> dict:
    runs = [_run(0, [4, 6, 8, 10], [3, 2, 0, 0], 10), _run(1, [4, 6, 8, 10], [3, 1, 1, 0], 10)]
    window = {"window": 5.0, "n_window_structures": 4,
              "methods": {"graceq": {"calls_at_stop": 10, "per_seed": runs},
                          "greedy_predicted_energy": {"per_seed": [_run(0, [4, 6], [2, 0], None)]},
                          "force_field_order": {"missed_history": [4, 4, 3, 3, 2, 1, 1, 0, 0, 0, 0, 0]},
                          "fps_only": {"missed_history": [4, 3, 3, 3, 3, 2, 2, 2, 1, 1, 0, 0]}}}
    return {"pool": "toy.extxyz", "unit": "kJ/mol", "windows": {"5.0": window}}


def _drawn(path: Path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    return image


def test_the_figure_has_a_panel_per_window_and_draws_something(tmp_path):
    retro = load_retro()
    out = _output()
    path = retro.plot(out, tmp_path / "one.png")
    one = _drawn(path)
    assert one[..., :3].std() > 0.05  # not a blank canvas
    out["windows"]["10.0"] = dict(out["windows"]["5.0"], window=10.0)
    two = _drawn(retro.plot(out, tmp_path / "two.png"))
    assert two.shape[1] > 1.8 * one.shape[1]  # two panels side by side


def test_from_json_redraws_a_saved_output_without_running(tmp_path):
    saved = tmp_path / "out.json"
    saved.write_text(json.dumps(_output()))
    target = tmp_path / "again.png"
    result = subprocess.run([sys.executable, str(RETRO), "--from-json", str(saved), "--plot", str(target)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    _drawn(target)
    missing = subprocess.run([sys.executable, str(RETRO), "--from-json", str(saved)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "--plot" in missing.stderr
