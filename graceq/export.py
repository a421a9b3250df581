"""Files a CSP chemist opens: CIF per structure, one extxyz, and a chemiscope map of the pool.

``graceq export DIR`` writes, for the measured structures within the window (``--all``: every
pool structure):

- ``DIR/cif/<name>.cif``: the cell (P1, every atom listed, full precision) with graceq's data
  items ``_graceq_*`` (energies per molecule with the unit in the item name, density, space
  group, duplicate group); Mercury and the CSD tools read it, and so does ``ase.io.read``;
- ``DIR/structures.extxyz``: all of them in one file, with the same values in ``atoms.info``;
- ``DIR/export.json``: what was written, the unit of every key, the duplicate tolerance.

With ``--chemiscope``: ``DIR/chemiscope.json`` (every pool structure, its properties and a 2D
PCA map of the campaign's SOAP features; open it at chemiscope.org or with
``chemiscope.show_input`` in Jupyter) and ``DIR/chemiscope.html``, the same data in chemiscope's
own viewer (the JavaScript bundle shipped in the ``chemiscope`` package), which opens offline.

Energies are per molecule in the campaign unit; relative energies are measured from the best
reference energy of the campaign. A measured structure is exported as its reference minimum (the
engine's relaxed cell when it returned one), any other as the pool (force-field) structure. Space
groups come from spglib through ASE (``ase.spacegroup.symmetrize.check_symmetry``) at
``SYMPREC`` Å.
"""

from __future__ import annotations

import html
import json
import re
import warnings
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

import numpy as np

from graceq import __version__
from graceq.campaign import STABLE
from graceq.polymorphs import DEFAULT_SETTINGS, campaign_duplicates, cell_density_gcm3, relaxed_structures
from graceq.store import CampaignPaths, atomic_write_bytes, atomic_write_json

#: symmetry tolerance (Å) of the space-group detection: reference and force-field minima are
#: converged to about 0.01-0.05 Å, and 0.1 Å is what CSP tools use to find the symmetry of a minimum
SYMPREC = 0.1

_SLUGS = {"kJ/mol": "kJmol", "kcal/mol": "kcalmol", "eV": "eV", "meV": "meV", "Hartree": "Ha", "Ry": "Ry"}


def unit_slug(unit: str) -> str:
    """The unit as it appears inside a key name ("kJ/mol" -> "kJmol")."""
    return _SLUGS.get(unit, re.sub(r"[^A-Za-z0-9]", "", unit))


def space_group(atoms, symprec: float = SYMPREC) -> tuple[str, int]:
    """(Hermann-Mauguin symbol, number) of the structure's space group, from spglib via ASE."""
    from ase.spacegroup.symmetrize import check_symmetry

    dataset = check_symmetry(atoms, symprec=symprec)
    if dataset is None:
        return "P1", 1
    return str(dataset.international), int(dataset.number)


def _file_name(name: str) -> str:
    """A structure name made safe as a file name."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "structure"


def _cif_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if np.isfinite(value) else "?"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9._+-]+", text) else "'" + text.replace("'", "") + "'"


def write_cif(path: Path, atoms, items: dict) -> None:
    """ASE's P1 CIF of ``atoms`` with ``_graceq_<key> value`` items after the data block name."""
    import io

    from ase.io import write

    buffer = io.BytesIO()
    write(buffer, atoms, format="cif")
    head, _, rest = buffer.getvalue().decode().partition("\n")
    block = "data_" + _file_name(str(items.get("name", "structure")))
    extra = "".join(f"_graceq_{key:<40s} {_cif_value(value)}\n" for key, value in items.items())
    atomic_write_bytes(path, f"{block}\n{extra}{rest}".encode())
    path.chmod(0o644)  # files to share (the atomic write creates 0600 files)


