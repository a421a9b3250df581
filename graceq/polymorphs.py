"""Unique polymorphs: which measured reference minima are the same crystal.

Several reference minimisations of a CSP pool often converge to one crystal (the force field had
two minima where the reference level has one, or the generator made the same packing twice), so
"34 structures in the window" may be fewer polymorphs. Every CSP pipeline clusters its landscape
before ranking (COMPACK, PXRD similarity, pymatgen's StructureMatcher). graceq does it in two steps:

1. **Screen** (cheap, on numbers): two structures can only be the same minimum of one energy
   surface if their reference energies per molecule differ by at most ``energy_tol_kjmol`` and
   their densities by at most ``density_tol`` (relative).
2. **Confirm** (pymatgen's :class:`~pymatgen.analysis.structure_matcher.StructureMatcher`) on the
   pairs that pass the screen, with molecule-aware settings:

   - hydrogens are left out (as COMPACK does by default): their positions are the least
     converged and the least reliable of a minimum, and the heavy atoms fix the packing;
   - ``primitive_cell=True`` and ``attempt_supercell=True``: the same crystal in a supercell, in
     another cell setting, with atoms in another order, or rotated, is the same crystal;
   - ``scale=False``: at one level of theory a duplicate has the same volume (and the density
     screen has checked it), so cells are not rescaled to each other;
   - ``ltol=0.2`` (fractional cell lengths), ``angle_tol=5`` degrees: pymatgen's defaults;
   - ``stol=0.3``: pymatgen's default, a bound on the *largest* heavy-atom displacement after the
     best superposition, in units of ``(V / N_heavy)^(1/3)`` (2.7 Å for a benzamide crystal of
     1.11 g/cm^3, so 0.8 Å). Measured on such a crystal: every molecule turned rigidly about its
     centre by up to 16 degrees (heavy atoms moved by up to 0.78 Å) is still the same crystal, by
     20 degrees (0.97 Å) it is another one; COMPACK's usual tolerance is 20 % in distances and 20
     degrees in angles. tests/test_polymorphs.py plants 5 and 20 degrees.

Why not a SOAP distance: on the benzamide landscape (46 structures within 15 kJ/mol) the nearest
distinct crystals are 0.041 apart in the campaign's averaged SOAP features (feature norm 0.64), while
the same crystal with every molecule turned by 5 degrees is 0.037 away: no threshold separates the
two without a confirming matcher, and the campaign's features describe the force-field structures,
not the reference minima. The energy and density screen needs neither.

Measured on the bundled benzamide landscape (energies relative to the lowest energy_ref; machine
shared by several jobs): 4 structures within 5 kJ/mol, 15 within 10 and 46 within 15 are 4, 15 and
46 distinct crystals (0, 3 and 49 pairs pass the screen; StructureMatcher on all 105 pairs of the
10 kJ/mol window also finds none, 19 ms a pair once the structures are reduced); the whole usable
pool (645) is 645 distinct crystals (3866 screened pairs, 155 s).

The verdicts of compared pairs are kept in ``<campaign>/artifacts/duplicates.json`` (keyed by the
pool indices and the settings), so a campaign compares each pair once, across iterations and
commands.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

#: 1 amu/Å^3 in g/cm^3
AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660


def cell_density_gcm3(atoms) -> float:
    """Crystal density in g/cm^3: total atomic mass (amu) over cell volume (Å^3)."""
    return float(atoms.get_masses().sum() / atoms.get_volume() * AMU_PER_A3_TO_G_PER_CM3)


@dataclass(frozen=True)
class MatchSettings:
    """Tolerances of the duplicate test (see the module docstring for why these values).

    ``energy_tol_kjmol`` is per molecule in kJ/mol (converted to the campaign unit when used);
    ``density_tol`` is relative (0.02 = 2 %); ``ltol``, ``stol``, ``angle_tol`` (degrees) are
    StructureMatcher's; ``ignore_hydrogen`` leaves H atoms out of the comparison.
    """

    energy_tol_kjmol: float = 1.0
    density_tol: float = 0.02
    ltol: float = 0.2
    stol: float = 0.3
    angle_tol: float = 5.0
    ignore_hydrogen: bool = True

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return (f"StructureMatcher(ltol={self.ltol}, stol={self.stol}, angle_tol={self.angle_tol}, "
                f"primitive_cell, attempt_supercell, scale=False"
                f"{', hydrogens ignored' if self.ignore_hydrogen else ''}) on pairs within "
                f"{self.energy_tol_kjmol} kJ/mol per molecule and {100 * self.density_tol:g} % in density")


DEFAULT_SETTINGS = MatchSettings()


@dataclass
class Grouping:
    """Duplicate groups of a list of structures.

    ``group[k]`` is the group number of structure k (0 = the group holding the lowest energy,
    then by each group's lowest energy); ``representative[k]`` is True for the lowest-energy
    member of its group (the one a chemist keeps). ``n_compared`` pairs went to StructureMatcher
    (``n_cached`` more were known from an earlier call), taking ``seconds``.
    """

    group: np.ndarray
    representative: np.ndarray
    n_compared: int = 0
    n_cached: int = 0
    seconds: float = 0.0
    verdicts: dict = field(default_factory=dict)

    @property
    def n_unique(self) -> int:
        return int(len(set(self.group.tolist())))

    def members(self) -> list[list[int]]:
        """Positions of the structures of every group, in group order."""
        out: dict[int, list[int]] = {}
        for k, g in enumerate(self.group.tolist()):
            out.setdefault(g, []).append(k)
        return [out[g] for g in sorted(out)]


def structure_matcher(settings: MatchSettings = DEFAULT_SETTINGS):
    """The StructureMatcher of the confirmation step (hydrogens are removed beforehand)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol,
                            primitive_cell=True, scale=False, attempt_supercell=True)


