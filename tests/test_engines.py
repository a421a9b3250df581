"""Tests of graceq.engines: the result format, make_engine, the replay engine and the ase engine.

The ase engine runs the real GFN-FF calculator on the smallest benzamide cell (32 atoms); the
exact-resume check uses ASE's Lennard-Jones calculator, whose energy has no set-up state
(GFN-FF fixes its topology at the first geometry it sees, so a resumed GFN-FF relaxation agrees
with an uninterrupted one only to ~1e-4 eV).
"""

from __future__ import annotations

import os

# GFN-FF runs OpenMP threads; on a shared 2-core machine they spin against each other. One thread
# here: libgomp reads the variable when gfnff is first imported; then the environment is restored
# so that processes other tests start are not affected.
_omp = os.environ.get("OMP_NUM_THREADS")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import gfnff  # noqa: E402,F401

if _omp is None:
    del os.environ["OMP_NUM_THREADS"]

import importlib.resources  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import ase.io  # noqa: E402
import ase.units  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.io.trajectory import Trajectory  # noqa: E402
from gfnff.ase_calculator import GFNFF  # noqa: E402

from graceq.chemistry import molecule_formulas  # noqa: E402
from graceq.engines import ReferenceResult, make_engine, register_engine  # noqa: E402
from graceq.engines import replay as replay_module  # noqa: E402
from graceq.engines.ase_relax import RESULT, TRAJECTORY  # noqa: E402
from graceq.engines.base import ReferenceEngine  # noqa: E402

DATA = importlib.resources.files("graceq") / "data"
ROY = DATA / "roy264" / "roy264.extxyz"
BENZAMIDE = DATA / "benzamide" / "landscape.extxyz"
KJMOL = ase.units.kJ / ase.units.mol  # eV


@pytest.fixture(scope="module")
def benzamide_frames():
    return ase.io.read(BENZAMIDE, ":")


@pytest.fixture
def cell32(benzamide_frames):
    """benzamide-00014: a GFN-FF minimum with 2 molecules (32 atoms), slightly rattled."""
    atoms = next(f for f in benzamide_frames if f.info["name"] == "benzamide-00014").copy()
    assert len(atoms) == 32
    atoms.rattle(0.02, seed=3)
    return atoms


# -- ReferenceResult ------------------------------------------------------------------------------
def test_result_json_round_trip(cell32):
    result = ReferenceResult("benzamide-00014", "converged", -16938.8, cell32, n_steps=12, message="ok")
    record = json.loads(json.dumps(result.to_json()))  # JSON-safe
    back = ReferenceResult.from_json(dict(record, idx=3, task_id="t"))
    assert (back.name, back.status, back.energy, back.n_steps, back.message) == (
        "benzamide-00014", "converged", -16938.8, 12, "ok")
    np.testing.assert_array_equal(back.atoms.positions, cell32.positions)
    np.testing.assert_array_equal(back.atoms.cell[:], cell32.cell[:])
    np.testing.assert_array_equal(back.atoms.numbers, cell32.numbers)
    failed = ReferenceResult.from_json(ReferenceResult("x", "failed", None, None, message="SCF").to_json())
    assert failed.atoms is None and failed.energy is None and failed.message == "SCF"
    with pytest.raises(ValueError, match="status"):
        ReferenceResult("x", "done", 1.0, None)