def export_rows(root, include_all: bool = False) -> tuple[list[dict], list, dict]:
    """The exported structures: (rows of values, their ase.Atoms, metadata with the units).

    Rows hold ``name``, ``pool_index``, ``geometry`` ("reference minimum" / "pool structure"),
    ``outcome``, energies per molecule (key names carry the unit), ``density_gcm3``,
    ``spacegroup``/``spacegroup_number``, ``duplicate_group``, ``duplicate_of`` and ``unique``
    (measured stable structures only), ``iteration_sampled``.
    """
    from ase.db import connect

    from graceq.report import load_record

    rec = load_record(root)
    u = unit_slug(rec.unit)
    best = rec.best
    stable = {i: e for i, (s, e) in rec.results.items() if s == STABLE and e is not None}
    if include_all:
        chosen = list(range(len(rec.names)))
        scope = "measured"
    else:
        chosen = sorted((i for i, e in stable.items() if best is not None and e <= best + rec.window),
                        key=lambda i: (stable[i], i))
        scope = "window"
    dups = campaign_duplicates(root, scope=scope)
    group_of, rep_of = dups.group_of(), dups.representative_of()
    reps = {int(i) for i, r in zip(dups.indices, dups.grouping.representative) if r}
    pred = rec.predictions[max(rec.predictions)] if rec.predictions else None
    measured = [i for i in chosen if i in rec.results]
    relaxed = relaxed_structures(root, measured)
    paths = CampaignPaths(root)
    rows, frames = [], []
    with connect(paths.structures) as db:
        for i in chosen:
            atoms = relaxed[i] if i in relaxed else db.get(id=i + 1).toatoms()
            atoms.info.clear()
            symbol, number = space_group(atoms)
            row = {"name": str(rec.names[i]), "pool_index": int(i),
                   "geometry": "reference minimum" if i in relaxed else "pool structure",
                   "outcome": rec.results[i][0] if i in rec.results else "unlabelled",
                   f"energy_ff_{u}_per_molecule": float(rec.energy_ff[i])}
            if i in stable:
                row[f"energy_ref_{u}_per_molecule"] = float(stable[i])
                row[f"relative_energy_{u}_per_molecule"] = float(stable[i] - best)
            if pred is not None and np.isfinite(pred["mu"][i]):
                row[f"energy_predicted_{u}_per_molecule"] = float(pred["mu"][i])
                row[f"sigma_predicted_{u}_per_molecule"] = float(pred["sigma"][i])
            row.update({"density_gcm3": cell_density_gcm3(atoms), "spacegroup": symbol,
                        "spacegroup_number": number})
            if i in group_of:
                row.update({"duplicate_group": group_of[i], "duplicate_of": rep_of[i], "unique": i in reps})
            iteration = rec.iteration_of.get(i)
            if iteration is not None:
                row["iteration_sampled"] = int(iteration)
            rows.append(row)
            frames.append(atoms)
    meta = {
        "graceq_version": __version__,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "campaign": str(rec.root),
        "selection": "every pool structure" if include_all else
        f"measured structures within {rec.window:g} {rec.unit} per molecule of the best",
        "energy_unit": f"{rec.unit} per molecule",
        "best_reference_energy_per_molecule": best,
        "units": {f"energy_ff_{u}_per_molecule": f"{rec.unit} per molecule (force field)",
                  f"energy_ref_{u}_per_molecule": f"{rec.unit} per molecule (reference, measured)",
                  f"relative_energy_{u}_per_molecule": f"{rec.unit} per molecule above the best reference energy",
                  f"energy_predicted_{u}_per_molecule": f"{rec.unit} per molecule (committee mean, last iteration)",
                  f"sigma_predicted_{u}_per_molecule": f"{rec.unit} per molecule (calibrated committee spread)",
                  "density_gcm3": "g/cm^3"},
        "spacegroup": f"spglib via ase.spacegroup.symmetrize.check_symmetry, symprec {SYMPREC} Å",
        "duplicates": {"scope": scope, "method": DEFAULT_SETTINGS.describe(),
                       "n_grouped": len(dups.indices), "n_unique": dups.grouping.n_unique,
                       "groups": [[dups.names[k] for k in m] for m in dups.grouping.members() if len(m) > 1]},
    }
    return rows, frames, meta


