"""The `ase` reference engine: relax positions and cell with any ASE calculator and optimiser.

Settings (the campaign's ``[engine]`` table):

``calculator``
    a short name ("gfnff", "tblite", "vasp", "espresso", "cp2k", "dftb", "emt"), an ASE calculator
    class ("ase.calculators.vasp.Vasp"), a package's entry point (group ``graceq.calculators``),
    or, where the worker's operator allows settings code, any dotted path ("pkg.module:Class").
``calculator_parameters``
    dict of keyword arguments for the calculator (e.g. VASP's ``xc``, ``encut``); ``command``,
    ``directory`` and other program or path keys (``CODE_PARAMETERS``) only with settings code.
``optimizer``
    a name in ``ase.optimize`` ("BFGS" default, "FIRE", "LBFGS", "BFGSLineSearch", ...);
    ``optimizer_parameters`` is passed on to it (e.g. ``maxstep``).
``fmax``
    force convergence criterion in eV/Å (default 0.05; with a cell filter it also bounds the
    stress term, as in ASE).
``max_steps``
    optimiser steps allowed in total, over all resumed segments (default 300).
``cell_filter``
    "FrechetCellFilter" (default) or "UnitCellFilter" to relax the cell too, or "none". A
    calculator without stress falls back to positions only, with a note in the result.

Checkpoint: ``relax.traj`` (every optimiser step, positions, cell, energy in eV, forces, stress)
and the optimiser's restart file ``optimizer.json`` in the work directory. A second ``run`` in
the same directory resumes from the last frame with the optimiser's state; once a relaxation
has ended its result is kept in ``relax_result.json`` and returned again.

Outcome: *unstable* if the bonded molecules at the end differ from those at the start (their
number or formulas) or are not all alike (a broken molecule); else *converged* if the optimiser
reached fmax; else *failed* (max_steps used up, or the calculator raised: the message says why).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ase import Atoms

from graceq.chemistry import molecule_formulas
from graceq.units import check_unit, from_ev

from .base import ReferenceEngine, ReferenceResult, check_settings

#: short calculator names -> "module:Class"
CALCULATORS = {
    "gfnff": "gfnff.ase_calculator:GFNFF",
    "tblite": "tblite.ase:TBLite",
    "xtb": "xtb.ase.calculator:XTB",
    "vasp": "ase.calculators.vasp:Vasp",
    "espresso": "ase.calculators.espresso:Espresso",
    "cp2k": "ase.calculators.cp2k:CP2K",
    "dftb": "ase.calculators.dftb:Dftb",
    "emt": "ase.calculators.emt:EMT",
}

CELL_FILTERS = ("FrechetCellFilter", "UnitCellFilter")
TRAJECTORY = "relax.traj"
RESTART = "optimizer.json"
RESULT = "relax_result.json"
LOG = "relax.log"


class _HeartbeatStop(Exception):
    """Carries an exception raised by the heartbeat out of the optimiser, untouched."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


#: calculator parameters that name a program to run or a place to write: code, not a setting
#: (ASE's FileIOCalculator runs ``command`` through a shell; ``profile`` carries a command too)
CODE_PARAMETERS = frozenset({"command", "profile", "directory", "label", "txt", "executable", "exe",
                             "cmd", "binary", "launcher", "mpi_command", "prefix_command"})


def _is_ase_calculator(module_name: str) -> bool:
    return module_name == "ase.calculators" or module_name.startswith("ase.calculators.")


