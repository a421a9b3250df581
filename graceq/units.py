"""Energy units that graceq accepts on input, and their conversion to and from eV.

Input energies are totals per unit cell in a unit the user names; calculators (ASE) work
in eV. The factors come from ``ase.units`` so that graceq and ASE agree to the last digit.
"""

from __future__ import annotations

import numpy as np
from ase import units as _ase

#: Canonical unit name -> size of one such unit in eV (per cell, not per molecule).
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "kJ/mol": _ase.kJ / _ase.mol,
    "kcal/mol": _ase.kcal / _ase.mol,
    "Hartree": _ase.Hartree,
    "Ry": _ase.Rydberg,
}

# Accepted spellings (compared case-insensitively, spaces removed) -> canonical name.
_ALIASES: dict[str, str] = {
    "ev": "eV",
    "mev": "meV",
    "kj/mol": "kJ/mol",
    "kjmol": "kJ/mol",
    "kjmol-1": "kJ/mol",
    "kcal/mol": "kcal/mol",
    "kcalmol": "kcal/mol",
    "kcalmol-1": "kcal/mol",
    "hartree": "Hartree",
    "ha": "Hartree",
    "eh": "Hartree",
    "ry": "Ry",
    "rydberg": "Ry",
}


def check_unit(unit: str) -> str:
    """Return the canonical name of an energy unit ("kj/mol" -> "kJ/mol").

    Raises ValueError listing the known units when ``unit`` is not one of them.
    """
    key = str(unit).strip().replace(" ", "").lower()
    try:
        return _ALIASES[key]
    except KeyError:
        known = ", ".join(ENERGY_UNITS)
        raise ValueError(
            f"unknown energy unit {unit!r}: use one of {known} "
            "(also accepted: Ha for Hartree, Rydberg for Ry)"
        ) from None


def to_ev(value, unit: str):
    """Return ``value`` (given in ``unit``) converted to eV; scalars stay scalars."""
    factor = ENERGY_UNITS[check_unit(unit)]
    if np.ndim(value) == 0:
        return float(value) * factor
    return np.asarray(value, dtype=float) * factor


def from_ev(value_ev, unit: str):
    """Return ``value_ev`` (in eV) converted to ``unit``; scalars stay scalars."""
    factor = ENERGY_UNITS[check_unit(unit)]
    if np.ndim(value_ev) == 0:
        return float(value_ev) / factor
    return np.asarray(value_ev, dtype=float) / factor
