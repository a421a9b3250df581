"""SOAP power spectrum with an optimal (compressed) radial basis, one vector per crystal.

What this gives (DESIGN.md section 2): for every crystal, the SOAP power spectrum centred on every
atom of the cell, each centre's vector normalised to unit length, averaged over all centres of the
cell. Before the power spectrum is formed, the density expansion coefficients ``c[a, n, l, m]``
(neighbour species ``a``, radial index ``n < n_max``, angular channel ``l <= l_max``) are projected,
for each ``(a, l)``, onto the ``n_compressed`` leading eigenvectors of their uncentred covariance
over the fitting structures (Goscinski et al. 2021, "optimal radial basis"; librascal's
radial-basis tools do the same):

    C[a, l] = 1 / N_centres * sum_i sum_m c_i[a, :, l, m] c_i[a, :, l, m]^T      (n_max x n_max)
    c~[a, k, l, m] = sum_n U[a, l][n, k] c[a, n, l, m]                           (k < n_compressed)
    p[a1, a2, k1, k2, l] = f(a1, a2) / sqrt(2l + 1) * sum_m c~[a1, k1, l, m] c~[a2, k2, l, m]

with ``f = sqrt(2)`` for ``a1 != a2`` and 1 otherwise. Only species pairs ``a1 <= a2`` are kept,
and for every kept pair *all* ``(k1, k2)`` (also for ``a1 == a2``, where the ``k1 > k2`` entries
repeat the ``k1 < k2`` ones with factor 1: this is featomic's ``SoapPowerSpectrum`` convention and
makes the dot product of two reduced vectors equal that of the full ``(a1, a2)`` tensors). The
length is ``S (S + 1) / 2 * n_compressed**2 * (l_max + 1)``: 2,500 for 4 species, 3,750 for ROY's 5
species with the seed settings. Features are ordered ``(a1, a2, k1, k2, l)`` with ``l`` fastest
(see :meth:`CompressedSoap.feature_labels`). The average over centres runs over every atom of the
cell whatever its species (the centre species are not separated).

Implementation: featomic 0.6.7's native ``SphericalExpansion`` (hyper-parameters passed as a plain
dict, so the Rust code evaluates the radial scaling; the Python-side ``Willatt2018.compute()`` in
``featomic/density.py`` returns the derivative in its value branch and ``None`` in its derivative
branch, and is only used by Python-side splining, which this module never calls; a test checks the
native scaling against ``c / (c + (r / r0)**m)`` on a dimer). The keys are selected explicitly for
every ``(l, centre species, neighbour species)`` of the campaign's species list, so every structure
yields the same feature length whatever species it contains. Structures are processed in batches
of ``batch_size``; featomic parallelises over the structures of one batch with ``RAYON_NUM_THREADS``
threads. Per-atom arrays only ever exist for one batch (featomic's n_max = 14 expansion of 8
ROY cells of 432 atoms is about 190 MB); per-centre power spectra are never formed, the cell
average of the normalised spectra is accumulated directly (see ``_crystal_features``).

Mapping from the seed's librascal ``SphericalInvariants`` settings (librascal is not installable
from PyPI; featomic is its maintained successor and computes the same physics):

==========================================  ==========================================================
librascal                                   featomic 0.6.7 (this module)
==========================================  ==========================================================
``max_radial = 14`` (a *count*)             ``basis.radial = {"type": "Gto", "max_radial": 13}``
                                            (featomic's is the *highest index*: ``n_max - 1``)
``max_angular = 9``                         ``basis = {"type": "TensorProduct", "max_angular": 9}``
``interaction_cutoff = 4.5``                ``cutoff.radius = 4.5`` Å
``cutoff_smooth_width = 0.5``               ``cutoff.smoothing = {"type": "ShiftedCosine", "width": 0.5}`` Å
``gaussian_sigma_constant = 0.3``           ``density = {"type": "Gaussian", "width": 0.3}`` Å
``cutoff_function_type = "RadialScaling"``  ``density.scaling = {"type": "Willatt2018", "rate": 1,``
``  rate=1, scale=3.5, exponent=2``         ``  "scale": 3.5, "exponent": 2}`` (c / (c + (r/r0)^m))
``normalize = True`` (per centre)           done here, per centre, after the power spectrum
``radial_basis = "GTO"``                    ``Gto`` (orthonormalised GTOs, splined radial integral)
==========================================  ==========================================================

featomic's own ``SoapPowerSpectrum`` multiplies every odd-``l`` channel by -1 (it couples
with ``(-1)**l / sqrt(2l + 1)``, a Clebsch-Gordan coefficient); librascal and this module use
``+1 / sqrt(2l + 1)`` as in DESIGN.md. The flip leaves per-centre norms and kernels between
vectors computed the same way unchanged, but the raw numbers differ in sign (a test checks this
module against ``SoapPowerSpectrum`` with the sign undone). The seed did not state its smoothing
and Gaussian widths; 0.5 Å and 0.3 Å are librascal's example values.

Caveats: eigenvector signs are arbitrary in ``eigh`` (they change with the summation order of the
covariance, e.g. with ``batch_size``); here each eigenvector is flipped so that its entry of
largest magnitude is positive, which makes the projection reproducible on every worker. A
species that is rare in the fitting sample (few centres see it as a neighbour) gets noisy
eigenvectors for its channels; a species absent from the fitting sample falls back to the first
``n_compressed`` GTO functions (plain truncation), with a warning, and its variance kept is NaN.
"""