# -- make_engine --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, match",
    [
        ({"engine": "nope"}, "unknown reference engine"),
        ({"engine": "ase", "calculator": "nosuchcalc"}, "unknown calculator"),
        ({"engine": "ase", "calculator": "no_such_package.Calc"}, "needs the Python package 'no_such_package'"),
        ({"engine": "ase", "calculator": "ase.calculators.emt.NoSuch"}, "has no calculator 'NoSuch'"),
        ({"engine": "ase", "calculator": "gfnff", "optimizer": "Newton"}, "unknown optimizer"),
        ({"engine": "ase", "calculator": "gfnff", "fmx": 0.1}, "unknown setting"),
        ({"engine": "ase", "calculator": "gfnff", "cell_filter": "Strain"}, "unknown cell_filter"),
        ({"engine": "ase"}, "needs a calculator"),
        ({"engine": "replay"}, "needs a source"),
        ({"engine": "replay", "source": "/nonexistent/ref.csv"}, "does not exist"),
    ],
)
def test_make_engine_rejects_bad_settings(settings, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make_engine(settings, "kJ/mol")


def test_make_engine_rejects_unknown_unit():
    with pytest.raises(ValueError, match="unknown energy unit"):
        make_engine({"engine": "replay", "source": str(ROY)}, "kJ")


def test_a_new_engine_is_one_class():
    class Constant(ReferenceEngine):
        name = "constant"

        def __init__(self, settings, unit):
            self.value = settings["value"]

        def run(self, atoms, name, workdir, heartbeat=None):
            return ReferenceResult(name, "converged", self.value, None)

    register_engine("constant", Constant)
    assert make_engine({"engine": "constant", "value": 2.0}, "eV").run(None, "a", None).energy == 2.0


# -- replay ---------------------------------------------------------------------------------------
def test_replay_from_the_pool_file(tmp_path):
    frames = ase.io.read(ROY, ":")
    engine = make_engine({"engine": "replay"}, "kJ/mol", pool_source=str(ROY))
    for atoms in (frames[0], frames[100], frames[263]):
        result = engine.run(atoms, atoms.info["name"], tmp_path)
        assert result.status == "converged"
        assert result.energy == atoms.info["energy_ref"]
    missing = engine.run(frames[0], "no-such-structure", tmp_path)
    assert missing.status == "failed" and "no-such-structure" in missing.message
    in_ev = make_engine({"engine": "replay", "source_unit": "kJ/mol"}, "eV", pool_source=str(ROY))
    assert in_ev.run(None, frames[100].info["name"], tmp_path).energy == pytest.approx(
        frames[100].info["energy_ref"] * KJMOL, rel=1e-12)


def test_replay_benzamide_status(tmp_path, benzamide_frames):
    engine = make_engine({"engine": "replay"}, "kJ/mol", pool_source=str(BENZAMIDE))
    by_status = {}
    for atoms in benzamide_frames:
        by_status.setdefault(atoms.info["status"], atoms)
    assert set(by_status) == {"converged", "unconverged", "unstable"}
    for status, expected in [("converged", "converged"), ("unconverged", "converged"), ("unstable", "unstable")]:
        atoms = by_status[status]
        result = engine.run(atoms, atoms.info["name"], tmp_path)
        assert result.status == expected
        if expected == "converged":
            assert result.energy == atoms.info["energy_ref"]
        else:
            assert result.energy is None


def test_replay_from_csv_with_status_and_cache(tmp_path, monkeypatch):
    table = tmp_path / "reranking.csv"
    table.write_text(
        "name,energy_ref,status\n"
        "a,-10.5,converged\n"
        "b,-11.0,unconverged\n"
        "c,-12.0,unstable\n"
        "d,,failed\n"
        "e,,converged\n"
        "f,-9.0,\n"
    )
    loads = []
    real_load = replay_module._load_csv
    monkeypatch.setattr(replay_module, "_load_csv", lambda *a: loads.append(a) or real_load(*a))
    engine = make_engine({"engine": "replay", "source": str(table)}, "kJ/mol")
    got = {n: engine.run(None, n, tmp_path) for n in "abcdefg"}
    assert {n: r.status for n, r in got.items()} == {
        "a": "converged", "b": "converged", "c": "unstable", "d": "failed",
        "e": "failed", "f": "converged", "g": "failed"}
    assert got["a"].energy == -10.5 and got["b"].energy == -11.0 and got["f"].energy == -9.0
    assert "energy_ref" in got["e"].message and "'g'" in got["g"].message
    # a second engine in the same process (the next task) reuses the loaded table
    again = make_engine({"engine": "replay", "source": str(table)}, "kJ/mol")
    assert again.run(None, "a", tmp_path).energy == -10.5
    assert len(loads) == 1


def test_replay_can_return_the_recorded_structure(tmp_path):
    engine = make_engine({"engine": "replay", "return_structures": True}, "kJ/mol", pool_source=str(ROY))
    first = ase.io.read(ROY, 0)
    result = engine.run(None, first.info["name"], tmp_path)
    np.testing.assert_array_equal(result.atoms.positions, first.positions)


# -- ase engine with GFN-FF -------------------------------------------------------------------------
def gfnff_engine(**settings):
    return make_engine(dict({"engine": "ase", "calculator": "gfnff"}, **settings), "kJ/mol")


def test_ase_engine_converges_and_reports_kjmol(tmp_path, cell32):
    beats = []
    engine = gfnff_engine(optimizer="FIRE", fmax=0.1, max_steps=200)
    result = engine.run(cell32, "benzamide-00014", tmp_path, heartbeat=lambda: beats.append(1))
    assert result.status == "converged", result.message
    assert 0 < result.n_steps < 200 and len(beats) >= result.n_steps
    with Trajectory(str(tmp_path / TRAJECTORY)) as traj:
        assert len(traj) == result.n_steps + 1
        last = traj[-1]
        energy_ev = last.get_potential_energy()
        np.testing.assert_array_equal(last.positions, result.atoms.positions)
    assert result.energy == pytest.approx(energy_ev / KJMOL, rel=1e-12)
    assert result.energy == pytest.approx(energy_ev * ase.units.mol / ase.units.kJ, rel=1e-12)
    assert not np.allclose(result.atoms.cell[:], cell32.cell[:], atol=1e-4)  # the cell relaxed too
    fresh = result.atoms.copy()
    fresh.calc = GFNFF()
    assert fresh.get_potential_energy() == pytest.approx(energy_ev, abs=2e-3)
    assert np.linalg.norm(fresh.get_forces(), axis=1).max() < 0.1 + 0.01
    assert sorted(molecule_formulas(result.atoms)) == ["C7H7NO", "C7H7NO"]
    # a re-delivered task gets the same answer without relaxing again
    again = engine.run(cell32, "benzamide-00014", tmp_path)
    assert again.to_json() == json.loads(json.dumps(result.to_json()))
    with Trajectory(str(tmp_path / TRAJECTORY)) as traj:
        assert len(traj) == result.n_steps + 1


def log_segments(path):
    """Energy (eV) of each optimiser log line, split into runs (a run starts at step 0)."""
    segments = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].endswith(":") and parts[1].isdigit():
            if int(parts[1]) == 0:
                segments.append([])
            segments[-1].append(float(parts[3]))
    return segments


