"""Duplicate detection of reference minima on planted duplicates and near-misses.

A benzamide crystal of the bundled landscape (32 atoms, Z = 2 x 2 molecules) is planted again as
a permuted supercell in a rotated frame, in another cell setting, and with convergence noise; all
are the same crystal. The same cell with every molecule turned by 20 degrees about its centre
(same lattice, same centres, same density and energy: the screen cannot tell) must not match.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import make_supercell
from ase.io import read
from scipy.spatial.transform import Rotation

from conftest import bundled
from graceq import polymorphs
from graceq.chemistry import _molecule_labels


@pytest.fixture(scope="module")
def crystal():
    frames = read(bundled("benzamide", "landscape.extxyz"), ":")
    atoms = next(f for f in frames if f.info["name"] == "benzamide-00517")
    assert len(atoms) == 32
    return atoms


def permuted_rotated_supercell(atoms, seed=0):
    """A 2 x 1 x 1 supercell, atoms shuffled, the whole crystal rotated in space."""
    big = atoms.repeat((2, 1, 1))
    big = big[np.random.default_rng(seed).permutation(len(big))]
    rot = Rotation.from_euler("zyx", [37.0, -21.0, 64.0], degrees=True).as_matrix()
    big.set_cell(big.cell.array @ rot.T, scale_atoms=False)
    big.positions = big.positions @ rot.T
    return big


def other_setting(atoms):
    """The same crystal described by the cell (a + b, b, a + c): a unimodular change of basis."""
    other = make_supercell(atoms, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    other.wrap()
    return other


def noisy(atoms, displacement=0.04, strain=0.005, seed=1):
    """A re-minimisation that stopped slightly elsewhere: atoms moved by up to `displacement` Å, cell by `strain`."""
    rng = np.random.default_rng(seed)
    out = atoms.copy()
    out.set_cell(out.cell.array @ (np.eye(3) + strain * rng.uniform(-1, 1, (3, 3))), scale_atoms=True)
    out.positions += rng.uniform(-displacement, displacement, out.positions.shape) / np.sqrt(3)
    return out


def unwrapped_molecule(atoms, idx):
    """Cartesian positions of the bonded molecule `idx`, each atom at the image bonded to its neighbour.

    (A minimum image from one atom is not enough: a molecule may be longer than half the cell.)
    """
    from ase.neighborlist import natural_cutoffs, neighbor_list

    from graceq.chemistry import BOND_SCALE

    i, j, shift = neighbor_list("ijS", atoms, natural_cutoffs(atoms, mult=BOND_SCALE))
    pos = {int(idx[0]): atoms.positions[idx[0]]}
    queue = [int(idx[0])]
    while queue:
        a = queue.pop()
        for b, s in zip(j[i == a], shift[i == a]):
            if int(b) not in pos:
                pos[int(b)] = pos[a] + atoms.positions[b] + s @ atoms.cell.array - atoms.positions[a]
                queue.append(int(b))
    assert sorted(pos) == sorted(int(k) for k in idx)
    return np.array([pos[int(k)] for k in idx])


def turned_molecules(atoms, degrees):
    """Every molecule rigidly rotated by `degrees` about the normal of its best plane, through its centre."""
    out = atoms.copy()
    n_mol, labels = _molecule_labels(atoms)
    for m in range(n_mol):
        idx = np.flatnonzero(labels == m)
        xyz = unwrapped_molecule(atoms, idx)
        centre = xyz.mean(axis=0)
        normal = np.linalg.svd(xyz - centre)[2][2]
        rot = Rotation.from_rotvec(np.radians(degrees) * normal).as_matrix()
        out.positions[idx] = centre + (xyz - centre) @ rot.T
    out.wrap()
    return out


def test_planted_duplicates_match(crystal):
    for copy in (permuted_rotated_supercell(crystal), other_setting(crystal), noisy(crystal),
                 turned_molecules(crystal, 5.0)):
        assert polymorphs.same_crystal(crystal, copy)
        assert polymorphs.cell_density_gcm3(copy) == pytest.approx(polymorphs.cell_density_gcm3(crystal), rel=0.02)


def test_near_miss_does_not_match(crystal):
    near = turned_molecules(crystal, 20.0)
    # a near miss: same lattice, density and molecular centres, so only the structure tells
    np.testing.assert_allclose(near.cell.array, crystal.cell.array)
    assert polymorphs.cell_density_gcm3(near) == pytest.approx(polymorphs.cell_density_gcm3(crystal), rel=1e-12)
    assert not polymorphs.same_crystal(crystal, near)
    # and it is near: a matcher four times looser takes it for the same crystal
    loose = polymorphs.MatchSettings(stol=1.2, ltol=0.3, angle_tol=10)
    assert polymorphs.same_crystal(crystal, near, loose)


def test_group_duplicates_groups_and_ranks(crystal):
    frames = [turned_molecules(crystal, 20.0), crystal, permuted_rotated_supercell(crystal),
              other_setting(crystal), noisy(crystal), crystal.copy()]
    energy = np.array([0.1, 0.0, 0.05, 0.3, 0.2, 3.0])  # kJ/mol per molecule; the last fails the screen
    verdicts = {}
    g = polymorphs.group_duplicates(frames, energy, keys=[10, 11, 12, 13, 14, 15], verdicts=verdicts)
    # group 0 holds the lowest energy (frame 1); the near miss (0.1) is group 1; the copy 3 kJ/mol
    # higher is not compared at all (energy screen) and is a group of its own
    assert g.group.tolist() == [1, 0, 0, 0, 0, 2]
    assert g.representative.tolist() == [True, True, False, False, False, True]
    assert g.n_unique == 3
    assert g.members() == [[1, 2, 3, 4], [0], [5]]
    # the screen: pairs among the first five only (all within 1 kJ/mol and 2 % in density)
    assert g.n_compared == 10 and g.n_cached == 0
    assert set(verdicts) == {f"{a}|{b}" for a in range(10, 15) for b in range(a + 1, 15)}
    again = polymorphs.group_duplicates(frames, energy, keys=[10, 11, 12, 13, 14, 15], verdicts=verdicts)
    assert again.n_compared == 0 and again.n_cached == 10
    assert again.group.tolist() == g.group.tolist()


def test_candidate_pairs_against_all_pairs():
    """The sorted-energy scan gives exactly the pairs a double loop over all pairs gives."""
    rng = np.random.default_rng(3)
    energy = rng.uniform(0, 10, 200)
    density = rng.uniform(1.2, 1.4, 200)
    s = polymorphs.MatchSettings(energy_tol_kjmol=0.5, density_tol=0.01)
    direct = [(i, j) for i in range(200) for j in range(i + 1, 200)
              if abs(energy[i] - energy[j]) <= 0.5 and abs(density[i] - density[j]) <= 0.01 * max(density[i], density[j])]
    assert polymorphs.candidate_pairs(energy, density, s) == direct
    assert len(direct) > 20