def reduced_structure(atoms, settings: MatchSettings = DEFAULT_SETTINGS):
    """The pymatgen Structure compared for ``atoms``: hydrogens removed, primitive, Niggli-reduced.

    Done once per structure (StructureMatcher would redo it for every pair).
    """
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    if settings.ignore_hydrogen and any(z != 1 for z in atoms.numbers):
        structure.remove_species(["H"])
    return structure.get_primitive_structure().get_reduced_structure()


def same_crystal(atoms_a, atoms_b, settings: MatchSettings = DEFAULT_SETTINGS) -> bool:
    """True when StructureMatcher finds the two structures the same crystal (no energy screen)."""
    matcher = structure_matcher(settings)
    return bool(matcher.fit(reduced_structure(atoms_a, settings), reduced_structure(atoms_b, settings),
                            skip_structure_reduction=True))


def candidate_pairs(energy_kjmol: np.ndarray, density: np.ndarray,
                    settings: MatchSettings = DEFAULT_SETTINGS) -> list[tuple[int, int]]:
    """Pairs (i < j) within the energy (kJ/mol per molecule) and relative density tolerances."""
    energy_kjmol = np.asarray(energy_kjmol, dtype=float)
    density = np.asarray(density, dtype=float)
    order = np.argsort(energy_kjmol, kind="stable")
    pairs = []
    for a, i in enumerate(order):  # sorted by energy: stop scanning once past the tolerance
        for j in order[a + 1:]:
            if energy_kjmol[j] - energy_kjmol[i] > settings.energy_tol_kjmol:
                break
            if abs(density[i] - density[j]) <= settings.density_tol * max(density[i], density[j]):
                pairs.append((int(min(i, j)), int(max(i, j))))
    return sorted(pairs)


