"""What a campaign tells its user: summary.json, a CSV of every structure, plots and report.html.

All energies here are per molecule in the campaign unit; relative energies are measured from the
best reference energy found so far (the putative ground state of the campaign). Densities are in
g/cm^3, from the pool's structures (atomic masses over cell volume).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graceq.campaign import STABLE, per_molecule, risk_statement
from graceq.provenance import provenance
from graceq.config import load_settings
from graceq.polymorphs import AMU_PER_A3_TO_G_PER_CM3, cell_density_gcm3  # noqa: F401 (re-exported)
from graceq.store import CampaignPaths, CampaignStore, atomic_write_bytes, atomic_write_json

FIGURE_DPI = 120
EI_FLOOR_RATIO = 1e-10  # EI below this fraction of the largest EI is drawn at the floor (log axis)


def last_predictions(paths: CampaignPaths, iteration: int | None):
    """The pool predictions (mu, sigma per molecule) of the newest finished iteration, or None."""
    if iteration is None:
        return None
    path = paths.iteration(iteration) / "predictions.npz"
    return np.load(path) if path.exists() else None


def campaign_table(root: str | Path) -> list[dict]:
    """One row per pool structure: energies per molecule, prediction, outcome, iteration sampled."""
    paths = CampaignPaths(root)
    store = CampaignStore(paths.root)
    apm = int(store.get_meta("atoms_per_molecule"))
    s = store.structures()
    iterations = store.iterations()
    pred = last_predictions(paths, iterations[-1]["iteration"] if iterations else None)
    picks = {row[0]: row for row in store.pick_table()}
    results = {row[0]: row for row in store.result_table()}
    e_ff = per_molecule(s["energy_ff"], s["n_atoms"], apm)
    rows = []
    for i, name in enumerate(s["name"]):
        status, e_ref = (results[i][1], results[i][2]) if i in results else ("", None)
        rows.append({
            "name": name,
            "n_atoms": int(s["n_atoms"][i]),
            "energy_ff_per_molecule": float(e_ff[i]),
            "predicted_ref_per_molecule": float(pred["mu"][i]) if pred is not None else None,
            "sigma_per_molecule": float(pred["sigma"][i]) if pred is not None else None,
            "measured_ref_per_molecule": (
                float(per_molecule(e_ref, s["n_atoms"][i], apm)) if e_ref is not None else None
            ),
            "iteration_sampled": picks[i][1] if i in picks else None,
            "outcome": status or ("pending" if i in picks else "unlabelled"),
        })
    store.close()
    return rows


def hindsight(paths: CampaignPaths, store: CampaignStore, window: float, unit: str) -> dict | None:
    """What a retrospective campaign can say once every reference energy of the pool is known (a
    replay of a completed reranking, as in `graceq demo`): the true window structures, the calls
    this campaign needed to measure them all, and the calls force-field order needs. None when the
    pool does not carry the reference energy of every structure.

    ``store``: the campaign's open store; the calls to full recall count whole batches.
    Energies per molecule in ``unit``.
    """
    apm = int(store.get_meta("atoms_per_molecule"))
    s = store.structures()
    picks = store.picks()
    _, e_ref, status = _pool_from_db(paths.structures, s["n_atoms"], apm)
    usable = np.array([st not in ("unstable", "failed") for st in status])
    if not usable.any() or not np.all(np.isfinite(e_ref[usable])):
        return None
    truth = np.where(usable, e_ref, np.inf)
    window_set = set(np.flatnonzero(truth <= truth.min() + window).tolist())
    iteration_of = {int(i): int(it) for i, it in picks}
    found = window_set & set(iteration_of)
    ff = np.argsort(per_molecule(s["energy_ff"], s["n_atoms"], apm), kind="stable")
    ff_calls = max(int(np.flatnonzero(np.isin(ff, list(window_set))).max()) + 1, 0)
    calls = None
    if found == window_set:  # a batch is paid in full: every pick up to the batch of the last one
        last_batch = max(iteration_of[i] for i in window_set)
        calls = sum(1 for it in iteration_of.values() if it <= last_batch)
    out = {"n_window_structures": len(window_set), "n_found": len(found), "calls_to_full_recall": calls,
           "force_field_order_calls_to_full_recall": ff_calls,
           "calls_saved_vs_force_field_order": None if calls is None else ff_calls - calls}
    if calls is None:
        out["note"] = (f"hindsight (the pool's reference energies are known): {len(found)} of the "
                       f"{len(window_set)} window structures found so far; force-field order needs {ff_calls} "
                       "calls to find them all")
    else:
        out["note"] = (f"hindsight (the pool's reference energies are known): all {len(window_set)} window "
                       f"structures found after {calls} reference calls; force-field order needs {ff_calls}: "
                       f"{ff_calls - calls} calls saved")
    return out


def csv_columns(unit: str) -> dict:
    """campaign_table key -> structures.csv column header (with its unit; counts and labels have none)."""
    e = f"[{unit} per molecule]"
    return {
        "name": "name", "n_atoms": "n_atoms",
        "energy_ff_per_molecule": f"energy_ff {e}",
        "predicted_ref_per_molecule": f"predicted_ref {e}",
        "sigma_per_molecule": f"sigma {e}",
        "measured_ref_per_molecule": f"measured_ref {e}",
        "relative_ref_per_molecule": f"measured_ref - best {e}",
        "density_gcm3": "density [g/cm^3]",
        "iteration_sampled": "iteration_sampled", "outcome": "outcome",
        "duplicate_group": "duplicate_group", "duplicate_of": "duplicate_of",
    }


def write_summary(root: str | Path) -> dict:
    """Write summary.json and structures.csv in the campaign directory; returns the summary.

    Unique counts: the measured window structures are grouped into distinct crystals by
    :func:`graceq.polymorphs.campaign_duplicates` (pair verdicts cached in the campaign).
    """
    from graceq.polymorphs import campaign_duplicates

    paths = CampaignPaths(root)
    settings = load_settings(paths.settings)
    store = CampaignStore(paths.root)
    iterations = store.iterations()
    rows = campaign_table(paths.root)
    window = settings.campaign.window
    measured = [(r["measured_ref_per_molecule"], r["name"]) for r in rows
                if r["outcome"] == "converged" and r["measured_ref_per_molecule"] is not None]
    best = min(measured)[0] if measured else None
    found = sorted((e, n) for e, n in measured if e <= best + window) if measured else []
    last = iterations[-1] if iterations else {}
    dups = campaign_duplicates(paths.root, scope="window")
    group_of, rep_of = dups.group_of(), dups.representative_of()
    density = _pool_from_db(paths.structures, np.array([r["n_atoms"] for r in rows]), 1)[0]
    for i, r in enumerate(rows):
        e = r["measured_ref_per_molecule"]
        r["relative_ref_per_molecule"] = e - best if e is not None and r["outcome"] == STABLE else None
        r["density_gcm3"] = float(density[i])
        r["duplicate_group"] = group_of.get(i)
        r["duplicate_of"] = rep_of.get(i)
    summary = {
        "campaign": str(paths.root),
        "n_pool": len(rows),
        "n_reference_calls": sum(1 for r in rows if r["outcome"] in ("converged", "unstable", "failed")),
        "n_unstable": sum(1 for r in rows if r["outcome"] == "unstable"),
        "n_failed": sum(1 for r in rows if r["outcome"] == "failed"),
        "window": window,
        "unit": settings.campaign.unit,
        "energy_basis": "per molecule",
        "best": best,
        "found": [n for _, n in found],
        "n_found": len(found),
        "n_found_unique": dups.n_window_unique,
        "found_unique": [dups.names[k] for k in range(len(dups.indices))
                         if dups.grouping.representative[k] and dups.in_window()[k]],
        "duplicate_groups": dups.window_groups(),
        "duplicate_method": dups.settings.describe(),
        "converged": last.get("stop") == "converged",
        "stop": last.get("stop"),
        "stop_rule": settings.campaign.stop_rule,
        "risk_target": settings.campaign.risk if settings.campaign.stop_rule == "risk" else None,
        "risk": last.get("risk"),
        "risk_statement": risk_statement(last, settings.campaign.risk, settings.campaign.unit) if last else None,
        "p_conv": last.get("p_conv"),
        "hindsight": (known := hindsight(paths, store, window, settings.campaign.unit)),
        "recall_note": None if known is None else known["note"],
        "provenance": provenance(paths.root),
        "iterations": [
            {k: it.get(k) for k in ("iteration", "risk", "p_conv", "residual", "n_expected", "test_rmse",
                                    "calibration", "ridge_lambda", "error_law_df", "error_law_scale",
                                    "error_law_noise", "error_law_kappa", "n_prospective", "n_labelled", "n_train",
                                    "n_reference_calls", "best", "max_ei", "forecaster")}
            for it in iterations
        ],
    }
    store.close()
    columns = csv_columns(settings.campaign.unit)
    with open(paths.root / "structures.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns.values()))
        writer.writeheader()
        writer.writerows({columns[k]: v for k, v in r.items()} for r in rows)
    atomic_write_json(paths.summary, summary)
    return summary


#: fewest measured stable structures before `graceq status` states the deltas' trend with E_ff
MIN_TREND = 10
#: significance at which the trend is called one (two-sided test of Pearson's r = 0)
TREND_P = 0.01


def delta_trend(energy_ff_mol, energy_ref_mol) -> tuple[float, float, int] | None:
    """Pearson's r of the measured deltas ``E_ref - E_ff`` against ``E_ff`` (per molecule, any one
    unit), the two-sided p-value of r = 0, and the number of structures; None with fewer than
    ``MIN_TREND`` or when either varies not at all.

    A clear trend says the force field's energy scale differs from the reference's, which a
    descriptor of local environments cannot express (``graceq.campaign.model_inputs``).
    """
    from scipy import stats

    e_ff = np.asarray(energy_ff_mol, dtype=float)
    delta = np.asarray(energy_ref_mol, dtype=float) - e_ff
    keep = np.isfinite(e_ff) & np.isfinite(delta)
    if keep.sum() < MIN_TREND or np.ptp(e_ff[keep]) == 0 or np.ptp(delta[keep]) == 0:
        return None
    r, p = stats.pearsonr(e_ff[keep], delta[keep])
    return float(r), float(p), int(keep.sum())


def _trend_line(store: CampaignStore, results: dict, settings) -> list[str]:
    """`graceq status`'s line on the deltas' trend with the force-field energy (none without one)."""
    measured = [i for i, (status, e) in results.items() if status == STABLE and e is not None]
    if len(measured) < MIN_TREND:
        return []
    s = store.structures()
    apm = int(store.get_meta("atoms_per_molecule"))
    rows = np.array(measured, dtype=int)
    e_ref = per_molecule(np.array([results[i][1] for i in measured], dtype=float), s["n_atoms"][rows], apm)
    trend = delta_trend(per_molecule(s["energy_ff"][rows], s["n_atoms"][rows], apm), e_ref)
    if trend is None:
        return []
    r, p, n = trend
    line = f"delta      E_ref - E_ff against E_ff: r = {r:+.2f} over {n} measured structures (p = {p:.1e})"
    if p < TREND_P:
        line += ("; the model has E_ff among its inputs" if settings.model.force_field_feature else
                 "; [model] force_field_feature = true would give the model E_ff as an input "
                 "(benchmarks/README.md measures what it changes)")
    return [line]


#: significance at which `graceq status` calls the prospective errors' growth with the force-field
#: height one (the likelihood-ratio test of ``graceq.convergence.height_growth``)
HEIGHT_P = 0.01


def height_sentence(errors, settings) -> str | None:
    """Whether the campaign's prospective errors grow with the force-field height, which the
    default error law assumes they do not (``errors``: ``(residual, spread, height)`` as
    :meth:`graceq.campaign.CampaignView.prospective_errors` gives them), in one sentence for
    `graceq status` and the report; None under another law or rule, or with too few errors. When they do (p < ``HEIGHT_P``), the stated risk may understate what is left among
    the high structures, and the sentence names the law that lets the noise grow."""
    from graceq.convergence import height_growth

    c = settings.campaign
    if c.stop_rule != "risk" or c.error_law != "spread_and_noise":
        return None
    growth = height_growth(*errors)
    if growth is None:
        return None
    sentence = (f"growth with the force-field height: likelihood ratio {growth.statistic:.1f} over "
                f"{growth.n} prospective errors (p = {growth.p_value:.1e}; kappa {growth.kappa:.3f}, the noise "
                f"per unit of height)")
    if growth.p_value < HEIGHT_P:
        sentence += ('; the default error law gives every structure the same noise, so the stated risk may '
                     'understate the high structures left: error_law = "spread_noise_height" lets the noise '
                     "grow with the height (benchmarks/README.md measures what it changes)")
    return sentence


def trend_sentence(errors, settings) -> str | None:
    """Whether the mean of the campaign's prospective errors (``errors`` as for
    :func:`height_sentence`) changes with the force-field height, in one sentence (Spearman's rank correlation of the errors with the heights, its two-sided
    p-value; rank-based, so the errors' heavy tails do not drive it); None without the risk rule or
    with too few errors.

    Every error law of graceq has mean 0 at every height: the campaign measures the low structures
    first and leaves the high ones, so errors that fall with the height mean that the structures
    left lie lower than the law allows, and the stated risk understates them (on the README's demo,
    ROY-264: rho -0.69 over 232 errors; at the stop the 12 structures left were predicted 15-25
    kJ/mol per molecule above the window's edge and lie 1.1-11.1 above it). When they fall at
    p < ``HEIGHT_P``, the sentence says so and names ``force_field_feature``, which lets the model
    learn the deltas' trend with E_ff (the same demo: rho -0.22, the law's noise 6.6 -> 2.2 kJ/mol).
    """
    from scipy import stats as sps

    from graceq.convergence import MIN_PROSPECTIVE

    if settings.campaign.stop_rule != "risk":
        return None
    r, _, h = errors
    if len(r) < MIN_PROSPECTIVE or not np.ptp(h) > 0 or not np.ptp(r) > 0:
        return None
    rho, p = sps.spearmanr(h, r)
    sentence = (f"mean against the force-field height: Spearman's rho {rho:+.2f} over {len(r)} prospective "
                f"errors (p = {p:.1e})")
    if p < HEIGHT_P and rho < 0:
        sentence += ("; they fall with the height, where the error law has mean 0, so the high structures left "
                     "may lie lower than the stated risk allows")
        sentence += ("; the model has E_ff among its inputs" if settings.model.force_field_feature else
                     "; [model] force_field_feature = true lets the model learn the trend (benchmarks/README.md)")
    elif p < HEIGHT_P:
        sentence += "; they rise with the height: the stated risk errs on the safe side for the high structures left"
    return sentence


def _campaign_view(store: CampaignStore, results: dict, settings):
    """The campaign's :class:`graceq.campaign.CampaignView` from its store, as its coordinator builds
    it (asynchronous decisions store their picks under their own number: lag 0)."""
    from graceq.campaign import CampaignView, prospective_predictions

    s = store.structures()
    lag = 0 if settings.campaign.mode == "async" else 1
    return CampaignView(n_atoms=s["n_atoms"], energy_ff=s["energy_ff"],
                        atoms_per_molecule=int(store.get_meta("atoms_per_molecule")),
                        picks=[idx for idx, _ in store.picks()], results=results,
                        predictions=prospective_predictions(store.pick_table(), store.iterations(), lag=lag))


def status_lines(root: str | Path) -> list[str]:
    """A short human summary of where a campaign stands (for `graceq status`)."""
    from graceq.jobs import in_flight_lines
    from graceq.lock import coordinator_alive, coordinator_lines

    paths = CampaignPaths(root)
    store = CampaignStore(paths.root, readonly=True)  # never creates or changes state.sqlite
    settings = load_settings(paths.settings)
    iterations = store.iterations()
    picks = store.picks()
    results = store.results()
    running = []
    for idx, _ in picks:
        if idx not in results and (paths.job_dir(idx) / "lease.json").exists():
            running.append(idx)
    queued = sum(1 for idx, _ in picks if idx not in results) - len(running)
    unit = settings.campaign.unit
    lines = [f"campaign   {paths.root}", f"pool       {store.n_structures()} structures"]
    lines += coordinator_lines(paths.root)
    if iterations:
        it = iterations[-1]
        going = "running" if coordinator_alive(paths.root) else "paused: no coordinator runs it"
        lines += [
            f"iteration  {it['iteration']} ({'stopped: ' + it['stop'] if it['stop'] else going})",
            f"risk       {risk_statement(it, settings.campaign.risk, settings.campaign.unit)}",
            f"p_conv     {it['p_conv']:.4f}   residual {it['residual']:.2f} structures",
            f"best       {it['best']:.3f} {unit}/molecule; {it['n_measured']} measured within "
            f"{settings.campaign.window} {unit}/molecule",
            f"model      test RMSE {it['test_rmse']:.3f} {unit}/molecule, ridge lambda "
            f"{it.get('ridge_lambda', it.get('lambda')):.1e}, calibration "
            f"{it.get('calibration', it.get('alpha')):.2f}, {it['n_train']} training structures",
        ]
        if it.get("forecaster"):   # p_window: which forecaster ranked the last picks, and why
            from graceq.convergence import FORECASTER_MEANING

            lines.append(f"ranking    by {FORECASTER_MEANING.get(it['forecaster'], it['forecaster'])}")
        from graceq.polymorphs import campaign_duplicates

        dups = campaign_duplicates(paths.root, scope="window")
        lines.append(f"unique     {dups.n_window_unique} distinct crystals among the {dups.n_window} measured "
                     f"window structures ({dups.n_window - dups.n_window_unique} duplicates)")
        lines += _trend_line(store, results, settings)
        errors = _campaign_view(store, results, settings).prospective_errors()
        lines += [f"errors     {sentence}" for sentence in (height_sentence(errors, settings),
                                                            trend_sentence(errors, settings)) if sentence]
    else:
        lines.append("iteration  none finished yet")
    n_unstable = sum(1 for s, _ in results.values() if s == "unstable")
    n_failed = sum(1 for s, _ in results.values() if s == "failed")
    lines.append(f"sampled    {len(picks)} picked, {len(results)} done ({n_unstable} unstable, {n_failed} failed)")
    lines.append(f"reference  {len(running)} running, {queued} waiting")
    lines += in_flight_lines(paths.root)
    store.close()
    return lines


# -- plots and report.html ------------------------------------------------------------------------
@dataclass
class CampaignRecord:
    """Everything the plots read, gathered once from a campaign directory.

    Energies are per molecule in `unit`; `energy_ref_pool` is the pool's own reference energy
    (replay pools and retrospective tests), NaN where the pool did not carry one.
    """

    root: Path
    unit: str
    window: float
    p_conv_target: float
    risk_target: float               # the stop rule's risk (stop_rule "risk")
    stop_rule: str
    names: np.ndarray
    n_atoms: np.ndarray
    energy_ff: np.ndarray            # per molecule
    energy_ref_pool: np.ndarray      # per molecule, NaN if unknown
    status_pool: np.ndarray          # the pool's own status key ("" if none)
    density: np.ndarray              # g/cm^3
    picks: list                      # (idx, iteration, rank, ei, mu, sigma) in sampling order
    results: dict                    # idx -> (status, E_ref per molecule or None)
    iterations: list                 # per-iteration stats, in order
    predictions: dict                # iteration -> dict(mu, sigma, ei, picks, pick_ei)
    known_form: np.ndarray | None = None  # label of an experimentally known form, "" for the others
    mode: str = "batch"              # [campaign] mode: how the picks' predictions are keyed (lag)
    error_law: str = "spread_and_noise"   # [campaign] error_law: the law the risk is stated in

    @property
    def best(self) -> float | None:
        """Lowest measured reference energy per molecule (stable structures), or None."""
        values = [e for s, e in self.results.values() if s == STABLE and e is not None]
        return min(values) if values else None

    @property
    def iteration_of(self) -> dict:
        return {p[0]: p[1] for p in self.picks}

    @property
    def has_reference(self) -> bool:
        return bool(np.isfinite(self.energy_ref_pool).any())


def _pool_from_db(path: Path, n_atoms: np.ndarray, apm: int):
    """Density (g/cm^3), pool reference energy per molecule and pool status of every structure.

    Read from the campaign's structures.db (graceq.pooldb.write_pool_db: row id = pool index + 1,
    key-value pairs ``energy_ref`` total per cell in the campaign unit and ``status`` where the
    pool had them).
    """
    from ase.db import connect

    n = len(n_atoms)
    density = np.full(n, np.nan)
    e_ref = np.full(n, np.nan)
    status = np.full(n, "", dtype=object)
    if not path.exists():
        return density, e_ref, status
    with connect(path) as db:
        for row in db.select(sort="id"):
            i = row.id - 1
            if not 0 <= i < n:
                continue
            density[i] = cell_density_gcm3(row.toatoms())
            value = row.get("energy_ref")
            if value is not None and np.isfinite(float(value)):
                e_ref[i] = float(per_molecule(float(value), n_atoms[i], apm))
            status[i] = str(row.get("status", ""))
    return density, e_ref, status


_TRUE = {"t", "true", "yes", "y", "1"}
_FALSE = {"", "f", "false", "no", "n", "0", "none", "nan"}


def _form_label(value, name: str) -> str:
    """The label of a known form from a pool's ``known_form`` value: True -> the name, a text -> itself."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return name if value else ""
    text = str(value).strip()
    if text.lower() in _TRUE:
        return name
    return "" if text.lower() in _FALSE else text


