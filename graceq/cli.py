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
        from graceq.pool import InputError
        from graceq.lock import CampaignLocked, LeaseLost

        try:
            return func(*args, **kwargs)
        except (ConfigError, InputError, TaskError, CampaignError, FileExistsError, FileNotFoundError,
                CampaignLocked, LeaseLost) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # e.g. a campaign directory below a regular file, no permission
            raise click.ClickException(
                f"{exc.filename or ''}: {exc.strerror or exc} (check that every folder of this path is a "
                "directory you can write to)") from None

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


def broker_options(func):
    """--broker URL / --broker-file PATH: where the broker URL (with its password) comes from."""
    func = click.option("--broker-file", envvar="GRACEQ_BROKER_FILE", type=click.Path(dir_okay=False),
                        help="read the broker URL from the first line of this file (mode 600; GRACEQ_BROKER_FILE)")(func)
    return click.option("--broker", envvar="GRACEQ_BROKER_URL",
                        help="redis://... or rediss://...; better from GRACEQ_BROKER_URL or --broker-file, "
                             "since a command line is visible to every user (ps)")(func)


def _has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


def broker_url(broker: str | None, broker_file: str | None, required: bool = False,
               hide: bool = False) -> str | None:
    """The broker URL from --broker, --broker-file or the environment, never echoed.

    First --broker-file on the command line, then --broker (command line, then GRACEQ_BROKER_URL),
    then GRACEQ_BROKER_FILE. A URL with a password given on the command line is warned about; with
    ``hide``, a long-running command then re-executes itself with the URL in its environment
    instead, so that `ps` does not show the password for the whole run.
    """
    ctx = click.get_current_context()
    from click.core import ParameterSource

    on_line = ctx.get_parameter_source("broker") == ParameterSource.COMMANDLINE
    file_on_line = ctx.get_parameter_source("broker_file") == ParameterSource.COMMANDLINE
    url = broker
    if broker_file and (file_on_line or not broker):
        path = Path(broker_file).expanduser()
        try:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise click.ClickException(f"--broker-file {path}: cannot read it ({exc})") from None
        if not lines:
            raise click.ClickException(f"--broker-file {path}: the file is empty; write the broker URL on its first line")
        if path.stat().st_mode & 0o077:
            click.echo(f"warning: {path} holds the broker URL and is readable by other users; chmod 600 {path}",
                       err=True)
        url, on_line = lines[0], False
    if required and not url:
        raise click.ClickException("no broker: pass --broker-file PATH or set GRACEQ_BROKER_URL (redis://...)")
    if url and on_line and _has_password(url):
        click.echo("warning: the broker password on the command line is visible to every user of this machine "
                   "(ps); use --broker-file PATH (mode 600) or GRACEQ_BROKER_URL", err=True)
        if hide:
            _reexec_without_broker(url)
    return url or None


def _reexec_without_broker(url: str) -> None:
    """Run this same command again with the broker URL in the environment instead of argv."""
    rest, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--broker":
            skip = True
        elif not arg.startswith("--broker="):
            rest.append(arg)
    if len(rest) == len(sys.argv) - 1:  # not this process's own command line (called from Python)
        return
    os.environ["GRACEQ_BROKER_URL"] = url
    os.execv(sys.executable, [sys.executable, "-m", "graceq.cli", *rest])


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
@broker_options
@click.option("--max-iterations", type=int,
              help="stop after this many iterations (resume later); in async mode an iteration is "
                   "`refit_every` decisions (one refit of the committee), after which the run sends nothing "
                   "more, waits for the jobs in flight and records them")
