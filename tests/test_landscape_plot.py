"""The landscape plot with unstable and failed structures that never had a prediction.

Structures of the initial batch are picked before any model exists: when one comes back unstable
or failed, it has neither a reference energy nor a predicted one. It used to be drawn at its
force-field total minus the best reference energy (about 61,000 kJ/mol on ROY), which squashed
every other point into a line. Now the axis spans the measured energies and the window plus a
margin, such structures sit on the top edge, and the legend says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graceq import report
from graceq.report import CampaignRecord


def _record(tmp_path: Path) -> CampaignRecord:
    rng = np.random.default_rng(1)
    n = 40
    energy_ff = -61000.0 + rng.normal(scale=8.0, size=n)      # per molecule, absolute (a force field total)
    ref = rng.uniform(0.0, 25.0, size=n) - 120.0                 # per molecule, absolute reference
    picks = [(i, 0, i, None, None, None) for i in range(10)]     # the initial batch: no prediction
    picks += [(10 + k, 1, k, 0.5, ref[10 + k] + 1.0, 0.8) for k in range(5)]
    results = {i: ("converged", float(ref[i])) for i in range(15)}
    results[3] = ("unstable", None)     # initial batch: no prediction
    results[7] = ("failed", None)       # initial batch: no prediction
    results[12] = ("unstable", None)    # picked by the model: predicted energy known
    return CampaignRecord(
        root=tmp_path, unit="kJ/mol", window=5.0, p_conv_target=0.99, risk_target=0.05, stop_rule="risk",
        names=np.array([f"s{i}" for i in range(n)]),
        n_atoms=np.full(n, 54), energy_ff=energy_ff, energy_ref_pool=ref, status_pool=np.array([""] * n),
        density=rng.uniform(1.3, 1.6, size=n), picks=picks, results=results, iterations=[], predictions={},
    )


def test_unstable_and_failed_without_prediction_do_not_stretch_the_axis(tmp_path, monkeypatch):
    seen = {}
    real_save = report._save

    def keep(fig, path):
        ax = fig.axes[0]
        seen["ylim"] = ax.get_ylim()
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["offsets"] = {c.get_label(): c.get_offsets() for c in ax.collections if c.get_label()}
        return real_save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    rec = _record(tmp_path)
    report.plot_landscape(rec, tmp_path / "landscape.png")
    assert (tmp_path / "landscape.png").stat().st_size > 1000
    best = rec.best
    measured = [e - best for s, e in rec.results.values() if s == "converged"]
    low, top = seen["ylim"]
    # the axis spans the measured energies and the window, with a margin: not 61,000 kJ/mol
    assert low < 0 and top > max(measured) and top > rec.window
    assert top - low < 1.5 * (max(max(measured), rec.window) - min(0.0, min(measured)))
    unstable = next(k for k in seen["labels"] if k.startswith("unstable"))
    failed = next(k for k in seen["labels"] if k.startswith("failed"))
    assert unstable == "unstable (2): at the predicted energy; 1 without a prediction at the top edge"
    assert failed == "failed (1): at the predicted energy; 1 without a prediction at the top edge"
    y_unstable = sorted(seen["offsets"][unstable][:, 1])
    assert y_unstable[1] == top  # the one without a prediction, on the edge
    predicted = [p[4] for p in rec.picks if p[0] == 12][0] - best
    assert np.isclose(y_unstable[0], np.clip(predicted, low, top))
    assert seen["offsets"][failed][0, 1] == top