def known_forms(paths: CampaignPaths, names) -> np.ndarray:
    """Label of each pool structure that is an experimentally known form ("" for the others).

    Read from the key ``known_form`` of the campaign's structures.db when it has one, else from the
    pool source named in pool.json (per-frame ``known_form`` of a structure file, or a
    ``known_form`` column of a CSV in a pool directory), matched by structure name. A value of
    True/T/yes labels the structure with its name; any other text is the form's label (e.g. "Y").
    Missing or unreadable sources give no labels: labels are decoration, never a reason to fail.
    """
    from ase.db import connect

    labels = np.full(len(names), "", dtype=object)
    index = {str(n): i for i, n in enumerate(names)}
    values: dict[str, object] = {}
    if paths.structures.exists():
        with connect(paths.structures) as db:
            for row in db.select(sort="id"):
                if "known_form" in row.key_value_pairs and 0 <= row.id - 1 < len(names):
                    values[str(names[row.id - 1])] = row.key_value_pairs["known_form"]
    if not values and paths.pool_meta.exists():
        try:
            source = Path(json.loads(paths.pool_meta.read_text()).get("source", ""))
            if source.is_file() and source.suffix.lower() != ".db":
                import ase.io

                for atoms in ase.io.read(str(source), ":"):
                    if "known_form" in atoms.info and "name" in atoms.info:
                        values[str(atoms.info["name"])] = atoms.info["known_form"]
            elif source.is_dir():
                for table in sorted(source.glob("*.csv")):
                    with open(table, newline="") as handle:
                        for row in csv.DictReader(handle):
                            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                            if "known_form" in row and row.get("name"):
                                values[row["name"]] = row["known_form"]
        except Exception:  # noqa: BLE001 - a moved or unreadable source only loses the labels
            values = {}
    for name, value in values.items():
        if name in index:
            labels[index[name]] = _form_label(value, name)
    return labels