@click.option("--risk", type=float, help="a new stated risk to stop at (lower: an existing campaign goes on past its stop)")
@click.option("--p-conv-target", type=float, help='a new p_conv target (stop_rule "p_conv"; an existing campaign goes on)')
@click.option("--quiet", is_flag=True, help="no progress bars (the per-iteration lines stay)")
@override_options
@_user_errors
def run(campaign_dir, settings_file, broker, broker_file, max_iterations, risk, p_conv_target, quiet,
        **overrides) -> None:
    """Run or resume the campaign until its stopping rule holds (or the budget/pool runs out)."""
    from graceq.coordinator import Coordinator, init_campaign
    from graceq.store import CampaignPaths

    broker = broker_url(broker, broker_file, hide=True)

    paths = CampaignPaths(campaign_dir)
    if not paths.state.exists():
        if not settings_file:
            raise click.ClickException(f"{campaign_dir}: no campaign here; pass --settings to create one")
        changes = _overrides(**overrides)
        changes["campaign"].update(p_conv_target=p_conv_target, risk=risk)
        init_campaign(load_settings(settings_file, changes), campaign_dir, source=settings_file)
    elif fixed := sorted(k for k, v in overrides.items() if v is not None and k not in ("budget", "n_init")):
        raise click.ClickException(
            f"{campaign_dir}: --{', --'.join(k.replace('_', '-') for k in fixed)} cannot change once a "
            "campaign has started (its decisions depend on them); only --risk, --p-conv-target, --budget and "
            "(before the first fit) a larger --n-init can"
        )
    elif (risk is not None or p_conv_target is not None or overrides.get("budget") is not None
          or overrides.get("n_init") is not None):
        # only the stopping rule may change mid-campaign: the decisions so far stay as they were
        data = load_settings(paths.settings).model_dump()
        if overrides.get("n_init") is not None:
            _check_raised_n_init(paths, data["campaign"]["n_init"], overrides["n_init"])
        for key, value in (("risk", risk), ("p_conv_target", p_conv_target), ("budget", overrides.get("budget")),
                           ("n_init", overrides.get("n_init"))):
            if value is not None:
                data["campaign"][key] = value
        write_settings(settings_from_dict(data, source=f"{paths.settings} with the new stopping rule"),
                       paths.settings)
    summary = Coordinator(campaign_dir, broker_url=broker or None, progress=not quiet,
                          max_iterations=max_iterations).run()
    _print_summary(summary)


def _check_raised_n_init(paths, old: int, new: int) -> None:
    """A larger n_init is allowed until the first batch was fitted (its extra picks join that batch)."""
    from graceq.config import load_settings as _load
    from graceq.pool import check_pool_fits_settings
    from graceq.store import CampaignStore

    store = CampaignStore(paths.root)
    try:
        decided = store.iterations()
        n_pool = store.n_structures()
    finally:
        store.close()
    if new < old:
        raise click.ClickException(f"{paths.root}: --n-init {new} is smaller than the campaign's n_init {old}; "
                                   "structures already picked stay picked, so n_init can only be raised")
    if decided:
        raise click.ClickException(
            f"{paths.root}: --n-init cannot change any more: the committee was fitted on the initial batch "
            f"and iteration {decided[-1]['iteration']} decided on it (only --p-conv-target and --budget can change)")
    settings = _load(paths.settings)
    settings.campaign.n_init = new
    check_pool_fits_settings(n_pool, settings, f"--n-init {new}")


