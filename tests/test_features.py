"""Tests of graceq.features: invariances, determinism, persistence and direct reference formulas."""

import importlib.resources
import warnings

import ase.io
import featomic
import numpy as np
import pytest
from ase import Atoms
from sklearn.base import clone

from graceq.features import CompressedSoap, soap_hypers, species_of

DATA = importlib.resources.files("graceq") / "data"
TOL = 1e-10


@pytest.fixture(scope="module")
def benzamide():
    """Six small benzamide cells (H, C, N, O; 32-64 atoms)."""
    frames = ase.io.read(DATA / "benzamide" / "landscape.extxyz", ":12")
    small = [f for f in frames if len(f) <= 64][:6]
    assert len(small) == 6
    return small


@pytest.fixture(scope="module")
def roy():
    """Two ROY cells of 54 atoms (H, C, N, O, S)."""
    frames = ase.io.read(DATA / "roy264" / "roy264.extxyz", ":8")
    small = [f for f in frames if len(f) == 54][:2]
    assert len(small) == 2
    return small


@pytest.fixture(scope="module")
def fitted(benzamide):
    return CompressedSoap(species_of(benzamide)).fit(benzamide)


def dense_coefficients(frames, species, hypers):
    """Raw featomic coefficients as c[l] of shape (centres, species, n, m), zeros where absent."""
    expansion = featomic.SphericalExpansion(**hypers).compute(frames)
    n_max = hypers["basis"]["radial"]["max_radial"] + 1
    l_max = hypers["basis"]["max_angular"]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])])
    c = [np.zeros((offsets[-1], len(species), n_max, 2 * l + 1)) for l in range(l_max + 1)]
    for key, block in expansion.items():
        a = species.index(int(key["neighbor_type"]))
        l = int(key["o3_lambda"])
        assert block.properties.values[:, 0].tolist() == list(range(n_max))
        for row, (system, atom) in enumerate(block.samples.values):
            c[l][offsets[system] + atom, a] = block.values[row].T
    return c, offsets


def test_species_of(roy, benzamide):
    assert species_of(roy) == [1, 6, 7, 8, 16]
    assert species_of(benzamide) == [1, 6, 7, 8]
    assert species_of([Atoms("Cl2"), Atoms("HF")]) == [1, 9, 17]


def test_feature_length(fitted, benzamide, roy):
    assert fitted.n_features == 2500
    assert fitted.transform(benzamide[:2]).shape == (2, 2500)
    soap = CompressedSoap(species_of(roy)).fit(roy)
    assert soap.n_features == 3750
    features = soap.transform(roy)
    assert features.shape == (2, 3750) and features.dtype == np.float64
    assert len(soap.feature_labels()) == 3750
    # a cell without sulfur keeps the campaign's length, with zeros in every S channel
    no_sulfur = soap.transform(benzamide[:1])
    has_sulfur = (soap.feature_labels()[:, :2] == 16).any(axis=1)
    assert no_sulfur.shape == (1, 3750)
    assert np.all(no_sulfur[0, has_sulfur] == 0) and np.all(np.any(no_sulfur[:, ~has_sulfur] != 0))


def test_invariant_to_atom_order(fitted, benzamide):
    atoms = benzamide[0]
    order = np.random.default_rng(0).permutation(len(atoms))
    np.testing.assert_allclose(
        fitted.transform([atoms[order]]), fitted.transform([atoms]), rtol=0, atol=TOL
    )


def test_invariant_to_rigid_rotation(fitted, benzamide):
    atoms = benzamide[1]
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    if np.linalg.det(rotation) < 0:
        rotation[:, 0] *= -1
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rotation.T
    assert not np.allclose(rotated.positions, atoms.positions)
    np.testing.assert_allclose(
        fitted.transform([rotated]), fitted.transform([atoms]), rtol=0, atol=TOL
    )