def load_record(root: str | Path) -> CampaignRecord:
    """Read a campaign directory (store, settings, structures.db, predictions) for the report."""
    paths = CampaignPaths(root)
    settings = load_settings(paths.settings)
    store = CampaignStore(paths.root)
    try:
        apm = int(store.get_meta("atoms_per_molecule"))
        s = store.structures()
        picks = store.pick_table()
        results = {
            idx: (status, None if e is None else float(per_molecule(e, s["n_atoms"][idx], apm)))
            for idx, status, e, *_ in store.result_table()
        }
        iterations = store.iterations()
    finally:
        store.close()
    density, e_ref, status = _pool_from_db(paths.structures, s["n_atoms"], apm)
    predictions = {}
    for it in iterations:
        path = paths.iteration(it["iteration"]) / "predictions.npz"
        if path.exists():
            with np.load(path) as data:
                predictions[it["iteration"]] = {k: data[k] for k in data.files}
    return CampaignRecord(
        root=paths.root, unit=settings.campaign.unit, window=float(settings.campaign.window),
        p_conv_target=float(settings.campaign.p_conv_target), risk_target=float(settings.campaign.risk),
        stop_rule=settings.campaign.stop_rule, names=s["name"], n_atoms=s["n_atoms"],
        energy_ff=per_molecule(s["energy_ff"], s["n_atoms"], apm), energy_ref_pool=e_ref,
        status_pool=status, density=density, picks=picks, results=results, iterations=iterations,
        predictions=predictions, known_form=known_forms(paths, s["name"]),
        mode=settings.campaign.mode, error_law=settings.campaign.error_law,
    )