def _print_summary(summary: dict) -> None:
    unit = summary["unit"]
    if not summary["iterations"]:
        click.echo(f"\n{summary['n_reference_calls']} reference calls of {summary['n_pool']} structures so far; "
                   "no iteration has finished yet, so there is no best energy, p_conv or window yet "
                   f"(`graceq run {summary['campaign']}` goes on)")
        return
    click.echo(
        f"\n{summary['n_reference_calls']} reference calls of {summary['n_pool']} structures "
        f"({summary['n_unstable']} unstable, {summary['n_failed']} failed); stop: {summary['stop']}; "
        f"p_conv {summary['p_conv'] if summary['p_conv'] is None else round(summary['p_conv'], 4)}\n"
        + (f"stated risk: {summary['risk_statement']}\n" if summary.get("risk_statement") else "")
        + (f"{summary['recall_note']}\n" if summary.get("recall_note") else "")
        + f"{len(summary['found'])} structures within {summary['window']} {unit}/molecule of the best "
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
@click.option("--state", type=click.Choice(["waiting", "queued", "running", "submitted", "converged", "unstable",
                                            "failed"]), help="only the jobs in this state")
@_user_errors
def jobs(campaign_dir, state) -> None:
    """Each reference job: state, attempts, worker host, start, run time, outcome, log (read-only)."""
    from graceq.jobs import job_lines, job_table

    table = [j for j in job_table(campaign_dir) if state is None or j.state == state]
    if not table:
        click.echo(f"no reference job{' in state ' + state if state else ''} yet")
        return
    click.echo("\n".join(job_lines(table)))


@main.command()
@click.argument("campaign_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("names", nargs=-1)
@click.option("--failed", is_flag=True, help="every failed job")
@_user_errors
def retry(campaign_dir, names, failed) -> None:
    """Send failed reference jobs again at the next `graceq run` (the decisions taken stay as they were)."""
    from graceq.jobs import RetryError, retry as retry_jobs

    try:
        done = retry_jobs(campaign_dir, list(names), failed=failed)
    except RetryError as exc:
        raise click.ClickException(str(exc)) from None
    if not done:
        click.echo("no failed job to send again")
        return
    click.echo(f"{len(done)} job{'s' if len(done) > 1 else ''} will be sent again by the next "
               f"`graceq run {campaign_dir}`: {', '.join(done)}")


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
@broker_options
@click.option("--campaign-root", "campaign_roots", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="serve only campaigns under this folder (repeatable; GRACEQ_CAMPAIGN_ROOTS, os.pathsep-separated)")
@click.option("--allow-code", is_flag=True, envvar="GRACEQ_ALLOW_SETTINGS_CODE",
              help="let settings files name code (module:Class engines and calculators, programs): every "
                   "campaign author can then run code as this worker's user")
@click.option("--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queues, concurrency, name, broker, broker_file, campaign_roots, allow_code, loglevel, celery_args) -> None:
    """Start a worker pool that joins every campaign on the broker (any node).

    The worker serves campaigns under its --campaign-root folders only (all, when none is given)
    and refuses settings files that name code unless --allow-code (README, "Security model").
    """
    from graceq.coordinator import worker_command

    url = broker_url(broker, broker_file, required=True)
    concurrency = concurrency or os.cpu_count() or 1
    name = name or f"graceq-{queues.replace(',', '-')}-{os.getpid()}@%h"
    os.environ["GRACEQ_BROKER_URL"] = url  # the celery command line carries no URL: `ps` shows no password
    os.environ.pop("GRACEQ_EMBEDDED_DIR", None)
    if campaign_roots:
        os.environ["GRACEQ_CAMPAIGN_ROOTS"] = os.pathsep.join(str(Path(r).resolve()) for r in campaign_roots)
    os.environ["GRACEQ_ALLOW_SETTINGS_CODE"] = "1" if allow_code else "0"
    cmd = worker_command(queues, concurrency, name, loglevel) + list(celery_args)
    os.execv(cmd[0], cmd)


#: Flower options that graceq sets itself, or that would put a secret on the command line
_FLOWER_OWN = {"address": "--address", "port": "--port", "basic-auth": "GRACEQ_FLOWER_BASIC_AUTH",
               "broker": "--broker-file or GRACEQ_BROKER_URL", "broker-api": "nothing (it holds a password; graceq's brokers need no broker API)"}


def _local_address(address: str) -> bool:
    import ipaddress

    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


@main.command(context_settings={"ignore_unknown_options": True})
@broker_options
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="listen address")
@click.option("--persistent-db", type=click.Path(dir_okay=False), default=None,
              help="keep task history in this file (Flower --persistent)")
@click.option("--metrics-public", is_flag=True, help="serve /metrics without authentication (Prometheus scrapers)")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(broker, broker_file, port, address, persistent_db, metrics_public, flower_args) -> None:
    """Start Flower on the graceq app. Basic auth from GRACEQ_FLOWER_BASIC_AUTH=user:password.

    Without basic auth Flower listens on the loopback interface only; /metrics asks for the same
    authentication as the rest unless --metrics-public. Flower gets no message-signing key: tasks
    sent from its API are refused by workers that require signatures.
    """
    for arg in flower_args:
        option = arg.lstrip("-").partition("=")[0].replace("_", "-").lower()
        if arg.startswith("-") and option in _FLOWER_OWN:
            raise click.ClickException(
                f"graceq flower: pass {option} as {_FLOWER_OWN[option]}, not to Flower directly ({arg.partition('=')[0]})"
            )
    os.environ["GRACEQ_BROKER_URL"] = broker_url(broker, broker_file, required=True)
    for secret in ("GRACEQ_SIGNING_KEY", "GRACEQ_SIGNING_KEY_FILE"):
        os.environ.pop(secret, None)
    os.environ.pop("FLOWER_ADDRESS", None)
    auth = os.environ.get("GRACEQ_FLOWER_BASIC_AUTH")
    if auth:
        os.environ["FLOWER_BASIC_AUTH"] = auth  # from the environment: never on the command line
    elif os.environ.get("FLOWER_BASIC_AUTH"):
        pass
    elif not _local_address(address):
        raise click.ClickException(
            f"Flower would listen on {address or 'every address'} without authentication: "
            "set GRACEQ_FLOWER_BASIC_AUTH=user:password"
        )
    args = [f"--port={port}", f"--address={address}"]
    if persistent_db:
        args += ["--persistent=True", f"--db={persistent_db}"]
    args += list(flower_args)
    cmd = [sys.executable, "-c", "import sys; from graceq.trust import run_flower; "
           f"run_flower(sys.argv[1:], metrics_public={bool(metrics_public)})", *args]
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
                 "seed": 0},
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
def settings() -> None:
    """Print every setting (section, key, type, default, meaning) as markdown tables."""
    from graceq.settings_doc import settings_markdown

    click.echo(settings_markdown(), nl=False)


def _stopped(root: Path) -> str | None:
    """The stop reason of a campaign's newest iteration, or None while it goes on."""
    from graceq.store import CampaignStore

    store = CampaignStore(root)
    try:
        iterations = store.iterations()
    finally:
        store.close()
    return iterations[-1].get("stop") if iterations else None


@main.command()
@click.argument("campaign_dir", type=click.Path(file_okay=False), default="graceq-demo")
@click.option("--fresh", is_flag=True, help="delete an earlier demo campaign in that directory first")
@broker_options
@click.option("--quiet", is_flag=True, help="no progress bars (the per-iteration lines stay)")
@_user_errors
def demo(campaign_dir, fresh, broker, broker_file, quiet) -> None:
    """A complete replay campaign on the bundled ROY-264 landscape (Beran et al. 2022)."""
    from graceq.coordinator import Coordinator, init_campaign
    from graceq.store import CampaignPaths

    broker = broker_url(broker, broker_file, hide=True)

    root = Path(campaign_dir)
    if fresh and root.exists():
        shutil.rmtree(root)
    if not CampaignPaths(root).state.exists():
        settings = demo_settings(root / "input")
        write_settings(settings, root / "input" / "settings.toml")
        init_campaign(settings, root)
        click.echo(f"ROY-264 demo: 264 structures, window 5 kJ/mol per molecule, replay engine -> {root}")
    elif (stop := _stopped(root)) is not None:
        click.echo(f"{root}: this demo campaign finished earlier (stop: {stop}); reprinting its result. "
                   f"`graceq demo --fresh` starts afresh.")
    else:
        click.echo(f"{root}: resuming the earlier demo campaign (`graceq demo --fresh` starts afresh)")
    summary = Coordinator(root, broker_url=broker or None, progress=not quiet).run()
    from graceq import report as report_module

    if hasattr(report_module, "write_report"):
        report_module.write_report(root)
    _print_summary(summary)


if __name__ == "__main__":  # pragma: no cover
    main()
