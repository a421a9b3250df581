"""Molecules of a crystal structure, found from its bonded connectivity.

Two atoms are bonded when closer than :data:`BOND_SCALE` times the sum of their ASE covalent radii
(bonds across periodic boundaries count); a molecule is a connected component of the bond graph.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.formula import Formula
from ase.neighborlist import natural_cutoffs, neighbor_list
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

#: Two atoms are bonded when closer than BOND_SCALE x (sum of ASE covalent radii). 1.0 misses
#: many C-H bonds (1.09 A vs 1.07 A); on ROY-264 and benzamide the bonded pairs lie below 1.05
#: and the closest non-bonded contacts above 1.4, so 1.2 sits safely in the gap.
BOND_SCALE = 1.2


def _molecule_labels(atoms: Atoms) -> tuple[int, np.ndarray]:
    """Return (number of molecules, molecule label per atom) from covalent bonds.

    Labels are numbered in order of each molecule's first atom, so atom 0 is in molecule 0.
    Bonds across periodic boundaries count, so a molecule split by the cell is one molecule.
    """
    n = len(atoms)
    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=BOND_SCALE))
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)


def molecule_formulas(atoms: Atoms) -> list[str]:
    """Return the Hill formula of every bonded molecule in the cell, ordered by first atom."""
    if len(atoms) == 0:
        return []
    n_mol, labels = _molecule_labels(atoms)
    counts = np.zeros((n_mol, int(atoms.numbers.max()) + 1), dtype=int)
    np.add.at(counts, (labels, atoms.numbers), 1)
    cache: dict[bytes, str] = {}
    formulas = []
    for row in counts:
        key = row.tobytes()
        if key not in cache:
            cache[key] = Formula.from_dict(
                {chemical_symbols[z]: int(c) for z, c in enumerate(row) if c}
            ).format("hill")
        formulas.append(cache[key])
    return formulas


def _describe_molecules(formulas: Sequence[str]) -> str:
    """'3 x C7H7NO, 1 x C7H6NO, 1 x H' for a list of molecule formulas."""
    seen: dict[str, int] = {}
    for f in formulas:
        seen[f] = seen.get(f, 0) + 1
    return ", ".join(f"{c} x {f}" for f, c in seen.items())


def molecular_formula(atoms: Atoms) -> str:
    """Return the Hill formula of the one molecule the cell is made of.

    Raises ValueError when the cell holds molecules of different formulas (a broken molecule,
    or more than one kind of molecule).
    """
    formulas = molecule_formulas(atoms)
    if not formulas:
        raise ValueError("the structure has no atoms")
    if len(set(formulas)) != 1:
        raise ValueError(
            f"the cell holds molecules of different formulas ({_describe_molecules(formulas)}): "
            "a molecule is broken or merged with another, or the crystal has more than one "
            "kind of molecule"
        )
    return formulas[0]


def atoms_per_molecule(atoms: Atoms) -> int:
    """Return the number of atoms of one molecule (the bonded molecule holding atom 0).

    Raises ValueError when not all molecules in the cell have the same formula.
    """
    molecular_formula(atoms)  # all molecules alike, else ValueError
    n_mol, _ = _molecule_labels(atoms)
    return len(atoms) // n_mol



def _composition_per_molecule(atoms: Atoms, apm: int):
    """Sorted (Z, count per molecule) pairs, or None when the cell is not whole molecules."""
    n = len(atoms)
    if n == 0 or n % apm:
        return None
    n_mol = n // apm
    z, c = np.unique(atoms.numbers, return_counts=True)
    if np.any(c % n_mol):
        return None
    return tuple(zip(z.tolist(), (c // n_mol).tolist()))