def export_campaign(root, folder, include_all: bool = False, chemiscope: bool = False) -> list[Path]:
    """Write the CIF files, structures.extxyz, export.json (and the chemiscope files); returns the paths."""
    from ase.io import write

    folder = Path(folder)
    rows, frames, meta = export_rows(root, include_all=include_all)
    cif_dir = folder / "cif"
    cif_dir.mkdir(parents=True, exist_ok=True)
    written = []
    used = set()
    for row, atoms in zip(rows, frames):
        stem = _file_name(row["name"])
        if stem in used:  # two names that differ only in characters a file name cannot hold
            stem = f"{stem}_{row['pool_index']}"
        used.add(stem)
        written.append(cif_dir / f"{stem}.cif")
        write_cif(written[-1], atoms, row)
    extxyz = folder / "structures.extxyz"
    out = []
    for row, atoms in zip(rows, frames):
        a = atoms.copy()
        a.info.update(row)
        out.append(a)
    tmp = extxyz.with_name(".structures.extxyz.tmp")
    if out:
        write(tmp, out, format="extxyz")
    else:  # nothing measured in the window yet: an empty file, not a missing one
        tmp.write_text("")
    tmp.replace(extxyz)
    extxyz.chmod(0o644)
    meta["n_structures"] = len(rows)
    atomic_write_json(folder / "export.json", meta)
    (folder / "export.json").chmod(0o644)
    written += [extxyz, folder / "export.json"]
    if chemiscope:
        written += write_chemiscope(root, folder)
    return written


# -- chemiscope -----------------------------------------------------------------------------------
def pool_map(features: np.ndarray) -> np.ndarray:
    """2D PCA of the SOAP features (n_pool, n_features) -> (n_pool, 2), first axis the widest."""
    from sklearn.decomposition import PCA

    n = len(features)
    if n < 3:
        return np.zeros((n, 2))
    return PCA(n_components=2, svd_solver="full").fit_transform(np.asarray(features, dtype=float))


def chemiscope_arguments(root) -> dict:
    """The arguments of chemiscope.create_input / write_input for every pool structure of a campaign.

    Properties (per structure; energies per molecule in the campaign unit): force-field and
    measured reference energy relative to the best reference energy, predicted reference energy
    and sigma of the last iteration, outcome, iteration sampled (-1: never), density, duplicate
    group, and the PCA map ``PCA[1]``, ``PCA[2]`` of the SOAP features the model used.
    """
    import chemiscope
    from ase.db import connect

    from graceq.report import load_record

    rec = load_record(root)
    paths = CampaignPaths(root)
    with connect(paths.structures) as db:
        frames = [row.toatoms() for row in db.select(sort="id")]
    n = len(frames)
    best = rec.best if rec.best is not None else float(np.nanmin(rec.energy_ff))
    unit = f"{rec.unit} per molecule"
    e_ref = np.full(n, np.nan)
    for i, (s, e) in rec.results.items():
        if s == STABLE and e is not None:
            e_ref[i] = e - best
    pred = rec.predictions[max(rec.predictions)] if rec.predictions else None
    mu = pred["mu"] - best if pred is not None else np.full(n, np.nan)
    sigma = pred["sigma"] if pred is not None else np.full(n, np.nan)
    iteration = np.full(n, -1.0)
    for i, it in rec.iteration_of.items():
        iteration[i] = it
    outcome = [rec.results[i][0] if i in rec.results else ("pending" if i in rec.iteration_of else "unlabelled")
               for i in range(n)]
    dups = campaign_duplicates(root, scope="window")
    group = np.full(n, -1.0)
    for i, g in dups.group_of().items():
        group[i] = g
    if not paths.features.exists():
        raise FileNotFoundError(f"{paths.features}: the campaign has no SOAP features yet, so there is no map; "
                                f"run it first (graceq run {paths.root})")
    xy = pool_map(np.load(paths.features))
    properties = {
        "PCA": {"target": "structure", "values": xy,
                "description": "principal components of the averaged SOAP features (artifacts/features.npy)"},
        "E_ff - best E_ref": {"target": "structure", "values": rec.energy_ff - best, "units": unit,
                              "description": "force-field energy per molecule (not shifted to its own minimum)"},
        "E_ref - best": {"target": "structure", "values": e_ref, "units": unit,
                         "description": "measured reference energy per molecule (missing: not measured, or unstable)"},
        "predicted E_ref - best": {"target": "structure", "values": mu, "units": unit,
                                   "description": "committee mean of the last iteration"},
        "sigma": {"target": "structure", "values": sigma, "units": unit,
                  "description": "calibrated committee spread of the last iteration"},
        "outcome": {"target": "structure", "values": outcome,
                    "description": "converged / unstable / failed / pending / unlabelled"},
        "iteration sampled": {"target": "structure", "values": iteration, "description": "-1: never sampled"},
        "density": {"target": "structure", "values": rec.density, "units": "g/cm^3"},
        "duplicate group": {"target": "structure", "values": group,
                            "description": "same number = same crystal among the window structures (-1: not grouped)"},
    }
    settings = chemiscope.quick_settings(x="PCA[1]", y="PCA[2]", map_color="predicted E_ref - best",
                                         periodic=True)
    metadata = {
        "name": f"graceq campaign {paths.root.name}",
        "description": (f"{n} pool structures (force-field geometries) of {paths.root}; energies per molecule in "
                        f"{rec.unit} relative to the best measured reference energy; map: PCA of the SOAP "
                        f"features. Written by graceq {__version__}."),
    }
    return {"structures": frames, "properties": properties, "settings": settings, "metadata": metadata}