from __future__ import annotations

import json
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from graceq.model import one_blas_thread

__all__ = ["species_of", "soap_hypers", "CompressedSoap"]

_FORMAT = "graceq.CompressedSoap/1"
_PARAM_NAMES = (
    "species",
    "n_max",
    "l_max",
    "cutoff",
    "smoothing",
    "gaussian_width",
    "scaling_rate",
    "scaling_scale",
    "scaling_exponent",
    "n_compressed",
    "batch_size",
)


def species_of(frames: Iterable) -> list[int]:
    """Return the sorted atomic numbers present in any of the frames (ASE ``Atoms``)."""
    present: set[int] = set()
    for atoms in frames:
        present.update(int(z) for z in np.unique(atoms.numbers))
    return sorted(present)


def soap_hypers(
    n_max: int = 14,
    l_max: int = 9,
    cutoff: float = 4.5,
    smoothing: float = 0.5,
    gaussian_width: float = 0.3,
    scaling_rate: float = 1.0,
    scaling_scale: float = 3.5,
    scaling_exponent: float = 2.0,
) -> dict:
    """Return featomic's native ``SphericalExpansion`` hyper-parameters (plain dict, lengths in Å).

    ``n_max`` is the number of radial functions (librascal's ``max_radial``); featomic's
    ``max_radial`` is the highest index, ``n_max - 1``.
    """
    exponent = float(scaling_exponent)
    return {
        "cutoff": {
            "radius": float(cutoff),
            "smoothing": {"type": "ShiftedCosine", "width": float(smoothing)},
        },
        "density": {
            "type": "Gaussian",
            "width": float(gaussian_width),
            "scaling": {
                "type": "Willatt2018",
                # featomic's Python class stores an int exponent; keep integers integral.
                "exponent": int(exponent) if exponent.is_integer() else exponent,
                "rate": float(scaling_rate),
                "scale": float(scaling_scale),
            },
        },
        "basis": {
            "type": "TensorProduct",
            "max_angular": int(l_max),
            "radial": {"type": "Gto", "max_radial": int(n_max) - 1},
        },
    }