def _figure(width=8.0, height=5.0, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), **kwargs)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def _no_data(path: Path, title: str, message: str) -> Path:
    fig, ax = _figure()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_axis_off()
    return _save(fig, path)


def plot_landscape(rec: CampaignRecord, path: Path) -> Path:
    """Energy-density landscape: relative reference energy per molecule vs density (g/cm^3).

    Measured structures are coloured by the iteration that sampled them; unstable and failed
    ones are drawn at the energy predicted when they were picked; the pool's own reference
    landscape (when known) is drawn in grey beneath; the window above the best is shaded.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = rec.best
    title = "Energy-density landscape"
    if best is None:
        return _no_data(path, title, "no reference energy measured yet")
    u = rec.unit
    fig, ax = _figure(8.5, 5.5)
    ax.axhspan(0.0, rec.window, color="tab:green", alpha=0.12, lw=0,
               label=f"window: best + {rec.window:g} {u}")
    if rec.has_reference:
        known = np.isfinite(rec.energy_ref_pool) & ~np.isin(rec.status_pool, ["unstable", "failed"])
        ax.scatter(rec.density[known], rec.energy_ref_pool[known] - best, s=22, facecolors="none",
                   edgecolors="0.6", lw=0.8, label=f"pool reference ({known.sum()})", zorder=1)
        true_top = np.nanmin(rec.energy_ref_pool[known]) + rec.window - best
        if abs(true_top - rec.window) > 1e-9:
            ax.axhline(true_top, color="tab:green", ls="--", lw=1, label="window above the pool's true minimum")
    it_of = rec.iteration_of
    stable = np.array([i for i, (s, e) in rec.results.items() if s == STABLE and e is not None], dtype=int)
    n_it = max([p[1] for p in rec.picks], default=0)
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(vmin=0, vmax=max(n_it, 1))
    if len(stable):
        energies = np.array([rec.results[i][1] for i in stable]) - best
        sc = ax.scatter(rec.density[stable], energies, c=[it_of[i] for i in stable], cmap=cmap, norm=norm,
                        s=30, edgecolors="k", lw=0.3, label=f"measured ({len(stable)})", zorder=3)
        bar = fig.colorbar(sc, ax=ax, label="iteration sampled (0 = initial batch)")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    # The axis spans the measured energies and the window (plus a margin). Unstable and failed
    # structures have no reference energy: drawn at the energy predicted when they were picked, or,
    # for those picked before any model existed (the initial batch), at the top edge; anything
    # beyond the axis is drawn on its edge. (A force-field total is no relative reference energy.)
    shown = [0.0, rec.window] + ([] if not len(stable) else list(energies))
    margin = max(0.08 * (max(shown) - min(shown)), 0.1 * rec.window)
    low, top = min(shown) - margin, max(shown) + margin
    predicted_at_pick = {p[0]: p[4] for p in rec.picks}
    for outcome, marker, colour in (("unstable", "x", "tab:red"), ("failed", "^", "tab:orange")):
        rows = [i for i, (s, _) in rec.results.items() if s == outcome]
        if rows:
            y = np.array([predicted_at_pick[i] - best if predicted_at_pick.get(i) is not None else np.inf
                          for i in rows], dtype=float)
            unpredicted = int(np.isinf(y).sum())
            label = f"{outcome} ({len(rows)}): at the predicted energy" + (
                f"; {unpredicted} without a prediction at the top edge" if unpredicted else "")
            ax.scatter(rec.density[rows], np.clip(y, low, top), marker=marker, c=colour, s=40, label=label,
                       zorder=4, clip_on=False)
    ax.set_ylim(low, top)  # pool reference points beyond it are cut off by the axis
    _label_known_forms(ax, rec, best)
    ax.set_xlabel("density (g/cm$^3$)")
    ax.set_ylabel(f"relative reference energy ({u} per molecule)")
    ax.set_title(f"{title}: {len(stable)} measured of {len(rec.names)}")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _save(fig, path)


def _label_known_forms(ax, rec: CampaignRecord, best: float) -> None:
    """Mark and name the experimentally known forms: at their measured energy, else (grey, italic) at
    the pool's reference energy when the pool knows it; unmeasured forms of an unknown landscape are left out."""
    if rec.known_form is None:
        return
    drawn = False
    for i in np.flatnonzero(rec.known_form != ""):
        status, e = rec.results.get(int(i), ("", None))
        if status == STABLE and e is not None:
            y, style = e - best, dict(color="k", fontstyle="normal")
        elif np.isfinite(rec.energy_ref_pool[i]) and status not in ("unstable", "failed"):
            y, style = rec.energy_ref_pool[i] - best, dict(color="0.45", fontstyle="italic")
        else:
            continue
        ax.scatter([rec.density[i]], [y], marker="*", s=140, facecolors="none", edgecolors="tab:red", lw=1.0,
                   zorder=5, label=None if drawn else "known form (grey: not measured)")
        ax.annotate(str(rec.known_form[i]), (rec.density[i], y), textcoords="offset points", xytext=(6, 4),
                    fontsize=7, zorder=6, **style)
        drawn = True