def resolve_calculator(spec, allow_code: bool | None = None) -> type:
    """Return the Calculator class for a short name, "pkg.module.Class" or "pkg.module:Class".

    Registered without asking: graceq's short names (``CALCULATORS``), ASE's own calculator classes
    by path ("ase.calculators.lj.LennardJones"), and entry points of installed packages in the
    group ``graceq.calculators``. Any other path is code from the settings file and loads only when
    settings code is allowed (``allow_code``, default :func:`graceq.trust.settings_code_allowed`),
    else :class:`graceq.trust.CodeNotAllowed`. A class or other callable given from Python is
    returned as is. Raises ValueError naming what to install.
    """
    from graceq.trust import code_refusal, settings_code_allowed

    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise ValueError(f"engine 'ase': calculator must be a name or a dotted path, got {spec!r}")
    if spec.lower() not in CALCULATORS:
        from graceq.engines import CALCULATOR_GROUP, registered

        plugins = registered(CALCULATOR_GROUP)
        if spec in plugins:
            try:
                return plugins[spec].load()
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"engine 'ase': calculator {spec!r}: its entry point {plugins[spec].value} "
                                 f"cannot be loaded ({exc})") from exc
    target = CALCULATORS.get(spec.lower(), spec)
    if ":" in target:
        module_name, _, attr = target.partition(":")
    else:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"engine 'ase': unknown calculator {spec!r}; use one of {', '.join(CALCULATORS)} or an "
            "importable dotted path such as 'ase.calculators.vasp.Vasp'"
        )
    registry = spec.lower() in CALCULATORS
    ase_own = not registry and _is_ase_calculator(module_name) and "." not in attr
    if not (registry or ase_own or (settings_code_allowed() if allow_code is None else allow_code)):
        raise code_refusal(
            f"engine 'ase': calculator {spec!r}",
            "Use a short name (" + ", ".join(CALCULATORS) + "), an ASE calculator class "
            "('ase.calculators.vasp.Vasp'), or install it as a package with an entry point in the "
            "group 'graceq.calculators'. ",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.split(".")[0]
        raise ValueError(
            f"engine 'ase': calculator {spec!r} needs the Python package {package!r}, which cannot be "
            f"imported here ({exc}); install it (pip install {package}) on every dft worker"
        ) from exc
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"engine 'ase': module {module_name!r} has no calculator {attr!r}") from None
    if ase_own:
        from ase.calculators.calculator import BaseCalculator

        if not (isinstance(cls, type) and issubclass(cls, BaseCalculator)):
            raise code_refusal(f"engine 'ase': calculator {spec!r} is not an ASE calculator class")
    return cls


def check_calculator_parameters(parameters: dict[str, Any], allow_code: bool | None = None) -> None:
    """Refuse calculator parameters that name a program or a path (``CODE_PARAMETERS``) unless code is allowed.

    A FileIOCalculator (VASP, CP2K, DFTB+ ...) runs its ``command`` through a shell: on a worker
    that runs no settings code, the program comes from the operator's ASE configuration
    (``ASE_VASP_COMMAND``, ``~/.config/ase/config.ini``), and graceq chooses the directory.
    """
    from graceq.trust import code_refusal, settings_code_allowed

    if settings_code_allowed() if allow_code is None else allow_code:
        return
    named = sorted(k for k in parameters if str(k).lower() in CODE_PARAMETERS or str(k).lower().endswith("command"))
    if named:
        raise code_refusal(
            f"engine 'ase': calculator_parameters {', '.join(named)}",
            "Programs and directories come from the worker operator's ASE configuration "
            "(e.g. ASE_VASP_COMMAND, ~/.config/ase/config.ini) when settings code is off. ",
        )


def _accepts(callable_, keyword: str) -> bool:
    try:
        params = inspect.signature(callable_).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _describe(formulas) -> str:
    counts: dict[str, int] = {}
    for f in formulas:
        counts[f] = counts.get(f, 0) + 1
    return ", ".join(f"{n} x {f}" for f, n in sorted(counts.items()))


