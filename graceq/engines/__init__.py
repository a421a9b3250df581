"""Reference engines behind one interface: ``replay``, ``ase``, ``slurm``.

``make_engine(settings, unit)`` builds the campaign's engine from its ``[engine]`` settings. A new
engine is one new file with a :class:`ReferenceEngine` subclass, plus one line in ``ENGINES``, a
:func:`register_engine` call, or an entry point of an installed package::

    [project.entry-points."graceq.engines"]
    mycode = "mypackage.engine:MyEngine"

The registry (those three) is what a settings file may name on any worker. ``engine =
"package.module:Class"`` in a settings file is code: it loads only where the worker's operator
allows settings code (``graceq worker --allow-code``; see ``graceq.trust``), because a settings
file comes from a campaign author who, on a shared worker pool, is not the operator.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from importlib.metadata import entry_points
from typing import Any

from graceq.units import check_unit

from .base import STATUSES, ReferenceEngine, ReferenceResult

#: engine name -> "module:Class"; imported only when asked for, so that an engine's optional
#: dependencies (a DFT code's ASE calculator, SLURM tools) are needed only by campaigns using it.
ENGINES: dict[str, Any] = {
    "replay": "graceq.engines.replay:ReplayEngine",
    "ase": "graceq.engines.ase_relax:AseRelaxEngine",
    "slurm": "graceq.engines.slurm:SlurmEngine",
}


#: entry-point groups through which installed packages add engines and ASE calculators
ENGINE_GROUP = "graceq.engines"
CALCULATOR_GROUP = "graceq.calculators"

#: [engine.slurm] keys that are code (shell lines, programs run) and their harmless defaults
SLURM_CODE_KEYS = {"setup": [], "command": "graceq relax", "sbatch_args": [], "sbatch": "sbatch",
                   "squeue": "squeue"}


#: group -> (the folders on sys.path as they were, that group's entry points then)
_REGISTERED: dict[str, tuple[tuple, dict[str, Any]]] = {}


def _import_path_state() -> tuple:
    """Each sys.path folder with its identity and mtime: installing or removing a package adds or
    removes its ``.dist-info`` folder there, which changes the folder's mtime."""
    state = []
    for folder in sys.path:
        try:
            st = os.stat(folder or ".")
            state.append((folder, st.st_dev, st.st_ino, st.st_mtime_ns))
        except OSError:
            state.append((folder, None))
    return tuple(state)


def registered(group: str) -> dict[str, Any]:
    """Entry points of installed packages in ``group`` (name -> EntryPoint), loaded only when used.

    Reading every installed package's metadata takes milliseconds, and a worker asks for every
    reference job (its message check and the engine it builds): the answer is kept until a folder
    on sys.path changes (a package installed or removed there).
    """
    state = _import_path_state()
    cached = _REGISTERED.get(group)
    if cached is None or cached[0] != state:
        cached = _REGISTERED[group] = (state, {ep.name: ep for ep in entry_points(group=group)})
    return dict(cached[1])


def register_engine(name: str, target) -> None:
    """Make ``settings["engine"] = name`` build ``target`` (a ReferenceEngine subclass or "module:Class")."""
    ENGINES[name] = target


def engine_class(name: str, allow_code: bool | None = None) -> type:
    """Return the ReferenceEngine subclass registered as ``name`` (or given as "module:Class").

    Registered: ``ENGINES`` (graceq's own and :func:`register_engine`), then entry points of
    installed packages in the ``graceq.engines`` group. A "module:Class" path from a settings
    file loads only when settings code is allowed (``allow_code``, default
    :func:`graceq.trust.settings_code_allowed`); else :class:`graceq.trust.CodeNotAllowed`.
    """
    from graceq.trust import code_refusal, settings_code_allowed

    name = str(name)
    plugins = {} if name in ENGINES else registered(ENGINE_GROUP)
    if name in ENGINES:
        target = ENGINES[name]
    elif name in plugins:
        try:
            target = plugins[name].load()
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reference engine {name!r}: its entry point {plugins[name].value} "
                             f"cannot be loaded ({exc})") from exc
    elif ":" in name:
        if not (settings_code_allowed() if allow_code is None else allow_code):
            raise code_refusal(
                f"reference engine {name!r}",
                f"Install it as a package with an entry point in the group {ENGINE_GROUP!r}. ",
            )
        target = name
    else:
        known = sorted(set(ENGINES) | set(plugins))
        raise ValueError(f"unknown reference engine {name!r}; known: {', '.join(known)}")
    if isinstance(target, str):
        module_name, _, class_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reference engine {name!r}: cannot import {target} ({exc})") from exc
    else:
        cls = target
    if not (isinstance(cls, type) and issubclass(cls, ReferenceEngine)):
        raise ValueError(f"reference engine {name!r}: {cls!r} is not a ReferenceEngine subclass")
    return cls


def check_engine_settings(settings: dict[str, Any], allow_code: bool | None = None) -> type:
    """The engine class of ``[engine]`` settings; raises :class:`graceq.trust.CodeNotAllowed` if
    they name code that is not allowed.

    Imports nothing outside the registry and builds nothing: what a worker checks before a
    reference task may write a file. Covers the engine, the ASE calculator (also the slurm
    engine's), the calculator parameters that name programs or paths, and the slurm engine's
    shell lines and programs.
    """
    from graceq.trust import code_refusal, settings_code_allowed

    allowed = settings_code_allowed() if allow_code is None else allow_code
    settings = dict(settings or {})
    cls = engine_class(settings.get("engine", "replay"), allow_code=allowed)
    if settings.get("calculator") is not None:
        from .ase_relax import check_calculator_parameters, resolve_calculator

        resolve_calculator(settings["calculator"], allow_code=allowed)
        check_calculator_parameters(settings.get("calculator_parameters") or {}, allow_code=allowed)
    slurm = settings.get("slurm")
    if isinstance(slurm, dict) and not allowed:
        for key, default in SLURM_CODE_KEYS.items():
            if key in slurm and slurm[key] != default:
                raise code_refusal(f"[engine.slurm] {key} = {slurm[key]!r}",
                                   "Shell lines and programs of the batch jobs come from the worker's "
                                   "environment (its `module load`s) when settings code is off. ")
        for key, value in slurm.items():
            if key not in SLURM_CODE_KEYS and isinstance(value, str) and not re.fullmatch(r"[\w.:,=/@+-]*", value):
                raise code_refusal(f"[engine.slurm] {key} = {value!r}",
                                   "Values written into the batch script must be plain words. ")
    return cls


def make_engine(settings: dict[str, Any], unit: str, pool_source: str | None = None) -> ReferenceEngine:
    """Return the checked engine for the campaign's ``[engine]`` settings.

    ``settings["engine"]`` names the engine ("replay" when absent); the other keys are the engine's
    own. ``unit`` is the campaign energy unit the engine reports in; ``pool_source`` is the pool
    file, where the replay engine finds ``energy_ref`` by default. Raises ValueError (or the
    engine's own error) when the engine cannot work, e.g. an unknown calculator: the runtime
    calls this before any work starts.
    """
    settings = dict(settings or {})
    unit = check_unit(unit)
    cls = check_engine_settings(settings)
    engine = cls.from_settings(settings, unit, pool_source)
    engine.check()
    return engine


__all__ = [
    "CALCULATOR_GROUP",
    "ENGINES",
    "ENGINE_GROUP",
    "STATUSES",
    "ReferenceEngine",
    "ReferenceResult",
    "check_engine_settings",
    "engine_class",
    "make_engine",
    "register_engine",
    "registered",
]