def chemiscope_input(root) -> dict:
    """The chemiscope dataset (chemiscope.create_input) of every pool structure of a campaign."""
    import chemiscope

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has NaNs.*")  # unmeasured energies are NaN on purpose
        return chemiscope.create_input(**chemiscope_arguments(root))


def viewer_bundle() -> Path:
    """chemiscope's JavaScript viewer as shipped in the chemiscope Python package."""
    path = Path(str(files("chemiscope") / "sphinx" / "static" / "chemiscope.min.js"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the chemiscope package has no bundled viewer; write the JSON only "
                                "and open it at chemiscope.org or with chemiscope.show_input")
    return path


_VIEWER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<script>{bundle}</script>
<style>
body {{ font-family: sans-serif; margin: 0; padding: 8px; }}
#graceq-chemiscope {{ display: flex; flex-wrap: wrap; height: 620px; }}
#graceq-chemiscope > div {{ flex: 1; min-width: 420px; height: 100%; display: flex; flex-direction: column; }}
#graceq-map, #graceq-structure {{ flex: 1; min-height: 0; position: relative; }}
#graceq-error {{ color: #a94442; white-space: pre-wrap; }}
</style></head><body>
<div id="graceq-error"></div>
<div id="graceq-chemiscope">
  <div><div id="graceq-meta"></div><div id="graceq-map"></div></div>
  <div><div id="graceq-structure"></div><div id="graceq-info"></div></div>
</div>
<script type="application/json" id="graceq-dataset">{dataset}</script>
<script>
// chemiscope-sphinx.js's reading of Python's JSON, which may hold NaN
const text = document.getElementById('graceq-dataset').textContent;
const dataset = JSON.parse(text.replace(/\\bNaN\\b/g, '"***NaN***"'), (k, v) => v === '***NaN***' ? NaN : v);
window.graceqChemiscope = Chemiscope.DefaultVisualizer.load(
  {{map: 'graceq-map', info: 'graceq-info', meta: 'graceq-meta', structure: 'graceq-structure'}}, dataset
).then(v => {{ window.graceqVisualizer = v; document.body.dataset.chemiscope = 'loaded'; }})
 .catch(e => {{ document.getElementById('graceq-error').textContent = String(e); document.body.dataset.chemiscope = 'error'; }});
</script>
</body></html>
"""


def write_chemiscope(root, folder) -> list[Path]:
    """Write chemiscope.json (chemiscope.write_input) and chemiscope.html (offline viewer)."""
    import chemiscope

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "chemiscope.json"
    tmp = folder / ".chemiscope.tmp.json"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has NaNs.*")  # unmeasured energies are NaN on purpose
        chemiscope.write_input(str(tmp), **chemiscope_arguments(root))
    tmp.replace(target)
    text = target.read_text()
    name = json.loads(text)["meta"]["name"]  # Python reads the NaN it wrote
    page = folder / "chemiscope.html"
    html_text = _VIEWER.format(title=html.escape(f"graceq: {name}"), bundle=viewer_bundle().read_text(),
                               dataset=text.replace("</", "<\\/"))
    atomic_write_bytes(page, html_text.encode())
    page.chmod(0o644)
    return [target, page]