class AseRelaxEngine(ReferenceEngine):
    """Relaxes a structure (positions and cell) with an ASE calculator and optimiser."""

    name = "ase"
    SETTINGS = {"calculator", "calculator_parameters", "optimizer", "optimizer_parameters",
                "fmax", "max_steps", "cell_filter"}

    def __init__(self, settings: dict[str, Any], unit: str):
        settings = dict(settings or {})
        check_settings(settings, self.SETTINGS, self.name)
        if not settings.get("calculator"):
            raise ValueError(
                "engine 'ase' needs a calculator: e.g. calculator = \"gfnff\" or "
                "\"ase.calculators.vasp.Vasp\" with calculator_parameters"
            )
        self.unit = check_unit(unit)
        self.calculator = settings["calculator"]
        self.calculator_parameters = dict(settings.get("calculator_parameters") or {})
        self.optimizer = str(settings.get("optimizer", "BFGS"))
        self.optimizer_parameters = dict(settings.get("optimizer_parameters") or {})
        self.fmax = float(settings.get("fmax", 0.05))
        self.max_steps = int(settings.get("max_steps", 300))
        cell_filter = settings.get("cell_filter", "FrechetCellFilter")
        self.cell_filter = None if cell_filter in (None, "", "none", "None") else str(cell_filter)
        if self.fmax <= 0:
            raise ValueError(f"engine 'ase': fmax must be > 0 eV/Å, got {self.fmax}")
        if self.max_steps < 0:
            raise ValueError(f"engine 'ase': max_steps must be >= 0, got {self.max_steps}")
        if self.cell_filter is not None and self.cell_filter not in CELL_FILTERS:
            raise ValueError(
                f"engine 'ase': unknown cell_filter {cell_filter!r}; use one of {', '.join(CELL_FILTERS)} or 'none'"
            )
        self.note = ""

    def check(self) -> None:
        """Resolve calculator and optimiser now: an unknown name or a missing package stops init."""
        import ase.optimize

        self._calculator_class = resolve_calculator(self.calculator)
        check_calculator_parameters(self.calculator_parameters)
        opt = getattr(ase.optimize, self.optimizer, None)
        if not (isinstance(opt, type) and issubclass(opt, ase.optimize.optimize.Optimizer)):
            known = sorted(n for n, v in vars(ase.optimize).items()
                           if isinstance(v, type) and issubclass(v, ase.optimize.optimize.Optimizer))
            raise ValueError(f"engine 'ase': unknown optimizer {self.optimizer!r}; known: {', '.join(known)}")
        self._optimizer_class = opt
        self.relax_cell = self.cell_filter is not None
        if self.relax_cell:
            props = getattr(self._calculator_class, "implemented_properties", None)
            if props is not None and "stress" not in props:
                self.relax_cell = False
                self.note = (
                    f"positions only: calculator {self.calculator!r} gives no stress, so the cell "
                    "was not relaxed"
                )
                warnings.warn(f"engine 'ase': {self.note}", stacklevel=2)

    # -- pieces ---------------------------------------------------------------------------------
    def _make_calculator(self, workdir: Path):
        cls = self._calculator_class
        kwargs = dict(self.calculator_parameters)
        # file-based codes (VASP, QE, CP2K...) write their input/output in the structure's workdir
        from ase.calculators.calculator import FileIOCalculator

        file_based = isinstance(cls, type) and issubclass(cls, FileIOCalculator)
        try:
            from ase.calculators.genericfileio import GenericFileIOCalculator

            file_based = file_based or (isinstance(cls, type) and issubclass(cls, GenericFileIOCalculator))
        except ImportError:  # pragma: no cover - older ASE
            pass
        if file_based and "directory" not in kwargs and _accepts(cls, "directory"):
            kwargs["directory"] = str(workdir / "calc")
        return cls(**kwargs)

    def _read_checkpoint(self, workdir: Path):
        """Return (first frame, last frame, number of frames) of the trajectory, or None."""
        from ase.io.trajectory import Trajectory

        path = workdir / TRAJECTORY
        if not path.exists() or path.stat().st_size == 0:
            return None
        try:
            with Trajectory(str(path)) as traj:
                n = len(traj)
                if n == 0:
                    return None
                return traj[0], traj[n - 1], n
        except Exception as exc:  # a file cut short by a killed worker: start again
            warnings.warn(f"{path}: unreadable checkpoint ({exc}); the relaxation starts again")
            path.replace(path.with_suffix(".traj.broken"))
            return None

    def _optimizer(self, target, workdir: Path, resumed: bool):
        cls = self._optimizer_class
        kwargs = dict(self.optimizer_parameters)
        kwargs.setdefault("logfile", str(workdir / LOG))
        restart = workdir / RESTART
        if not _accepts(cls, "restart"):
            return cls(target, **kwargs)
        if not resumed and restart.exists():
            restart.unlink()  # a restart file without its trajectory belongs to another run
        try:
            with warnings.catch_warnings():
                # ASE warns that restarting a non-BFGS optimiser under a cell filter does not
                # restore orig_cell: run() restores it from the checkpoint's first frame
                warnings.filterwarnings("ignore", message=".*restart function is untested")
                return cls(target, restart=str(restart), **kwargs)
        except Exception as exc:  # unreadable restart file: resume from the positions alone
            warnings.warn(f"{restart}: cannot use the optimiser restart file ({exc}); resuming without it")
            restart.unlink(missing_ok=True)
            return cls(target, restart=str(restart), **kwargs)

    # -- the interface --------------------------------------------------------------------------
    def run(self, atoms: Atoms, name: str, workdir: Path,
            heartbeat: Callable[[], None] | None = None) -> ReferenceResult:
        """Relax ``atoms`` in ``workdir`` (resuming a checkpoint there) and classify the outcome."""
        from ase.io.trajectory import Trajectory

        if not hasattr(self, "_calculator_class"):
            self.check()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        done = workdir / RESULT
        if done.exists():
            return ReferenceResult.from_json(json.loads(done.read_text()))
        if heartbeat is not None:
            heartbeat()

        checkpoint = self._read_checkpoint(workdir)
        if checkpoint is None:
            initial = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            current = initial.copy()
            steps_done = 0
        else:
            initial, last, n_saved = checkpoint
            current = Atoms(numbers=last.numbers, positions=last.positions, cell=last.cell, pbc=last.pbc)
            steps_done = n_saved - 1
        resumed = checkpoint is not None
        start_molecules = molecule_formulas(initial)

        notes = [self.note] if self.note else []
        if resumed:
            notes.append(f"resumed after {steps_done} steps")
        traj = None
        n_frames = [steps_done + 1 if resumed else 0]  # frames in the checkpoint file
        try:
            current.calc = self._make_calculator(workdir)
            target = current
            if self.relax_cell:
                import ase.filters

                target = getattr(ase.filters, self.cell_filter)(current)
                # the filter's coordinates are relative to the starting cell: keep the first one
                target.orig_cell = np.asarray(initial.cell[:])
            opt = self._optimizer(target, workdir, resumed)
            traj = Trajectory(str(workdir / TRAJECTORY), mode="a" if resumed else "w", atoms=current)
            skip_first = [resumed]  # a resumed run's start is the checkpoint's last frame already

            def write_frame():
                if skip_first[0]:
                    skip_first[0] = False
                    return
                traj.write(current)
                n_frames[0] += 1

            def beat():
                if heartbeat is not None:
                    try:
                        heartbeat()
                    except BaseException as exc:
                        raise _HeartbeatStop(exc) from exc

            opt.attach(write_frame, interval=1)
            opt.attach(beat, interval=1)
            converged = bool(opt.run(fmax=self.fmax, steps=max(self.max_steps - steps_done, 0)))
        except _HeartbeatStop as stop:
            raise stop.original from None
        except Exception as exc:  # the calculator (or optimiser) broke: a failed reference
            # steps whose energy and forces were evaluated (= checkpoint frames - 1)
            n_steps = max(n_frames[0] - 1, steps_done)
            return ReferenceResult.failed(name, "; ".join(notes + [f"{type(exc).__name__}: {exc}"]),
                                          current.copy(), n_steps=n_steps)
        finally:
            if traj is not None:
                traj.close()

        n_steps = n_frames[0] - 1  # one checkpoint frame per optimiser step, after the start
        energy_ev = float(current.get_potential_energy())
        end_molecules = molecule_formulas(current)
        relaxed = Atoms(numbers=current.numbers, positions=current.positions, cell=current.cell, pbc=current.pbc)
        if sorted(end_molecules) != sorted(start_molecules) or len(set(end_molecules)) > 1:
            result = ReferenceResult(
                name, "unstable", None, relaxed, n_steps=n_steps,
                message="; ".join(notes + [
                    f"bonded molecules changed: start {_describe(start_molecules)}, end "
                    f"{_describe(end_molecules)} (last energy {energy_ev:.6f} eV)"
                ]),
            )
        elif converged:
            result = ReferenceResult(name, "converged", from_ev(energy_ev, self.unit), relaxed,
                                     n_steps=n_steps, message="; ".join(notes))
        else:
            result = ReferenceResult.failed(name, "; ".join(notes + [
                f"not converged to fmax {self.fmax} eV/Å within max_steps {self.max_steps} "
                f"(last energy {energy_ev:.6f} eV)"
            ]), relaxed, n_steps=n_steps)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json()))
        os.replace(tmp, done)
        return result
