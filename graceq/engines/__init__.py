"""Reference engines behind one interface: ``replay``, ``ase``, ``slurm``.

``make_engine(settings, unit)`` builds the campaign's engine from its ``[engine]`` settings. A new
engine is one new file with a :class:`ReferenceEngine` subclass, plus one line in ``ENGINES`` (or
a :func:`register_engine` call, or ``engine = "package.module:Class"`` in the settings).
"""

from __future__ import annotations

import importlib
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


def register_engine(name: str, target) -> None:
    """Make ``settings["engine"] = name`` build ``target`` (a ReferenceEngine subclass or "module:Class")."""
    ENGINES[name] = target


def engine_class(name: str) -> type:
    """Return the ReferenceEngine subclass registered as ``name`` (or given as "module:Class")."""
    target = ENGINES.get(name, name if ":" in str(name) else None)
    if target is None:
        raise ValueError(f"unknown reference engine {name!r}; known: {', '.join(ENGINES)}")
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
    cls = engine_class(settings.get("engine", "replay"))
    engine = cls.from_settings(settings, unit, pool_source)
    engine.check()
    return engine


__all__ = [
    "ENGINES",
    "STATUSES",
    "ReferenceEngine",
    "ReferenceResult",
    "engine_class",
    "make_engine",
    "register_engine",
]