def group_duplicates(frames: Sequence, energy_kjmol, keys: Sequence | None = None,
                     settings: MatchSettings = DEFAULT_SETTINGS, verdicts: dict | None = None) -> Grouping:
    """Group the structures that are the same crystal (screen, then StructureMatcher).

    Parameters
    ----------
    frames : list of ase.Atoms
        Reference minima (periodic cells).
    energy_kjmol : array
        Reference energy per molecule of each, in kJ/mol (any zero: only differences matter).
    keys : list of str, optional
        A stable key per structure (e.g. its pool index) under which pair verdicts are cached in
        ``verdicts``; default: the positions.
    verdicts : dict, optional
        ``"key_a|key_b" -> bool`` of pairs compared before; new verdicts are added to it.
    """
    n = len(frames)
    energy = np.asarray(energy_kjmol, dtype=float)
    if energy.shape != (n,):
        raise ValueError(f"group_duplicates needs one energy per structure ({n}), got shape {energy.shape}")
    keys = [str(k) for k in (range(n) if keys is None else keys)]
    verdicts = {} if verdicts is None else verdicts
    density = np.array([cell_density_gcm3(a) for a in frames])
    parent = list(range(n))

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    matcher = None
    reduced: dict[int, object] = {}
    n_compared = n_cached = 0
    start = time.perf_counter()
    for i, j in candidate_pairs(energy, density, settings):
        key = "|".join(sorted((keys[i], keys[j])))
        if key in verdicts:
            n_cached += 1
            same = verdicts[key]
        else:
            if matcher is None:
                matcher = structure_matcher(settings)
            for k in (i, j):
                if k not in reduced:
                    reduced[k] = reduced_structure(frames[k], settings)
            lo, hi = (i, j) if energy[i] <= energy[j] else (j, i)
            same = bool(matcher.fit(reduced[lo], reduced[hi], skip_structure_reduction=True))
            verdicts[key] = same
            n_compared += 1
        if same:
            parent[root(j)] = root(i)
    roots = np.array([root(k) for k in range(n)])
    lowest = {r: min(np.flatnonzero(roots == r), key=lambda k: (energy[k], k)) for r in set(roots.tolist())}
    ranked = sorted(lowest, key=lambda r: (energy[lowest[r]], lowest[r]))
    number = {r: g for g, r in enumerate(ranked)}
    group = np.array([number[r] for r in roots], dtype=int)
    representative = np.zeros(n, dtype=bool)
    representative[[lowest[r] for r in ranked]] = True
    return Grouping(group=group, representative=representative, n_compared=n_compared, n_cached=n_cached,
                    seconds=time.perf_counter() - start, verdicts=verdicts)


# -- a campaign's reference minima ----------------------------------------------------------------
@dataclass
class CampaignDuplicates:
    """Duplicate groups of a campaign's measured stable structures in a scope.

    ``indices`` are pool indices (lowest energy first), ``grouping`` their groups, ``names`` their
    names; ``energy`` is the reference energy per molecule in the campaign unit; ``scope`` says
    which structures were grouped ("window": within best + window (+ the energy tolerance, so that
    a duplicate just above the window's top joins its group); "measured": every stable one).
    """

    indices: np.ndarray
    names: list
    energy: np.ndarray
    grouping: Grouping
    scope: str
    settings: MatchSettings
    best: float | None
    window: float

    def group_of(self) -> dict[int, int]:
        """Pool index -> group number."""
        return {int(i): int(g) for i, g in zip(self.indices, self.grouping.group)}

    def representative_of(self) -> dict[int, str]:
        """Pool index -> name of the lowest-energy structure of its group."""
        rep = {int(g): self.names[k] for k, g in enumerate(self.grouping.group) if self.grouping.representative[k]}
        return {int(i): rep[int(g)] for i, g in zip(self.indices, self.grouping.group)}

    def in_window(self) -> np.ndarray:
        """Mask of the grouped structures within best + window."""
        if self.best is None:
            return np.zeros(len(self.indices), dtype=bool)
        return self.energy <= self.best + self.window

    @property
    def n_window(self) -> int:
        return int(self.in_window().sum())

    @property
    def n_window_unique(self) -> int:
        """Distinct crystals among the window structures."""
        return int(len(set(self.grouping.group[self.in_window()].tolist())))

    def window_groups(self) -> list[list[str]]:
        """Names of every group with more than one window structure (lowest energy first)."""
        mask = self.in_window()
        out = []
        for members in self.grouping.members():
            names = [self.names[k] for k in members if mask[k]]
            if len(names) > 1:
                out.append(names)
        return out