def measured_stable(rec: CampaignRecord) -> np.ndarray:
    """Pool indices of the measured stable structures, lowest reference energy first."""
    rows = [i for i, (s, e) in rec.results.items() if s == STABLE and e is not None]
    return np.array(sorted(rows, key=lambda i: (rec.results[i][1], i)), dtype=int)


def plot_parity(rec: CampaignRecord, path: Path) -> Path:
    """Force-field (left) and predicted (right) against measured reference energy, per molecule.

    Reference energies are relative to the best; force-field energies relative to the lowest
    force-field energy among the measured. The prediction is the one made when the structure was
    picked (before it was measured: out of sample), with its sigma; the initial batch has none.
    The window (best + window) is shaded on the reference axis.
    """
    title = "Parity"
    rows = measured_stable(rec)
    if not len(rows):
        return _no_data(path, title, "no reference energy measured yet")
    u, w, best = rec.unit, rec.window, rec.best
    e_ref = np.array([rec.results[i][1] for i in rows]) - best
    e_ff = rec.energy_ff[rows] - rec.energy_ff[rows].min()
    inside = e_ref <= w + 1e-12
    fig, (left, right) = _figure(12.0, 5.5, ncols=2)
    for ax in (left, right):
        ax.axvspan(min(0.0, e_ref.min()), w, color="tab:green", alpha=0.12, lw=0, label=f"window ({w:g} {u})")
        ax.grid(alpha=0.3)
    left.scatter(e_ref[~inside], e_ff[~inside], s=22, c="tab:blue", edgecolors="k", lw=0.3, label="measured")
    left.scatter(e_ref[inside], e_ff[inside], s=34, c="tab:green", edgecolors="k", lw=0.5,
                 label=f"measured in the window ({inside.sum()})")
    if len(rows) > 2:
        from scipy.stats import spearmanr

        rho = spearmanr(e_ref, e_ff).statistic
        left.set_title(f"force field against reference ({len(rows)} measured, Spearman {rho:.2f})")
    else:
        left.set_title(f"force field against reference ({len(rows)} measured)")
    left.set_xlabel(f"reference energy - best ({u} per molecule)")
    left.set_ylabel(f"force-field energy - lowest measured ({u} per molecule)")
    left.legend(fontsize=8, loc="upper left")
    picked = {p[0]: (p[4], p[5]) for p in rec.picks if p[4] is not None}
    have = np.array([i in picked for i in rows])
    if have.any():
        mu = np.array([picked[i][0] for i in rows[have]]) - best
        sigma = np.array([picked[i][1] if picked[i][1] is not None else 0.0 for i in rows[have]])
        x = e_ref[have]
        right.errorbar(x, mu, yerr=sigma, fmt="o", ms=4, color="tab:purple", ecolor="0.6", elinewidth=0.8,
                       label=f"predicted when picked, +/- sigma ({have.sum()})")
        lo, hi = float(min(x.min(), mu.min(), 0.0)), float(max(x.max(), mu.max(), w))
        right.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
        right.axhline(w, color="tab:green", lw=0.8, ls=":")
        rmse = float(np.sqrt(np.mean((mu - x) ** 2)))
        right.set_title(f"predicted against reference (RMSE {rmse:.2f} {u} per molecule)")
    else:
        right.text(0.5, 0.5, "no structure measured after a prediction yet\n(the initial batch has none)",
                   ha="center", va="center", transform=right.transAxes)
        right.set_title("predicted against reference")
    right.set_xlabel(f"reference energy - best ({u} per molecule)")
    right.set_ylabel(f"predicted reference energy - best ({u} per molecule)")
    right.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_rank(rec: CampaignRecord, path: Path) -> Path:
    """Rank of each measured structure by force-field energy in the pool against its reference rank.

    A perfect force field puts every point on the diagonal; the dashed line is the force-field rank
    a force-field-ordered reranking would have to reach to find every window structure measured so far.
    """
    title = "Rank"
    rows = measured_stable(rec)
    if not len(rows):
        return _no_data(path, title, "no reference energy measured yet")
    ff_rank = np.argsort(np.argsort(rec.energy_ff, kind="stable"), kind="stable") + 1
    x = ff_rank[rows]
    y = np.arange(1, len(rows) + 1)  # rows are sorted by reference energy
    e_ref = np.array([rec.results[i][1] for i in rows]) - rec.best
    inside = e_ref <= rec.window + 1e-12
    fig, ax = _figure(8.5, 5.5)
    ax.scatter(x[~inside], y[~inside], s=20, c="tab:blue", edgecolors="k", lw=0.3, label="measured")
    ax.scatter(x[inside], y[inside], s=34, c="tab:green", edgecolors="k", lw=0.5,
               label=f"in the window ({inside.sum()})")
    top = int(x[inside].max())
    ax.axvline(top, color="tab:red", ls="--", lw=1,
               label=f"force-field order needs {top} calls for these {inside.sum()}")
    ax.set_xlim(0, len(rec.names) + 1)
    ax.set_ylim(0, len(rows) + 1)
    ax.set_xlabel(f"force-field rank in the pool (1 = lowest of {len(rec.names)})")
    ax.set_ylabel(f"reference rank among the measured (1 = best of {len(rows)})")
    ax.set_title(f"{title}: force field against reference, {len(rows)} measured")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_convergence(rec: CampaignRecord, path: Path) -> Path:
    """Stated risk and p_conv (each with its stopping target), residual and test RMSE per iteration."""
    title = "Convergence"
    if not rec.iterations:
        return _no_data(path, title, "no iteration finished yet")
    it = np.array([s["iteration"] for s in rec.iterations])
    calls = [s["n_reference_calls"] for s in rec.iterations]
    fig, axes = _figure(8.0, 10.0, nrows=4, sharex=True)
    risk = np.array([np.nan if s.get("risk") is None else s["risk"] for s in rec.iterations], dtype=float)
    axes[0].semilogy(it, np.clip(risk, 1e-6, None), "o-", color="tab:green")
    axes[0].axhline(rec.risk_target, color="tab:red", ls="--", lw=1,
                    label=f"stop at {rec.risk_target:g}" + ("" if rec.stop_rule == "risk" else " (not the rule)"))
    axes[0].set_ylabel("stated risk\nP(a window structure\nis missed) <=")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(it, [s["p_conv"] for s in rec.iterations], "o-", color="tab:blue")
    axes[1].axhline(rec.p_conv_target, color="tab:red", ls="--", lw=1,
                    label=f"stop at {rec.p_conv_target:g}" + ("" if rec.stop_rule == "p_conv" else " (not the rule)"))
    axes[1].set_ylabel("p_conv")
    axes[1].set_ylim(-0.02, 1.05)
    axes[1].legend(loc="lower right", fontsize=8)
    axes[2].plot(it, [s["residual"] for s in rec.iterations], "o-", color="tab:purple")
    axes[2].set_ylabel("residual\n(expected missing,\nnormal law)")
    axes[3].plot(it, [s["test_rmse"] for s in rec.iterations], "o-", color="tab:brown")
    axes[3].set_ylabel(f"test RMSE\n({rec.unit} per molecule)")
    axes[3].set_xlabel("iteration")
    axes[3].set_xticks(it)
    top = axes[0].secondary_xaxis("top")
    top.set_xticks(it)
    top.set_xticklabels([str(c) for c in calls], fontsize=7)
    top.set_xlabel("reference calls", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: {rec.iterations[-1]['stop'] or 'running'} after iteration {it[-1]}")
    return _save(fig, path)


def plot_expected_improvement(rec: CampaignRecord, path: Path) -> Path:
    """EI of every unlabelled structure per iteration: sorted curves (left) and a strip (right).

    Log scale; the structures picked next are outlined in red in the strip. EI below
    EI_FLOOR_RATIO x the largest EI of the campaign is drawn at that floor.
    """
    import matplotlib.pyplot as plt

    title = "Expected improvement"
    its = sorted(k for k, p in rec.predictions.items() if np.isfinite(p["ei"]).any())
    if not its:
        return _no_data(path, title, "no EI computed yet")
    top = max(float(np.nanmax(rec.predictions[k]["ei"])) for k in its)
    floor = top * EI_FLOOR_RATIO if top > 0 else 1e-12
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(its[0], max(its[-1], its[0] + 1))
    fig, (left, right) = _figure(12.0, 5.0, ncols=2)
    rng = np.random.default_rng(0)
    for k in its:
        ei = rec.predictions[k]["ei"]
        values = np.clip(np.sort(ei[np.isfinite(ei)])[::-1], floor, None)
        colour = cmap(norm(k))
        left.plot(np.arange(1, len(values) + 1), values, color=colour, lw=1.2)
        x = k + rng.uniform(-0.3, 0.3, size=len(values))
        right.scatter(x, values, s=6, color=colour, alpha=0.6, lw=0)
        picks = np.asarray(rec.predictions[k]["picks"], dtype=int)
        if len(picks):
            right.scatter(k + rng.uniform(-0.3, 0.3, size=len(picks)), np.clip(ei[picks], floor, None), s=22,
                          facecolors="none", edgecolors="tab:red", lw=0.9)
    right.scatter([], [], s=22, facecolors="none", edgecolors="tab:red", label="picked next")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, top * 3)
        ax.grid(alpha=0.3)
    left.set_xscale("log")
    left.set_xlabel("rank among unlabelled structures")
    left.set_ylabel(f"EI ({rec.unit} per molecule)")
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(mappable, ax=left, label="iteration")
    right.set_xlabel("iteration")
    right.set_xticks(its)
    right.set_ylabel(f"EI ({rec.unit} per molecule)")
    right.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{title} of every unlabelled structure, before each batch (floor {floor:.1e})")
    return _save(fig, path)