def test_ase_engine_resumes_from_its_checkpoint(tmp_path, cell32):
    engine = gfnff_engine(optimizer="BFGS", max_steps=8)
    calls = []

    def lease_lost():
        calls.append(1)
        if len(calls) == 5:  # start, step 0, 1, 2, 3: stop after the 4th frame is written
            raise KeyboardInterrupt("worker stopped")

    with pytest.raises(KeyboardInterrupt):
        engine.run(cell32, "benzamide-00014", tmp_path, heartbeat=lease_lost)
    assert not (tmp_path / RESULT).exists()
    with Trajectory(str(tmp_path / TRAJECTORY)) as traj:
        first_part = [a.copy() for a in traj]
        first_energies = [a.get_potential_energy() for a in traj]
    assert len(first_part) == 4
    np.testing.assert_array_equal(first_part[0].positions, cell32.positions)

    result = engine.run(cell32, "benzamide-00014", tmp_path)
    assert result.n_steps == 8  # 3 steps before the interruption + 5 after: max_steps is a total
    assert result.status == "failed" and "max_steps 8" in result.message
    assert "resumed after 3 steps" in result.message
    with Trajectory(str(tmp_path / TRAJECTORY)) as traj:
        frames = [a.copy() for a in traj]
    assert len(frames) == 9
    for a, b in zip(first_part, frames):  # the checkpoint is extended, not rewritten
        np.testing.assert_array_equal(a.positions, b.positions)
    # the second run started from the last checkpoint frame, not from the input structure
    first_log, second_log = log_segments(tmp_path / "relax.log")
    assert len(first_log) == 4 and len(second_log) == 6
    assert second_log[0] == pytest.approx(first_energies[3], abs=1e-3)
    assert abs(first_energies[3] - first_energies[0]) > 10 * 1e-3
    step = np.linalg.norm(frames[4].positions - frames[3].positions, axis=1).max()
    assert step < 0.25  # one optimiser step (maxstep 0.2 Å) from frame 3