def relaxed_structures(root, indices: Sequence[int]) -> dict:
    """Pool index -> the structure the reference engine returned (relaxed.db), where it returned one."""
    from ase.db import connect

    from graceq.store import CampaignPaths

    paths = CampaignPaths(root)
    relaxed = {}
    if paths.relaxed.exists():
        wanted = {int(i) for i in indices}
        with connect(paths.relaxed) as db:
            for row in db.select(sort="id"):
                idx = row.get("pool_index")
                if idx is not None and int(idx) in wanted:
                    relaxed[int(idx)] = row.toatoms()
    return relaxed


def reference_minima(root, indices: Sequence[int]) -> list:
    """The reference-level structure of each pool index: the engine's relaxed structure
    (relaxed.db) where it returned one, else the pool structure (structures.db)."""
    from ase.db import connect

    from graceq.store import CampaignPaths

    relaxed = relaxed_structures(root, indices)
    out = []
    with connect(CampaignPaths(root).structures) as db:
        for i in indices:
            out.append(relaxed[int(i)] if int(i) in relaxed else db.get(id=int(i) + 1).toatoms())
    return out


def _cache_path(root) -> Path:
    from graceq.store import CampaignPaths

    return CampaignPaths(root).artifacts / "duplicates.json"


def campaign_duplicates(root, scope: str = "window", settings: MatchSettings = DEFAULT_SETTINGS) -> CampaignDuplicates:
    """Group a campaign's measured stable reference minima (cached pair verdicts are reused).

    ``scope`` "window": the structures within best + window (+ energy tolerance); "measured":
    every stable measured structure.
    """
    from graceq.campaign import STABLE, per_molecule
    from graceq.config import load_settings
    from graceq.store import CampaignPaths, CampaignStore, atomic_write_json
    from graceq.units import from_ev, to_ev

    if scope not in ("window", "measured"):
        raise ValueError(f"scope must be 'window' or 'measured', got {scope!r}")
    paths = CampaignPaths(root)
    campaign = load_settings(paths.settings).campaign
    unit = campaign.unit
    store = CampaignStore(paths.root)
    try:
        apm = int(store.get_meta("atoms_per_molecule"))
        s = store.structures()
        results = store.results()
    finally:
        store.close()
    stable = sorted(i for i, (status, e) in results.items() if status == STABLE and e is not None)
    energy = {i: float(per_molecule(results[i][1], s["n_atoms"][i], apm)) for i in stable}
    best = min(energy.values()) if energy else None
    tol_unit = from_ev(to_ev(settings.energy_tol_kjmol, "kJ/mol"), unit)
    if scope == "window" and best is not None:
        stable = [i for i in stable if energy[i] <= best + float(campaign.window) + tol_unit]
    stable.sort(key=lambda i: (energy[i], i))
    e = np.array([energy[i] for i in stable])
    cache_file = _cache_path(paths.root)
    cache = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}  # a damaged cache only costs time: the pairs are compared again
    verdicts = cache.get("verdicts", {}) if cache.get("settings") == settings.key() else {}
    before = len(verdicts)
    grouping = group_duplicates(reference_minima(paths.root, stable), from_ev(to_ev(e, unit), "kJ/mol"),
                                keys=stable, settings=settings, verdicts=verdicts)
    if len(verdicts) != before:
        atomic_write_json(cache_file, {"settings": settings.key(), "verdicts": verdicts})
    return CampaignDuplicates(indices=np.array(stable, dtype=int), names=[str(s["name"][i]) for i in stable],
                              energy=e, grouping=grouping, scope=scope, settings=settings, best=best,
                              window=float(campaign.window))