def energy_density_curves(rec: CampaignRecord, iteration: int, grid) -> dict:
    """The energy density of the pool after `iteration`, on `grid` (energies relative to the best).

    Returns ``density`` (structures per unit energy: sum of the unlabelled normal densities),
    ``measured_below`` (stable measured structures with E <= grid), ``predicted_below`` (sum of the
    unlabelled normal CDFs), plus the relative ``mu``, ``sigma`` of the unlabelled structures, their
    pool indices ``unlabelled``, the relative ``measured`` energies and the ``best`` they are
    relative to (per molecule, as the iteration saw it). "Labelled" means picked in
    iterations <= `iteration`, as when that iteration decided. At grid = window,
    measured_below + predicted_below is that iteration's N_expected.
    """
    from graceq.convergence import cumulative_count, energy_density

    grid = np.asarray(grid, dtype=float)
    best = min(e for i, (s, e) in rec.results.items() if s == STABLE and e is not None
               and rec.iteration_of.get(i, np.inf) <= iteration)
    pred = rec.predictions[iteration]
    labelled = np.zeros(len(pred["mu"]), dtype=bool)
    labelled[[p[0] for p in rec.picks if p[1] <= iteration]] = True
    unl = np.flatnonzero(~labelled)
    mu, sigma = pred["mu"][unl] - best, pred["sigma"][unl]
    measured = np.array([e for i, (s, e) in rec.results.items()
                         if s == STABLE and e is not None and labelled[i]]) - best
    empty = np.zeros(grid.shape)
    return {
        "best": best, "unlabelled": unl, "mu": mu, "sigma": sigma, "measured": measured,
        "density": energy_density(mu, sigma, grid) if len(unl) else empty,
        "measured_below": (measured[None, :] <= grid.reshape(-1, 1)).sum(axis=1).reshape(grid.shape)
        if len(measured) else empty,
        "predicted_below": cumulative_count(mu, sigma, grid) if len(unl) else empty,
    }


def plot_energy_density(rec: CampaignRecord, path: Path) -> Path:
    """Predicted energy density of the pool at the last iteration (top) and the cumulative count (bottom).

    Unlabelled structures contribute their normal densities N(mu_i, sigma_i) (their sum is the
    energy density of DESIGN.md section 6); measured stable structures are drawn as a histogram
    (structures per unit energy). The expected count below E is the measured count plus the sum of
    the unlabelled normal CDFs; at T = best + window it is N_expected.
    """
    title = "Predicted energy density"
    its = sorted(rec.predictions)
    if not its or rec.best is None:
        return _no_data(path, title, "no prediction yet")
    k = its[-1]
    stats = next(s for s in rec.iterations if s["iteration"] == k)
    w = rec.window
    first = energy_density_curves(rec, k, np.array([0.0]))
    mu, sigma = first["mu"], first["sigma"]
    lo = max(min(float(np.min(mu - 2 * sigma)) if len(mu) else 0.0, 0.0) - 0.5 * w, -4.0 * w)
    hi = 3.0 * w
    grid = np.linspace(lo, hi, 600)
    curves = energy_density_curves(rec, k, grid)
    measured, unl, best = curves["measured"], curves["unlabelled"], curves["best"]
    fig, (top, bottom) = _figure(9.0, 7.5, nrows=2, sharex=True)
    for ax in (top, bottom):
        ax.axvspan(0.0, w, color="tab:green", alpha=0.12, lw=0, label=f"window: best + {w:g} {rec.unit}")
        ax.grid(alpha=0.3)
    bins = np.linspace(lo, hi, 31)
    if len(measured):
        counts, edges = np.histogram(measured, bins=bins)
        top.bar(edges[:-1], counts / np.diff(edges), width=np.diff(edges), align="edge", color="tab:blue",
                alpha=0.4, label=f"measured ({len(measured)})")
    if rec.has_reference and len(unl):
        ref = rec.energy_ref_pool[unl]
        ref = ref[np.isfinite(ref) & ~np.isin(rec.status_pool[unl], ["unstable", "failed"])] - best
        counts, edges = np.histogram(ref, bins=bins)
        top.step(edges, np.append(counts / np.diff(edges), 0.0), where="post", color="0.3", ls="--", lw=1,
                 label="true reference of the unlabelled (known pool)")
    top.plot(grid, curves["density"], color="tab:orange", lw=2, label=f"predicted, unlabelled ({len(unl)})")
    top.set_ylabel(f"structures per {rec.unit}\nper molecule")
    top.legend(loc="upper left", fontsize=8, framealpha=0.9)
    top.set_title(f"{title} at iteration {k} (p_conv {stats['p_conv']:.3f})")

    n_below, predicted = curves["measured_below"], curves["predicted_below"]
    bottom.plot(grid, n_below, color="tab:blue", lw=1.2, drawstyle="steps-post", label="measured below E")
    bottom.plot(grid, n_below + predicted, color="k", lw=1.5, label="expected below E (measured + predicted)")
    bottom.axhline(stats["n_expected"], color="k", ls=":", lw=0.8)
    bottom.plot([w], [stats["n_expected"]], "o", color="k")
    bottom.annotate(f"at T = best + window: N_expected {stats['n_expected']:.1f}\n"
                    f"= {stats['n_measured']} measured + residual {stats['residual']:.2f}",
                    xy=(w, stats["n_expected"]), xytext=(12, 12), textcoords="offset points", fontsize=8,
                    bbox=dict(boxstyle="round", fc="white", ec="0.6", alpha=0.9))
    bottom.set_ylim(0, max(float((n_below + predicted)[grid <= 1.5 * w].max()) * 1.15, 1.0))
    bottom.set_ylabel("structures below E")
    bottom.set_xlabel(f"relative reference energy E ({rec.unit} per molecule)")
    bottom.set_xlim(lo, hi)
    bottom.legend(loc="upper left", fontsize=8, framealpha=0.9)
    return _save(fig, path)