@pytest.mark.parametrize("repeat", [(2, 1, 1), (2, 2, 1)])
def test_identical_for_supercell(fitted, benzamide, repeat):
    atoms = benzamide[2]
    np.testing.assert_allclose(
        fitted.transform([atoms.repeat(repeat)]), fitted.transform([atoms]), rtol=0, atol=TOL
    )


def test_deterministic_and_batch_independent(benzamide):
    first = CompressedSoap(species_of(benzamide), batch_size=4).fit(benzamide)
    second = CompressedSoap(species_of(benzamide), batch_size=1).fit(benzamide)
    np.testing.assert_allclose(first.projection_, second.projection_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        first.transform(benzamide), second.transform(benzamide), rtol=0, atol=TOL
    )


def test_save_load_round_trip(fitted, benzamide, tmp_path):
    path = tmp_path / "descriptor.npz"
    fitted.save(path)
    with np.load(path, allow_pickle=False) as data:  # no pickled objects in the file
        assert "projection" in data.files
    loaded = CompressedSoap.load(path)
    assert loaded.get_params() == fitted.get_params()
    np.testing.assert_array_equal(loaded.projection_, fitted.projection_)
    np.testing.assert_array_equal(loaded.explained_variance_ratio_, fitted.explained_variance_ratio_)
    np.testing.assert_array_equal(loaded.transform(benzamide), fitted.transform(benzamide))


def test_load_rejects_other_npz(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        CompressedSoap.load(path)


def test_against_direct_reference(roy):
    """Eigenvectors vs np.linalg.eigh of the covariance; features vs an explicit loop."""
    frames, species = roy, species_of(roy)
    soap = CompressedSoap(species, n_max=8, l_max=4, n_compressed=3).fit(frames)
    c, offsets = dense_coefficients(frames, species, soap.hypers())
    n_centres = offsets[-1]

    for a in range(len(species)):
        for l in range(5):
            covariance = np.einsum("inm,ikm->nk", c[l][:, a], c[l][:, a]) / n_centres
            values, vectors = np.linalg.eigh(covariance)
            values, vectors = values[::-1], vectors[:, ::-1]
            np.testing.assert_allclose(soap.eigenvalues_[a, l], values, rtol=1e-10, atol=1e-14)
            u = soap.projection_[a, l]
            # same subspace, each vector equal up to its (arbitrary) sign
            np.testing.assert_allclose(np.abs(u.T @ vectors[:, :3]), np.eye(3), atol=1e-8)
            np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)
            assert u[np.argmax(np.abs(u), axis=0), range(3)].min() > 0
            np.testing.assert_allclose(
                soap.explained_variance_ratio_[a, l], values[:3].sum() / values.sum(), rtol=1e-12
            )

    features = []
    for i in range(n_centres):
        vector = []
        for a1 in range(len(species)):
            for a2 in range(a1, len(species)):
                f = 1.0 if a1 == a2 else np.sqrt(2.0)
                for k1 in range(3):
                    for k2 in range(3):
                        for l in range(5):
                            x1 = soap.projection_[a1, l][:, k1] @ c[l][i, a1]
                            x2 = soap.projection_[a2, l][:, k2] @ c[l][i, a2]
                            vector.append(f / np.sqrt(2 * l + 1) * np.sum(x1 * x2))
        vector = np.array(vector)
        features.append(vector / np.linalg.norm(vector))
    features = np.array(features)
    expected = np.array(
        [features[offsets[s] : offsets[s + 1]].mean(axis=0) for s in range(len(frames))]
    )
    np.testing.assert_allclose(soap.transform(frames), expected, rtol=0, atol=1e-12)


