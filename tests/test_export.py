"""`graceq export` on a finished campaign with planted duplicates: CIF files that ASE reads back to
the same crystals, one extxyz with energies, density, space group and duplicate groups, and a
chemiscope dataset that chemiscope's Python loader and its JavaScript viewer (headless Chromium) open.

The campaign (real CLI, embedded Celery workers, replay engine) runs to the end on 24 ROY
structures plus two copies of form Y (0001_Y): a permuted, rotated 2 x 1 x 1 supercell and the
same crystal in another cell setting, both 0.1 kJ/mol per molecule above it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write

from conftest import bundled, run_cli
from test_polymorphs import other_setting, permuted_rotated_supercell

APM = 27  # atoms per ROY molecule
COPIES = ("0001_Y-supercell", "0001_Y-setting")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    frames = read(bundled("roy264", "roy264.extxyz"), ":")[::10][:24]
    y = frames[0]
    assert y.info["name"] == "0001_Y"
    copies = []
    for name, make in zip(COPIES, (permuted_rotated_supercell, other_setting)):
        c = make(y)
        f = len(c) / len(y)
        c.info = dict(y.info, name=name, energy_ref=(y.info["energy_ref"] + 0.1 * 4) * f,
                      energy_ff=y.info["energy_ff"] * f, n_molecules=int(4 * f))
        copies.append(c)
    pool = folder / "pool.extxyz"
    write(pool, frames[:12] + [copies[0]] + frames[12:] + [copies[1]], format="extxyz")
    (folder / "settings.toml").write_text(
        f'[campaign]\npool = "{pool}"\nunit = "kJ/mol"\nwindow = 5.0\nn_init = 10\nn_batch = 8\nseed = 0\n'
        "[model]\nn_members = 32\nmembers_per_task = 32\n[descriptor]\nchunk_size = 30\n")
    root = folder / "campaign"
    run_cli("run", str(root), "--settings", str(folder / "settings.toml"), "--quiet")
    return root


def pool_frames(campaign):
    return {str(f.info["name"]): f for f in read(campaign.parent / "pool.extxyz", ":")}


@pytest.fixture(scope="module")
def exported(campaign) -> Path:
    out = campaign.parent / "out"
    result = run_cli("export", str(campaign), str(out), "--chemiscope")
    assert "CIF files in" in result.stdout
    return out


def window_by_hand(campaign) -> dict:
    """name -> reference energy per molecule above the best, for pool structures within 5 kJ/mol."""
    frames = pool_frames(campaign)
    e = {n: f.info["energy_ref"] / len(f) * APM for n, f in frames.items()}
    best = min(e.values())
    return {n: v - best for n, v in e.items() if v - best <= 5.0}


def test_window_structures_and_values(campaign, exported):
    window = window_by_hand(campaign)
    summary = json.loads((campaign / "summary.json").read_text())
    assert summary["stop"] is not None and set(summary["found"]) == set(window)
    frames = read(exported / "structures.extxyz", ":")
    assert sorted(str(f.info["name"]) for f in frames) == sorted(window)
    assert sorted(p.stem for p in (exported / "cif").glob("*.cif")) == sorted(window)
    source = pool_frames(campaign)
    for f in frames:
        name = str(f.info["name"])
        src = source[name]
        assert f.info["relative_energy_kJmol_per_molecule"] == pytest.approx(window[name], abs=1e-9)
        assert f.info["energy_ff_kJmol_per_molecule"] == pytest.approx(src.info["energy_ff"] / len(src) * APM, abs=1e-9)
        direct = sum(a.mass for a in src) / src.get_volume() * 1.66053906660
        assert f.info["density_gcm3"] == pytest.approx(direct, rel=1e-12)
        assert f.info["outcome"] == "converged" and f.info["geometry"] == "pool structure"
    by_name = {str(f.info["name"]): f.info for f in frames}
    # form Y is P2_1/c (No. 14) in the source ("P 21/c"); its copies in other settings too
    for name in ("0001_Y",) + COPIES:
        assert by_name[name]["spacegroup_number"] == 14 and by_name[name]["spacegroup"] == "P2_1/c"
    # the planted copies are grouped with form Y, which represents the group
    group = by_name["0001_Y"]["duplicate_group"]
    assert group == 0 and by_name["0001_Y"]["unique"]
    for name in COPIES:
        assert by_name[name]["duplicate_group"] == group and by_name[name]["duplicate_of"] == "0001_Y"
        assert not by_name[name]["unique"]
    others = [n for n in window if n not in COPIES + ("0001_Y",)]
    assert len({by_name[n]["duplicate_group"] for n in others}) == len(others)
    assert all(by_name[n]["unique"] and by_name[n]["duplicate_group"] != group for n in others)
    meta = json.loads((exported / "export.json").read_text())
    assert meta["n_structures"] == len(window)
    assert meta["duplicates"]["groups"] == [["0001_Y", "0001_Y-supercell", "0001_Y-setting"]]
    assert "g/cm^3" in meta["units"]["density_gcm3"]


def test_cif_files_read_back_to_the_same_crystals(exported):
    frames = {str(f.info["name"]): f for f in read(exported / "structures.extxyz", ":")}
    for path in sorted((exported / "cif").glob("*.cif")):
        again = read(path)
        ref = frames[path.stem]
        assert again.get_chemical_formula() == ref.get_chemical_formula()
        np.testing.assert_array_equal(again.numbers, ref.numbers)
        np.testing.assert_allclose(again.cell.cellpar(), ref.cell.cellpar(), rtol=1e-12, atol=1e-10)
        d = again.get_scaled_positions() - ref.get_scaled_positions()
        np.testing.assert_allclose(d - np.round(d), 0.0, atol=1e-10)
        text = path.read_text()
        items = dict(line.split(None, 1) for line in text.splitlines() if line.startswith("_graceq_"))
        assert float(items["_graceq_relative_energy_kJmol_per_molecule"]) == pytest.approx(
            ref.info["relative_energy_kJmol_per_molecule"], abs=1e-12)
        assert int(items["_graceq_spacegroup_number"]) == ref.info["spacegroup_number"]
        assert items["_graceq_name"] == path.stem


def test_export_all(campaign, tmp_path):
    run_cli("export", str(campaign), str(tmp_path / "all"), "--all")
    frames = read(tmp_path / "all" / "structures.extxyz", ":")
    assert len(frames) == len(read(campaign.parent / "pool.extxyz", ":")) == 26
    assert len(list((tmp_path / "all" / "cif").glob("*.cif"))) == 26
    meta = json.loads((tmp_path / "all" / "export.json").read_text())
    assert meta["duplicates"]["scope"] == "measured"
    assert meta["duplicates"]["n_unique"] == 24  # 26 measured structures, two of them copies of form Y


def test_chemiscope_dataset(campaign, exported):
    import chemiscope

    path = exported / "chemiscope.json"
    data = json.loads(path.read_text())  # Python's json reads the NaN chemiscope.write_input wrote
    n = len(read(campaign.parent / "pool.extxyz", ":"))
    assert len(data["structures"]) == n
    props = data["properties"]
    for key in ("PCA[1]", "PCA[2]", "E_ff - best E_ref", "E_ref - best", "predicted E_ref - best", "sigma",
                "outcome", "iteration sampled", "density", "duplicate group"):
        assert len(props[key]["values"]) == n, key
    assert data["settings"]["map"]["x"]["property"] == "PCA[1]"
    # the map: the first two principal components of the campaign's features, by a direct SVD
    features = np.load(campaign / "artifacts" / "features.npy")
    centred = features - features.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    for k in range(2):
        mine = np.asarray(props[f"PCA[{k + 1}]"]["values"])
        np.testing.assert_allclose(np.abs(mine), np.abs(u[:, k] * s[k]), rtol=1e-6, atol=1e-9)
    # chemiscope's own Python loader accepts the file
    widget = chemiscope.show_input(str(path))
    assert widget is not None


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return path


PROBE = """<script>
function deep(root, selector) {  // chemiscope draws inside shadow roots: search them too
  let found = Array.from(root.querySelectorAll(selector));
  for (const el of root.querySelectorAll('*')) {
    if (el.shadowRoot) found = found.concat(deep(el.shadowRoot, selector));
  }
  return found;
}
window.graceqChemiscope.then(() => new Promise(r => setTimeout(r, 1500))).then(() => {
  const mark = document.createElement('pre');
  mark.id = 'probe';
  const box = document.getElementById('graceq-chemiscope');
  mark.textContent = 'STATE ' + document.body.dataset.chemiscope +
    ' PLOTS ' + deep(box, '.js-plotly-plot').length +
    ' CANVAS ' + deep(box, 'canvas').length +
    ' ERROR ' + (document.getElementById('graceq-error').textContent.length) + ' END';
  document.body.appendChild(mark);
});
</script></body>"""


@pytest.mark.browser
def test_chemiscope_page_renders_in_chromium(exported, tmp_path):
    """chemiscope.html (chemiscope's own viewer bundle, no network) loads the dataset and draws map and structure."""
    from PIL import Image

    page = (exported / "chemiscope.html").read_text()
    assert "<script src=" not in page and "<link " not in page  # everything inline: opens offline
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("</body>", PROBE))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader",
             "--use-angle=swiftshader", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,800",
             "--virtual-time-budget=20000"]
    result = subprocess.run(flags + ["--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180)
    tag = '<pre id="probe">'
    assert tag in result.stdout, (result.returncode, result.stderr[-3000:])
    marker = result.stdout[result.stdout.index(tag) + len(tag):].split("</pre>")[0].split()
    facts = dict(zip(marker[0::2], marker[1::2]))
    assert facts["STATE"] == "loaded", marker
    assert int(facts["PLOTS"]) >= 1 and int(facts["CANVAS"]) >= 1 and facts["ERROR"] == "0", marker
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", (exported / "chemiscope.html").as_uri()],
                   capture_output=True, timeout=180)
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # the map's points and the molecules are drawn


def test_unique_counts_in_summary_and_status(campaign, exported):
    summary = json.loads((campaign / "summary.json").read_text())
    assert summary["n_found"] == len(summary["found"]) == len(window_by_hand(campaign))
    assert summary["n_found_unique"] == summary["n_found"] - 2
    assert summary["duplicate_groups"] == [["0001_Y", "0001_Y-supercell", "0001_Y-setting"]]
    assert not set(COPIES) & set(summary["found_unique"])
    out = run_cli("status", str(campaign)).stdout
    assert (f"unique     {summary['n_found'] - 2} distinct crystals among the {summary['n_found']} measured "
            "window structures (2 duplicates)") in out
    with open(campaign / "structures.csv") as handle:
        lines = {line.split(",")[0]: line.strip().split(",") for line in handle}
    assert lines["0001_Y-setting"][-2:] == ["0", "0001_Y"]
