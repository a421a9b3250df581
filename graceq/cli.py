"""The `graceq` command: init, run, status, report, worker, flower, demo."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path

import click

from graceq.config import ConfigError, load_settings, settings_from_dict, write_settings

QUEUE_NAMES = "featurize,fit,dft"


def _user_errors(func):
    """Turn the errors a user can act on into one clean message (no traceback)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from graceq.campaign import CampaignError
        from graceq.coordinator import TaskError
        from graceq.io import InputError

        try:
            return func(*args, **kwargs)
        except (ConfigError, InputError, TaskError, CampaignError, FileExistsError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group()
@click.version_option(package_name="graceq")
@click.option("-v", "--verbose", is_flag=True, help="log what the coordinator does")
def main(verbose: bool) -> None:
    """graceq: which CSP structures deserve a DFT re-minimisation (active learning)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def _overrides(window, unit, n_init, n_batch, budget, seed) -> dict:
    return {"campaign": {"window": window, "unit": unit, "n_init": n_init, "n_batch": n_batch,
                         "budget": budget, "seed": seed}}


_override_options = [
    click.option("--window", type=float, help="energy window per molecule, in the campaign unit"),
    click.option("--unit", help="energy unit of the pool (eV, kJ/mol, kcal/mol, ...)"),
    click.option("--n-init", type=int, help="structures in the initial batch"),
    click.option("--n-batch", type=int, help="structures per batch"),
    click.option("--budget", type=int, help="most reference calls"),
    click.option("--seed", type=int, help="random seed"),
]


def override_options(func):
    for option in reversed(_override_options):
        func = option(func)
    return func


@main.command()
@click.argument("campaign_dir", type=click.Path(file_okay=False))
@click.option("--settings", "settings_file", required=True, type=click.Path(dir_okay=False),
              help="campaign settings (TOML)")
@override_options
@_user_errors
def init(campaign_dir, settings_file, **overrides) -> None:
    """Validate the pool and settings and create a campaign directory."""
    from graceq.coordinator import init_campaign

    settings = load_settings(settings_file, _overrides(**overrides))
    store = init_campaign(settings, campaign_dir, source=settings_file)
    click.echo(f"created campaign {Path(campaign_dir).resolve()} with {store.n_structures()} structures")


@main.command()
@click.argument("campaign_dir", type=click.Path(file_okay=False))
@click.option("--settings", "settings_file", type=click.Path(dir_okay=False),
              help="create the campaign from these settings if the directory has none")
@click.option("--broker", envvar="GRACEQ_BROKER_URL", help="redis://... (default: embedded, no server)")
@click.option("--max-iterations", type=int, help="stop after this many iterations (resume later)")
@click.option("--p-conv-target", type=float, help="a new stopping target (an existing campaign goes on past its stop)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@override_options
@_user_errors
def run(campaign_dir, settings_file, broker, max_iterations, p_conv_target, quiet, **overrides) -> None:
    """Run or resume the campaign until p_conv reaches its target (or the budget/pool runs out)."""
    from graceq.coordinator import Coordinator, init_campaign
    from graceq.store import CampaignPaths

    paths = CampaignPaths(campaign_dir)
    if not paths.state.exists():
        if not settings_file:
            raise click.ClickException(f"{campaign_dir}: no campaign here; pass --settings to create one")
        changes = _overrides(**overrides)
        changes["campaign"]["p_conv_target"] = p_conv_target
        init_campaign(load_settings(settings_file, changes), campaign_dir, source=settings_file)
    elif fixed := sorted(k for k, v in overrides.items() if v is not None and k != "budget"):
        raise click.ClickException(
            f"{campaign_dir}: --{', --'.join(k.replace('_', '-') for k in fixed)} cannot change once a "
            "campaign has started (its decisions depend on them); only --p-conv-target and --budget can"
        )
    elif p_conv_target is not None or overrides.get("budget") is not None:
        # only the stopping rule may change mid-campaign: the decisions so far stay as they were
        data = load_settings(paths.settings).model_dump()
        for key, value in (("p_conv_target", p_conv_target), ("budget", overrides.get("budget"))):
            if value is not None:
                data["campaign"][key] = value
        write_settings(settings_from_dict(data, source=f"{paths.settings} with the new stopping rule"),
                       paths.settings)
    summary = Coordinator(campaign_dir, broker_url=broker or None, progress=not quiet,
                          max_iterations=max_iterations).run()
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    unit = summary["unit"]
    click.echo(
        f"\n{summary['n_reference_calls']} reference calls of {summary['n_pool']} structures "
        f"({summary['n_unstable']} unstable, {summary['n_failed']} failed); stop: {summary['stop']}; "
        f"p_conv {summary['p_conv'] if summary['p_conv'] is None else round(summary['p_conv'], 4)}\n"
        f"{len(summary['found'])} structures within {summary['window']} {unit}/molecule of the best "
        f"({summary['best']} {unit}/molecule): {', '.join(summary['found'][:12])}"
        + (" ..." if len(summary["found"]) > 12 else "")
        + f"\nsummary: {Path(summary['campaign']) / 'summary.json'}"
    )


@main.command()
@click.argument("campaign_dir", type=click.Path(exists=True, file_okay=False))
@_user_errors
def status(campaign_dir) -> None:
    """Where a campaign stands: iteration, p_conv, residual, structures sampled and running."""
    from graceq.report import status_lines

    click.echo("\n".join(status_lines(campaign_dir)))


@main.command()
@click.argument("campaign_dir", type=click.Path(exists=True, file_okay=False))
@_user_errors
def report(campaign_dir) -> None:
    """Write structures.csv, summary.json, plots and report.html into the campaign directory."""
    from graceq import report as report_module

    summary = report_module.write_summary(campaign_dir)
    written = [Path(campaign_dir) / "structures.csv", Path(campaign_dir) / "summary.json"]
    if hasattr(report_module, "write_report"):
        written += report_module.write_report(campaign_dir)
    click.echo("\n".join(str(p) for p in written))
    _print_summary(summary)


@main.command()
@click.argument("campaign_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--all", "include_all", is_flag=True, help="every pool structure, not only the window's")
@click.option("--chemiscope", is_flag=True, help="also chemiscope.json and an offline chemiscope.html of the pool")
@_user_errors
def export(campaign_dir, out_dir, include_all, chemiscope) -> None:
    """Write the window structures as CIF files and one extxyz (energies, density, space group, duplicates)."""
    from graceq.export import export_campaign

    written = export_campaign(campaign_dir, out_dir, include_all=include_all, chemiscope=chemiscope)
    n_cif = sum(1 for p in written if p.suffix == ".cif")
    click.echo(f"{n_cif} CIF files in {Path(out_dir) / 'cif'}")
    click.echo("\n".join(str(p) for p in written if p.suffix != ".cif"))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--queues", "-Q", default=QUEUE_NAMES, show_default=True, help="queues this pool consumes")
@click.option("--concurrency", "-c", type=int, default=None, help="processes (default: cores)")
@click.option("--name", "-n", default=None, help="worker name (default: graceq-<queues>@host)")
@click.option("--broker", envvar="GRACEQ_BROKER_URL", required=True, help="redis://... (GRACEQ_BROKER_URL)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queues, concurrency, name, broker, loglevel, celery_args) -> None:
    """Start a worker pool that joins every campaign on the broker (any node)."""
    from graceq.coordinator import worker_command

    concurrency = concurrency or os.cpu_count() or 1
    name = name or f"graceq-{queues.replace(',', '-')}-{os.getpid()}@%h"
    os.environ["GRACEQ_BROKER_URL"] = broker
    cmd = worker_command(queues, concurrency, name, loglevel) + list(celery_args)
    os.execv(cmd[0], cmd)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--broker", envvar="GRACEQ_BROKER_URL", required=True, help="redis://... (GRACEQ_BROKER_URL)")
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="listen address")
@click.option("--persistent-db", type=click.Path(dir_okay=False), default=None,
              help="keep task history in this file (Flower --persistent)")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(broker, port, address, persistent_db, flower_args) -> None:
    """Start Flower on the graceq app. Basic auth from GRACEQ_FLOWER_BASIC_AUTH=user:password."""
    os.environ["GRACEQ_BROKER_URL"] = broker
    cmd = [sys.executable, "-m", "celery", "-A", "graceq.app", "flower", f"--port={port}", f"--address={address}"]
    auth = os.environ.get("GRACEQ_FLOWER_BASIC_AUTH")
    if auth:
        os.environ["FLOWER_BASIC_AUTH"] = auth  # from the environment: never on the command line
    elif address not in ("127.0.0.1", "localhost", "::1"):
        raise click.ClickException(
            f"Flower would listen on {address} without authentication: set GRACEQ_FLOWER_BASIC_AUTH=user:password"
        )
    if persistent_db:
        cmd += ["--persistent=True", f"--db={persistent_db}"]
    cmd += list(flower_args)
    os.execv(cmd[0], cmd)


@main.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False))
def relax(job_dir) -> None:
    """Relax one `slurm` engine job directory with its ase engine; writes JOB_DIR/result.json.

    What the batch script of the `slurm` engine runs inside the allocation.
    """
    from graceq.engines.slurm import SlurmError, relax_job

    try:
        result = relax_job(job_dir)
    except SlurmError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{result.name}: {result.status}, energy {result.energy}, {result.n_steps} steps"
               + (f" ({result.message})" if result.message else ""))


DEMO_SETTINGS = {
    "campaign": {"pool": "roy264.extxyz", "unit": "kJ/mol", "window": 5.0, "n_init": 20, "n_batch": 10,
                 "p_conv_target": 0.99, "seed": 0},
    "engine": {"engine": "replay"},
}


def demo_settings(folder: Path):
    """Settings of the bundled ROY-264 replay demo, with the pool copied into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = files("graceq") / "data" / "roy264"
    for name in ("roy264.extxyz", "README.md"):
        with (data / name).open("rb") as src, open(folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    settings = settings_from_dict(json.loads(json.dumps(DEMO_SETTINGS)))
    settings.campaign.pool = str((folder / "roy264.extxyz").resolve())
    return settings


@main.command()
@click.argument("campaign_dir", type=click.Path(file_okay=False), default="graceq-demo")
@click.option("--fresh", is_flag=True, help="delete an earlier demo campaign in that directory first")
@click.option("--broker", envvar="GRACEQ_BROKER_URL", help="redis://... (default: embedded, no server)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@_user_errors
def demo(campaign_dir, fresh, broker, quiet) -> None:
    """A complete replay campaign on the bundled ROY-264 landscape (Beran et al. 2022)."""
    from graceq.coordinator import Coordinator, init_campaign
    from graceq.store import CampaignPaths

    root = Path(campaign_dir)
    if fresh and root.exists():
        shutil.rmtree(root)
    if not CampaignPaths(root).state.exists():
        settings = demo_settings(root / "input")
        write_settings(settings, root / "input" / "settings.toml")
        init_campaign(settings, root)
        click.echo(f"ROY-264 demo: 264 structures, window 5 kJ/mol per molecule, replay engine -> {root}")
    summary = Coordinator(root, broker_url=broker or None, progress=not quiet).run()
    from graceq import report as report_module

    if hasattr(report_module, "write_report"):
        report_module.write_report(root)
    _print_summary(summary)


if __name__ == "__main__":  # pragma: no cover
    main()