def test_matches_featomic_power_spectrum(benzamide):
    """With the full basis and the identity projection, equal to featomic's SoapPowerSpectrum.

    featomic couples with (-1)**l / sqrt(2l+1); DESIGN.md (and librascal) with +1 / sqrt(2l+1).
    """
    frames = benzamide[:2]
    soap = CompressedSoap(species_of(frames), n_max=6, l_max=4, n_compressed=6).fit(frames)
    soap.projection_ = np.broadcast_to(np.eye(6), soap.projection_.shape).copy()
    ours = soap.transform(frames)

    spectrum = featomic.SoapPowerSpectrum(**soap.hypers()).compute(frames)
    block = spectrum.keys_to_samples("center_type").keys_to_properties(
        ["neighbor_1_type", "neighbor_2_type"]
    ).block()
    assert block.properties.names == ["neighbor_1_type", "neighbor_2_type", "l", "n_1", "n_2"]
    column = {tuple(row): i for i, row in enumerate(soap.feature_labels())}
    columns = [column[(z1, z2, n1, n2, l)] for z1, z2, l, n1, n2 in block.properties.values]
    values = block.values * (-1.0) ** block.properties.values[:, 2]
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    system = block.samples.values[:, block.samples.names.index("system")]
    reference = np.zeros_like(ours)
    for s in range(len(frames)):
        reference[s, columns] = values[system == s].mean(axis=0)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)


def test_full_basis_keeps_all_variance(benzamide):
    soap = CompressedSoap(species_of(benzamide), n_max=6, l_max=3, n_compressed=6)
    soap.fit(benzamide[:3])
    np.testing.assert_allclose(soap.explained_variance_ratio_, 1.0, rtol=0, atol=1e-12)
    compressed = CompressedSoap(species_of(benzamide), n_max=6, l_max=3, n_compressed=2)
    ratio = compressed.fit(benzamide[:3]).explained_variance_ratio_
    assert np.all((ratio > 0.3) & (ratio < 1.0))


def test_native_willatt_scaling():
    """featomic's native Willatt2018 scaling is c / (c + (r / r0)**m) (the Python one is buggy)."""
    r = 2.1
    dimer = Atoms("HC", positions=[[0, 0, 0], [0, 0, r]], pbc=False)
    scaled = soap_hypers(n_max=4, l_max=2, scaling_rate=1.0, scaling_scale=3.5, scaling_exponent=2)
    plain = soap_hypers(n_max=4, l_max=2)
    del plain["density"]["scaling"]

    def block(hypers):
        expansion = featomic.SphericalExpansion(**hypers).compute([dimer])
        return expansion.block(o3_lambda=0, center_type=1, neighbor_type=6).values

    ratio = block(scaled) / block(plain)
    np.testing.assert_allclose(ratio, 1.0 / (1.0 + (r / 3.5) ** 2), rtol=1e-10)


def test_unknown_species_raises(fitted, roy):
    with pytest.raises(ValueError, match=r"16 \(S\).*\[1, 6, 7, 8\]") as info:
        fitted.transform(roy[:1])
    assert roy[0].info["name"] in str(info.value)
    with pytest.raises(ValueError, match=r"16 \(S\)"):
        CompressedSoap([1, 6, 7, 8]).fit(roy[:1])


def test_species_absent_from_fit_warns(benzamide):
    soap = CompressedSoap([1, 6, 7, 8, 16], n_max=4, l_max=2, n_compressed=2)
    with pytest.warns(UserWarning, match=r"16 \(S\)"):
        soap.fit(benzamide[:1])
    assert np.all(np.isnan(soap.explained_variance_ratio_[4]))
    np.testing.assert_array_equal(soap.projection_[4, 0], np.eye(4)[:, :2])


def test_progress_and_sklearn_conventions(benzamide):
    soap = CompressedSoap(species_of(benzamide), n_max=4, l_max=2, n_compressed=2, batch_size=4)
    assert not hasattr(soap, "projection_")
    with pytest.raises(RuntimeError, match="fit"):
        soap.transform(benzamide[:1])
    done = []
    soap.fit(benzamide)
    soap.transform(benzamide, progress=done.append)
    assert done == [4, 6]
    copy = clone(soap)
    assert copy.get_params() == soap.get_params() and not hasattr(copy, "projection_")
    with pytest.raises(ValueError, match="n_compressed"):
        CompressedSoap([1], n_max=4, n_compressed=5).fit(benzamide[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soap.fit_transform(benzamide[:2])