def test_ase_engine_resume_is_exact_with_a_stateless_calculator(tmp_path):
    """Interrupted + resumed BFGS with cell filter = one uninterrupted run, to the last digit."""
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((2, 2, 1))
    atoms.rattle(0.05, seed=1)
    atoms.set_cell(atoms.cell[:] @ np.array([[1.0, 0.02, 0.0], [0.0, 0.98, 0.0], [0.0, 0.0, 1.01]]),
                   scale_atoms=True)
    settings = {"engine": "ase", "calculator": "ase.calculators.lj.LennardJones",
                "calculator_parameters": {"sigma": 3.4, "epsilon": 0.0104, "rc": 6.0, "smooth": True},
                "optimizer": "BFGS", "fmax": 1e-4, "max_steps": 12}
    engine = make_engine(settings, "eV")
    whole = engine.run(atoms, "ar", tmp_path / "whole")
    calls = []

    def stop_at_6():
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        engine.run(atoms, "ar", tmp_path / "split", heartbeat=stop_at_6)
    split = engine.run(atoms, "ar", tmp_path / "split")
    assert split.n_steps == whole.n_steps == 12
    np.testing.assert_allclose(split.atoms.positions, whole.atoms.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(split.atoms.cell[:], whole.atoms.cell[:], rtol=0, atol=1e-10)


def test_ase_engine_unstable_when_a_molecule_is_broken(tmp_path, cell32):
    from ase.geometry import get_distances

    h = int(np.nonzero(cell32.numbers == 1)[0][0])
    others = np.delete(cell32.positions, h, axis=0)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, 8, endpoint=False)] * 3), -1).reshape(-1, 3) @ cell32.cell[:]
    _, d = get_distances(grid, others, cell=cell32.cell, pbc=True)
    cell32.positions[h] = grid[np.argmax(d.min(axis=1))]  # H far from everything: the molecule is broken
    result = gfnff_engine(optimizer="FIRE", max_steps=3).run(cell32, "broken", tmp_path)
    assert result.status == "unstable", result.message
    assert result.energy is None and "C7H6NO" in result.message and result.n_steps == 3


class FailingGFNFF(GFNFF):
    """GFN-FF that stops converging after two evaluations, as an SCF code might."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.n_calls = 0

    def calculate(self, *args, **kwargs):
        self.n_calls += 1
        if self.n_calls > 2:
            raise RuntimeError("SCF not converged after 60 iterations")
        super().calculate(*args, **kwargs)


def test_ase_engine_failed_when_the_calculator_raises(tmp_path, cell32):
    engine = make_engine({"engine": "ase", "calculator": FailingGFNFF, "optimizer": "FIRE"}, "kJ/mol")
    result = engine.run(cell32, "scf", tmp_path)
    assert result.status == "failed" and result.energy is None
    assert "SCF not converged" in result.message and "RuntimeError" in result.message
    assert result.n_steps == 1


class NoStressGFNFF(GFNFF):
    implemented_properties = ["energy", "forces"]


def test_ase_engine_without_stress_relaxes_positions_only(tmp_path, cell32):
    with pytest.warns(UserWarning, match="positions only"):
        engine = make_engine({"engine": "ase", "calculator": NoStressGFNFF, "optimizer": "FIRE",
                              "max_steps": 2}, "kJ/mol")
    result = engine.run(cell32, "no-stress", tmp_path)
    assert "positions only" in result.message and result.n_steps == 2
    np.testing.assert_array_equal(result.atoms.cell[:], cell32.cell[:])
    assert not np.array_equal(result.atoms.positions, cell32.positions)


def test_energies_in_other_units(tmp_path, cell32):
    result = make_engine({"engine": "ase", "calculator": "gfnff", "max_steps": 0, "fmax": 100.0},
                         "kcal/mol").run(cell32, "x", tmp_path)
    single = cell32.copy()
    single.calc = GFNFF()
    assert result.status == "converged" and result.n_steps == 0
    assert result.energy == pytest.approx(single.get_potential_energy() / (ase.units.kcal / ase.units.mol),
                                          rel=1e-12)
    assert math.isfinite(result.energy)


def test_gfnff_gives_periodic_stress_for_cell_relaxation(cell32):
    """The cell filter needs the stress: GFN-FF's analytic stress equals ASE's finite differences."""
    from ase.calculators.fd import calculate_numerical_stress

    atoms = cell32.copy()
    atoms.calc = GFNFF()
    analytic = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-5, force_consistent=False)
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-6)  # eV/Å^3
    assert np.abs(analytic).max() > 1e-4  # a rattled cell is not stress-free: the check has teeth