def plot_learning_curve(rec: CampaignRecord, path: Path) -> Path:
    """Test RMSE of the calibrated committee against the number of training structures (log-log)."""
    title = "Learning curve"
    if not rec.iterations:
        return _no_data(path, title, "no iteration finished yet")
    n_train = np.array([s["n_train"] for s in rec.iterations], dtype=float)
    rmse = np.array([s["test_rmse"] for s in rec.iterations], dtype=float)
    fig, ax = _figure(8.0, 5.0)
    ax.plot(n_train, rmse, "o-", color="tab:brown")
    for s, x, y in zip(rec.iterations, n_train, rmse):
        ax.annotate(str(s["iteration"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training structures (first 80 % of the labelled, in sampling order)")
    ax.set_ylabel(f"test RMSE ({rec.unit} per molecule)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{title} (test set: the most recent 20 %; labels are iterations)")
    return _save(fig, path)


def prospective_record(rec: CampaignRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The campaign's prospective errors (E_ref - mu, per molecule, each from the prediction made
    before the structure was measured), their raw spreads and force-field heights, in sampling order."""
    from graceq.campaign import prospective_predictions
    from graceq.convergence import prospective_errors

    predicted = prospective_predictions(rec.picks, rec.iterations, lag=0 if rec.mode == "async" else 1)
    rows = [int(p[0]) for p in rec.picks if int(p[0]) in predicted and rec.results.get(int(p[0]), ("", None))[0] == STABLE
            and rec.results[int(p[0])][1] is not None]
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    mu, spread = np.array([predicted[i] for i in rows], dtype=float).T
    height = rec.energy_ff - np.nanmin(rec.energy_ff)
    return prospective_errors([rec.results[i][1] for i in rows], mu, spread, height[rows])


def plot_error_law(rec: CampaignRecord, path: Path) -> Path:
    """The evidence behind the stated risk: the prospective errors against the law it is stated in.

    Left, a quantile-quantile plot: each error divided by its width under the law of the last
    statement, ``sqrt((k s)^2 + noise^2 + (kappa h)^2)``, against the quantiles of that law's t
    distribution (on the line: the law describes the errors; a missed window structure is a large
    negative error, so the lower left is where the stop lives). Right, the errors against the
    structures' force-field height, with the law's +/- 2 widths at the median spread, and the
    likelihood-ratio test of a noise that grows with the height (``graceq.convergence.height_growth``).
    """
    from scipy import stats as sps

    from graceq.campaign import IterationStats
    from graceq.convergence import MIN_PROSPECTIVE, height_growth

    title = "Prospective errors and the error law"
    r, s, h = prospective_record(rec)
    if not len(r):
        return _no_data(path, title, "no structure measured after a prediction yet")
    stated = [it for it in rec.iterations if IterationStats.from_json(it).error_law() is not None]
    law = IterationStats.from_json(stated[-1]).error_law() if stated else None
    u = rec.unit
    fig, (left, right) = _figure(12.0, 5.5, ncols=2)
    n = len(r)
    p = (np.arange(1, n + 1) - 0.5) / n
    if law is not None:
        z = np.sort(r / law.scales(s, h if law.kappa > 0 else None))
        q = sps.t.ppf(p, law.df)
        name = f"t, {law.df:.3g} df"
    else:
        z = np.sort(r / np.std(r)) if np.std(r) > 0 else np.sort(r)
        q = sps.norm.ppf(p)
        name = f"normal (no law stated: fewer than {MIN_PROSPECTIVE} errors)"
    left.scatter(q, z, s=14, c="tab:purple", edgecolors="k", lw=0.3, label=f"{n} prospective errors, standardised")
    lim = float(max(np.abs(q).max(), np.abs(z).max())) * 1.05
    left.plot([-lim, lim], [-lim, lim], "k--", lw=0.8, label="y = x: the law fits")
    left.set_xlabel(f"quantile of the law ({name})")
    left.set_ylabel("error / its width under the law")
    left.set_title("quantiles of the errors against the stated law")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left")
    right.scatter(h, r, s=14, c="tab:blue", edgecolors="k", lw=0.3, label="prospective error")
    right.axhline(0.0, color="k", lw=0.8)
    if law is not None:
        grid = np.linspace(0.0, float(h.max()) * 1.02 + 1e-12, 200)
        width = law.scales(np.full(len(grid), np.median(s)), grid if law.kappa > 0 else None)
        right.plot(grid, 2 * width, color="tab:red", lw=1.0, label="+/- 2 widths of the law (median spread)")
        right.plot(grid, -2 * width, color="tab:red", lw=1.0)
    growth = height_growth(r, s, h) if rec.error_law == "spread_and_noise" else None
    right.set_title("errors against the force-field height" + (
        f"\n(height test: likelihood ratio {growth.statistic:.1f}, p = {growth.p_value:.1e})"
        if growth is not None else ""))
    right.set_xlabel(f"force-field energy above the pool's lowest ({u} per molecule)")
    right.set_ylabel(f"E_ref - prediction ({u} per molecule)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


PLOTS = (
    ("landscape.png", plot_landscape, "Energy-density landscape of the measured structures"),
    ("convergence.png", plot_convergence, "stated risk, p_conv, residual and test RMSE per iteration"),
    ("expected_improvement.png", plot_expected_improvement, "Expected improvement per iteration"),
    ("energy_density.png", plot_energy_density, "Predicted energy density of the pool, last iteration"),
    ("learning_curve.png", plot_learning_curve, "Learning curve"),
    ("parity.png", plot_parity, "Force-field and predicted against reference energy"),
    ("rank.png", plot_rank, "Force-field rank against reference rank"),
    ("error_law.png", plot_error_law, "Prospective errors against the law the risk is stated in"),
)


def found_table(rec: CampaignRecord, duplicate_of: dict | None = None) -> list[dict]:
    """The measured stable structures within the window of the best, lowest first.

    ``duplicate_of`` (pool index -> name of the lowest-energy structure of its duplicate group,
    :meth:`graceq.polymorphs.CampaignDuplicates.representative_of`) fills the ``duplicate_of``
    column ("" for a structure that represents its group).
    """
    best = rec.best
    if best is None:
        return []
    it_of = rec.iteration_of
    ff_rank = np.argsort(np.argsort(rec.energy_ff)) + 1
    rows = [
        {"name": str(rec.names[i]), "relative_ref": e - best, "relative_ff": float(rec.energy_ff[i] - rec.energy_ff.min()),
         "ff_rank": int(ff_rank[i]), "density": float(rec.density[i]), "iteration": it_of.get(i),
         "duplicate_of": "" if duplicate_of is None or duplicate_of.get(i, str(rec.names[i])) == str(rec.names[i])
         else duplicate_of[i],
         "known_form": str(rec.known_form[i]) if rec.known_form is not None else ""}
        for i, (s, e) in rec.results.items() if s == STABLE and e is not None and e <= best + rec.window
    ]
    return sorted(rows, key=lambda r: r["relative_ref"])


def _utc(seconds: float | None) -> str:
    from datetime import datetime, timezone

    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def provenance_rows(root: str | Path) -> tuple[list[tuple[str, str]], str]:
    """What produced this campaign: (rows of facts, the settings.toml text).

    Facts: campaign id, engine, seed, pool source, graceq version writing the report, library
    versions, the dates of the first reference job sent, the first and last result received and
    the last iteration finished (UTC), and the wall time from the first job to the last iteration.
    """
    import platform
    import time

    from graceq import __version__
    from graceq.provenance import timestamps, versions

    paths = CampaignPaths(root)
    settings = load_settings(paths.settings)
    store = CampaignStore(paths.root)
    try:
        campaign_id = store.get_meta("campaign_id")
    finally:
        store.close()
    t = timestamps(paths.root)
    first_sent, first_result, last_result, last_iteration = (
        t["first_sent"], t["first_result"], t["last_result"], t["last_iteration"])
    source = "-"
    if paths.pool_meta.exists():
        source = str(json.loads(paths.pool_meta.read_text()).get("source", "-"))
    start = min((x for x in (first_sent, first_result) if x is not None), default=None)
    libraries = [f"{name} {v}" for name, v in versions(
        ("numpy", "scikit-learn", "ase", "featomic", "celery", "pymatgen")).items() if v]
    c = settings.campaign
    rows = [
        ("campaign id", str(campaign_id)),
        ("engine", str(settings.engine.engine)),
        ("seed", str(c.seed)),
        ("pool", f"{source} ({c.unit}, totals per cell)"),
        ("settings", f"window {c.window:g} {c.unit} per molecule, n_init {c.n_init}, n_batch {c.n_batch}, "
                     f"acquisition {c.acquisition}, mode {c.mode}, stop rule {c.stop_rule} ("
                     + (f"risk {c.risk:g} at {c.risk_confidence:.0%} confidence" if c.stop_rule == "risk"
                        else f"p_conv target {c.p_conv_target:g}") + f"), budget {c.budget or 'none'}"),
        ("graceq", f"{__version__} (this report)"),
        ("software", f"Python {platform.python_version()}; " + ", ".join(libraries)),
        ("first reference job sent", _utc(first_sent)),
        ("first result received", _utc(first_result)),
        ("last result received", _utc(last_result)),
        ("last iteration finished", _utc(last_iteration)),
        ("wall time", _duration(last_iteration - start) + " (first job sent to last iteration finished)"
         if start is not None and last_iteration is not None else "-"),
        ("report written", _utc(time.time())),
    ]
    return rows, paths.settings.read_text() if paths.settings.exists() else ""


def _html(rec: CampaignRecord, images: list[tuple[Path, str]], origin=None, duplicates=None,
          checks: tuple[tuple[str, str], ...] = ()) -> str:
    u = html.escape(rec.unit)
    last = rec.iterations[-1] if rec.iterations else {}
    n_calls = sum(1 for s, _ in rec.results.values() if s in (STABLE, "unstable", "failed"))
    facts = [
        ("campaign", str(rec.root)),
        ("pool", f"{len(rec.names)} structures"),
        ("reference calls", f"{n_calls} ({sum(1 for s, _ in rec.results.values() if s == 'unstable')} unstable, "
                            f"{sum(1 for s, _ in rec.results.values() if s == 'failed')} failed)"),
        ("stop", str(last.get("stop") or "running")),
        ("stated risk", html.escape(risk_statement(last, rec.risk_target, rec.unit)) if last else "-"),
        ("p_conv", f"{last['p_conv']:.4f} (target {rec.p_conv_target:g})" if last else "-"),
        ("window", f"{rec.window:g} {rec.unit} per molecule above the best"),
        ("best", f"{rec.best:.3f} {rec.unit} per molecule" if rec.best is not None else "-"),
    ]
    facts += list(checks)
    if duplicates is not None:
        facts.append(("unique crystals", f"{duplicates.n_window_unique} of the {duplicates.n_window} measured window "
                                         f"structures ({duplicates.settings.describe()})"))
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>graceq report</title>",
        "<style>body{font-family:sans-serif;max-width:1250px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
        "th{background:#eee}td.l{text-align:left}img{max-width:100%;border:1px solid #ddd}</style>",
        "</head><body>", "<h1>graceq campaign report</h1>", "<table>",
    ]
    parts += [f"<tr><th>{html.escape(k)}</th><td class='l'>{html.escape(v)}</td></tr>" for k, v in facts]
    parts.append("</table>")
    found = found_table(rec, duplicates.representative_of() if duplicates is not None else None)
    unique = f", {duplicates.n_window_unique} unique" if duplicates is not None else ""
    parts.append(f"<h2>Structures found within the window ({len(found)}{unique})</h2>")
    parts.append(f"<table><tr><th>name</th><th>E_ref - best ({u}/mol)</th><th>E_ff - min E_ff ({u}/mol)</th>"
                 "<th>force-field rank</th><th>density (g/cm<sup>3</sup>)</th><th>iteration sampled</th>"
                 "<th>duplicate of</th><th>known form</th></tr>")
    for r in found:
        parts.append(f"<tr><td class='l'>{html.escape(r['name'])}</td><td>{r['relative_ref']:.3f}</td>"
                     f"<td>{r['relative_ff']:.3f}</td><td>{r['ff_rank']}</td><td>{r['density']:.4f}</td>"
                     f"<td>{r['iteration']}</td><td class='l'>{html.escape(r['duplicate_of'])}</td>"
                     f"<td class='l'>{html.escape(r['known_form'])}</td></tr>")
    parts.append("</table><p>Every structure, with predictions: <code>structures.csv</code> in the campaign "
                 "directory.</p>")
    if origin is not None:
        rows, settings_text = origin
        parts.append("<h2>Provenance</h2><table id='provenance'>")
        parts += [f"<tr><th>{html.escape(k)}</th><td class='l'>{html.escape(v)}</td></tr>" for k, v in rows]
        parts.append("</table>")
        parts.append(f"<details><summary>settings.toml</summary><pre id='settings'>{html.escape(settings_text)}"
                     "</pre></details>")
    for image, caption in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(f"<img alt='{html.escape(image.name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(root: str | Path) -> list[Path]:
    """Write the PNG plots and a self-contained report.html into <campaign>/report/; returns their paths."""
    paths = CampaignPaths(root)
    rec = load_record(paths.root)
    folder = paths.reports
    folder.mkdir(parents=True, exist_ok=True)
    images = [(plot(rec, folder / name), caption) for name, plot, caption in PLOTS]
    page = folder / "report.html"
    from graceq.polymorphs import campaign_duplicates

    duplicates = campaign_duplicates(paths.root, scope="window")
    # the record already holds the prospective errors (error_law.png reads them): no second pass over the store
    settings, errors = load_settings(paths.settings), prospective_record(rec)
    sentences = (("errors' width and the force-field height", height_sentence(errors, settings)),
                 ("errors' mean and the force-field height", trend_sentence(errors, settings)))
    checks = tuple((k, v) for k, v in sentences if v)
    atomic_write_bytes(page, _html(rec, images, provenance_rows(paths.root), duplicates, checks).encode())
    page.chmod(0o644)  # a report is for sharing (the atomic write creates 0600 files)
    return [p for p, _ in images] + [page]