def _element(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else "?"


def _structure_label(atoms, index: int) -> str:
    name = atoms.info.get("name") if hasattr(atoms, "info") else None
    return f"structure {index}" + (f" ({name!r})" if name is not None else "")


class CompressedSoap(TransformerMixin, BaseEstimator):
    """SOAP power spectrum on a fitted compressed radial basis, averaged per crystal.

    Parameters (lengths in Å): ``species`` the campaign's atomic numbers (every structure must
    only contain these); ``n_max`` radial functions before compression (a count); ``l_max``;
    ``cutoff`` radius; ``smoothing`` width of the shifted-cosine cutoff; ``gaussian_width`` of
    the atomic density; ``scaling_rate``, ``scaling_scale``, ``scaling_exponent`` of the
    Willatt (2018) radial scaling ``c / (c + (r / r0)**m)``; ``n_compressed`` radial functions
    kept per (neighbour species, l); ``batch_size`` structures per featomic call.

    Attributes set by :meth:`fit`: ``projection_`` (S, l_max + 1, n_max, n_compressed) the
    orthonormal radial projections; ``eigenvalues_`` (S, l_max + 1, n_max) of the covariances,
    descending; ``explained_variance_ratio_`` (S, l_max + 1) variance kept (NaN for a species
    absent from the fit); ``n_fit_structures_``, ``n_fit_centers_``.
    """

    def __init__(
        self,
        species,
        n_max=14,
        l_max=9,
        cutoff=4.5,
        smoothing=0.5,
        gaussian_width=0.3,
        scaling_rate=1.0,
        scaling_scale=3.5,
        scaling_exponent=2.0,
        n_compressed=5,
        batch_size=8,
    ):
        self.species = species
        self.n_max = n_max
        self.l_max = l_max
        self.cutoff = cutoff
        self.smoothing = smoothing
        self.gaussian_width = gaussian_width
        self.scaling_rate = scaling_rate
        self.scaling_scale = scaling_scale
        self.scaling_exponent = scaling_exponent
        self.n_compressed = n_compressed
        self.batch_size = batch_size

    # ------------------------------------------------------------------ parameters
    def _species(self) -> list[int]:
        species = [int(z) for z in self.species]
        if len(species) == 0:
            raise ValueError("CompressedSoap: the species list is empty")
        if sorted(set(species)) != species:
            raise ValueError(
                f"CompressedSoap: species must be sorted unique atomic numbers, got {species}; "
                "use species_of(pool)"
            )
        if species[0] < 1:
            raise ValueError(f"CompressedSoap: invalid atomic number {species[0]} in species")
        return species

    def _check_params(self) -> None:
        self._species()
        if int(self.n_max) < 1 or int(self.l_max) < 0:
            raise ValueError(f"CompressedSoap: need n_max >= 1 and l_max >= 0, got "
                             f"n_max={self.n_max}, l_max={self.l_max}")
        if not 1 <= int(self.n_compressed) <= int(self.n_max):
            raise ValueError(
                f"CompressedSoap: n_compressed={self.n_compressed} must lie in 1..n_max={self.n_max}"
            )
        if int(self.batch_size) < 1:
            raise ValueError(f"CompressedSoap: batch_size={self.batch_size} must be >= 1")

    def hypers(self) -> dict:
        """Return the featomic ``SphericalExpansion`` hyper-parameters for these settings."""
        return soap_hypers(
            n_max=self.n_max,
            l_max=self.l_max,
            cutoff=self.cutoff,
            smoothing=self.smoothing,
            gaussian_width=self.gaussian_width,
            scaling_rate=self.scaling_rate,
            scaling_scale=self.scaling_scale,
            scaling_exponent=self.scaling_exponent,
        )

    @property
    def n_features(self) -> int:
        """Length of one crystal's vector: S (S + 1) / 2 * n_compressed**2 * (l_max + 1)."""
        n_species = len(self._species())
        k = int(self.n_compressed)
        return n_species * (n_species + 1) // 2 * k * k * (int(self.l_max) + 1)

    def feature_labels(self) -> np.ndarray:
        """Return (n_features, 5) int array: (Z1, Z2, k1, k2, l) of every feature, in order."""
        species = self._species()
        k = int(self.n_compressed)
        rows = [
            (species[i], species[j], k1, k2, l)
            for i, j in zip(*np.triu_indices(len(species)))
            for k1 in range(k)
            for k2 in range(k)
            for l in range(int(self.l_max) + 1)
        ]
        return np.array(rows, dtype=np.int64)

    # ------------------------------------------------------------------ featomic
    def _calculator(self):
        import featomic

        return featomic.SphericalExpansion(**self.hypers())

    def _selected_keys(self):
        from metatensor import Labels

        species = self._species()
        rows = [
            [l, 1, zc, zn]
            for l in range(int(self.l_max) + 1)
            for zc in species
            for zn in species
        ]
        return Labels(
            ["o3_lambda", "o3_sigma", "center_type", "neighbor_type"],
            np.array(rows, dtype=np.int32),
        )

    def _validate_frames(self, frames: Sequence, start: int = 0) -> None:
        allowed = set(self._species())
        for offset, atoms in enumerate(frames):
            present = set(int(z) for z in np.unique(atoms.numbers))
            unknown = sorted(present - allowed)
            if unknown:
                names = ", ".join(f"{z} ({_element(z)})" for z in unknown)
                raise ValueError(
                    f"{_structure_label(atoms, start + offset)} contains species {names} "
                    f"not in the campaign's species list {sorted(allowed)}; fit the descriptor "
                    "with species=species_of(pool) covering every structure of the pool"
                )
            if len(atoms) == 0:
                raise ValueError(f"{_structure_label(atoms, start + offset)} has no atoms")

    def _expansion(self, calculator, keys, batch: Sequence):
        return calculator.compute(list(batch), selected_keys=keys)

    def _batches(self, frames: Sequence):
        size = int(self.batch_size)
        for start in range(0, len(frames), size):
            yield start, frames[start : start + size]

    # ------------------------------------------------------------------ fit
    def fit(self, frames, y=None, progress: Callable[[int], None] | None = None):
        """Fit the radial projections on the given structures (ASE ``Atoms``); return self.

        ``progress``, if given, is called with the number of structures done after each batch.
        """
        self._check_params()
        frames = list(frames)
        if len(frames) == 0:
            raise ValueError("CompressedSoap.fit: no structures given")
        self._validate_frames(frames)
        species = self._species()
        index = {z: i for i, z in enumerate(species)}
        n_max, n_l, k = int(self.n_max), int(self.l_max) + 1, int(self.n_compressed)

        covariance = np.zeros((len(species), n_l, n_max, n_max))
        n_centers = 0
        calculator, keys = self._calculator(), self._selected_keys()
        with _single_threaded_blas():  # does not touch featomic's rayon threads
            for start, batch in self._batches(frames):
                expansion = self._expansion(calculator, keys, batch)
                _check_radial_order(expansion, n_max)
                for l, zn, block in _blocks(expansion):
                    values = block.values  # (centres with such neighbours, 2l+1, n_max)
                    if values.shape[0] == 0:
                        continue
                    flat = values.reshape(-1, n_max)
                    covariance[index[zn], l] += flat.T @ flat
                n_centers += sum(len(atoms) for atoms in batch)
                if progress is not None:
                    progress(start + len(batch))
        covariance /= n_centers

        projection = np.zeros((len(species), n_l, n_max, k))
        eigenvalues = np.zeros((len(species), n_l, n_max))
        explained = np.full((len(species), n_l), np.nan)
        for a, z in enumerate(species):
            if not np.any(covariance[a]):
                warnings.warn(
                    f"CompressedSoap.fit: species {z} ({_element(z)}) is absent from the "
                    f"{len(frames)} fitting structures; its radial basis is truncated to the "
                    f"first {k} GTO functions instead of compressed",
                    stacklevel=2,
                )
                projection[a, :] = np.eye(n_max)[:, :k]
                continue
            for l in range(n_l):
                values, vectors = _leading_eigenvectors(covariance[a, l])
                eigenvalues[a, l] = values
                projection[a, l] = vectors[:, :k]
                total = values.sum()
                explained[a, l] = values[:k].sum() / total if total > 0 else np.nan

        self.projection_ = projection
        self.eigenvalues_ = eigenvalues
        self.explained_variance_ratio_ = explained
        self.n_fit_structures_ = len(frames)
        self.n_fit_centers_ = int(n_centers)
        return self

    # ------------------------------------------------------------------ transform
    def _check_fitted(self) -> None:
        if not hasattr(self, "projection_"):
            raise RuntimeError("CompressedSoap: call fit() (or load()) before transform()")
        expected = (len(self._species()), int(self.l_max) + 1, int(self.n_max), int(self.n_compressed))
        if self.projection_.shape != expected:
            raise ValueError(
                f"CompressedSoap: projection_ has shape {self.projection_.shape}, the parameters "
                f"need {expected}"
            )

    def transform(self, frames, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Return (n_frames, n_features) float64: one centre-averaged power spectrum per crystal.

        ``progress``, if given, is called with the number of structures done after each batch.
        """
        self._check_fitted()
        frames = list(frames)
        self._validate_frames(frames)
        out = np.empty((len(frames), self.n_features))
        calculator, keys = self._calculator(), self._selected_keys()
        with _single_threaded_blas():  # does not touch featomic's rayon threads
            for start, batch in self._batches(frames):
                expansion = self._expansion(calculator, keys, batch)
                out[start : start + len(batch)] = self._crystal_features(expansion, batch)
                if progress is not None:
                    progress(start + len(batch))
        return out

    def compressed_coefficients(self, expansion, batch) -> list[np.ndarray]:
        """Return, per l, the projected coefficients (N_centres, S, n_compressed, 2l+1).

        ``expansion`` is featomic's ``SphericalExpansion`` TensorMap of the structures ``batch``;
        centres are ordered structure by structure, atom by atom; a centre with no neighbour of
        species ``a`` has zeros there.
        """
        species = self._species()
        index = {z: i for i, z in enumerate(species)}
        n_max, n_l, k = int(self.n_max), int(self.l_max) + 1, int(self.n_compressed)
        offsets = np.concatenate([[0], np.cumsum([len(atoms) for atoms in batch])])
        coefficients = [np.zeros((offsets[-1], len(species), k, 2 * l + 1)) for l in range(n_l)]
        _check_radial_order(expansion, n_max)
        for l, zn, block in _blocks(expansion):
            values = block.values
            if values.shape[0] == 0:
                continue
            samples = block.samples.values
            centres = offsets[samples[:, 0]] + samples[:, 1]
            # (n (2l+1), n_max) @ (n_max, k) -> (n, 2l+1, k) -> (n, k, 2l+1)
            projected = values.reshape(-1, n_max) @ self.projection_[index[zn], l]
            coefficients[l][centres, index[zn]] = projected.reshape(
                values.shape[0], 2 * l + 1, k
            ).transpose(0, 2, 1)
        return coefficients

    def _crystal_features(self, expansion, batch) -> np.ndarray:
        """Return (len(batch), n_features): per-centre unit-normalised spectra averaged per cell.

        Per-centre power spectra are never materialised. With X_i[l] the (S k, 2l+1) compressed
        coefficients of centre i, the full (a1, a2 unrestricted) spectrum is
        X_i[l] X_i[l]^T / sqrt(2l+1), whose squared norm over the kept entries (a1 <= a2, factor
        2 from f**2 for a1 != a2) is sum_l ||X_i[l]^T X_i[l]||_F^2 / (2l+1). The cell average of
        the normalised spectra is then one product Y Y^T per (cell, l) with Y the horizontal
        stack of X_i[l] / sqrt(|p_i|).
        """
        coefficients = self.compressed_coefficients(expansion, batch)
        n_species, k, n_l = len(self._species()), int(self.n_compressed), int(self.l_max) + 1
        n_centres = coefficients[0].shape[0]
        flat = [c.reshape(n_centres, n_species * k, 2 * l + 1) for l, c in enumerate(coefficients)]

        norm2 = np.zeros(n_centres)
        for l, x in enumerate(flat):
            gram = np.matmul(x.transpose(0, 2, 1), x)  # (centres, 2l+1, 2l+1)
            norm2 += np.einsum("imn,imn->i", gram, gram) / (2 * l + 1)
        if np.any(norm2 <= 0):
            raise ValueError("CompressedSoap: a centre has an all-zero power spectrum")
        weight = norm2 ** -0.25  # sqrt(1 / |p_i|), applied to both factors

        first, second = np.triu_indices(n_species)
        factor = np.where(first == second, 1.0, np.sqrt(2.0))
        out = np.empty((len(batch), len(first), k, k, n_l))
        offsets = np.concatenate([[0], np.cumsum([len(atoms) for atoms in batch])])
        for s in range(len(batch)):
            centres = slice(offsets[s], offsets[s + 1])
            n_cell = offsets[s + 1] - offsets[s]
            for l, x in enumerate(flat):
                y = (x[centres] * weight[centres, None, None]).transpose(1, 0, 2)
                y = y.reshape(n_species * k, -1)
                full = (y @ y.T).reshape(n_species, k, n_species, k)
                out[s, :, :, :, l] = full[first, :, second, :] * (
                    factor[:, None, None] / (np.sqrt(2 * l + 1) * n_cell)
                )
        return out.reshape(len(batch), -1)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write parameters and fitted arrays to an ``.npz`` file (no pickle)."""
        self._check_fitted()
        params = {name: getattr(self, name) for name in _PARAM_NAMES}
        params["species"] = self._species()
        params = {
            name: (value.item() if isinstance(value, np.generic) else value)
            for name, value in params.items()
        }
        np.savez(
            path,
            format=np.array(_FORMAT),
            params=np.array(json.dumps(params, sort_keys=True)),
            projection=self.projection_,
            eigenvalues=self.eigenvalues_,
            explained_variance_ratio=self.explained_variance_ratio_,
            n_fit=np.array([self.n_fit_structures_, self.n_fit_centers_], dtype=np.int64),
        )

    @classmethod
    def load(cls, path) -> "CompressedSoap":
        """Read a descriptor written by :meth:`save`; ready to transform."""
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != _FORMAT:
                raise ValueError(f"{path}: not a graceq CompressedSoap file (expected {_FORMAT})")
            soap = cls(**json.loads(str(data["params"])))
            soap.projection_ = np.array(data["projection"])
            soap.eigenvalues_ = np.array(data["eigenvalues"])
            soap.explained_variance_ratio_ = np.array(data["explained_variance_ratio"])
            soap.n_fit_structures_, soap.n_fit_centers_ = (int(v) for v in data["n_fit"])
        soap._check_fitted()
        return soap


def _leading_eigenvectors(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return eigenvalues (descending) and eigenvectors of a symmetric matrix, signs fixed.

    Each eigenvector is flipped so that its entry of largest magnitude is positive.
    """
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    pivot = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    vectors = vectors * np.where(pivot < 0, -1.0, 1.0)
    return values, vectors


def _single_threaded_blas():
    """Limit BLAS to one thread for the small matrix products of this module.

    The products are small (25 x 25 outputs); a multi-threaded BLAS gains nothing on them, and its
    spinning threads starve featomic's rayon threads on a busy machine (measured: 10x slower
    featurisation with 2 BLAS threads on an oversubscribed 2-core worker). The process-wide block
    of ``graceq.model``, so that a featurisation and a fit in two threads of one process share
    one limit instead of restoring each other's.
    """
    return one_blas_thread()


def _blocks(expansion):
    """Yield (l, neighbour atomic number, block) for every block of a spherical expansion."""
    names = expansion.keys.names
    column_l, column_zn = names.index("o3_lambda"), names.index("neighbor_type")
    for i, key in enumerate(expansion.keys.values):
        yield int(key[column_l]), int(key[column_zn]), expansion.block_by_id(i)


def _check_radial_order(expansion, n_max: int) -> None:
    """Raise if featomic's radial properties are not 0..n_max-1 in order (same in every block)."""
    radial = expansion.block(0).properties.values[:, 0]
    if radial.shape[0] != n_max or np.any(radial != np.arange(n_max)):
        raise RuntimeError(f"featomic returned radial indices {radial.tolist()}, expected 0..{n_max - 1}")
