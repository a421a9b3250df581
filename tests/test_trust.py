"""graceq.trust and the registry, as functions: what a worker may import, which messages and which
result files count. The end-to-end attack through real processes is in test_security_e2e.py."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import GRACEQ, bundled, run_cli, write_subset

from graceq import trust
from graceq.engines import check_engine_settings, engine_class, make_engine
from graceq.engines.ase_relax import check_calculator_parameters, resolve_calculator
from graceq.trust import CodeNotAllowed, UntrustedMessage


# -- the operator's switch ---------------------------------------------------------------------
@pytest.mark.parametrize("value, worker, embedded, expected", [
    ("1", True, False, True), ("true", True, False, True), ("0", False, False, False),
    ("", True, False, False),  # a broker worker: off unless allowed
    ("", False, False, True),  # graceq init/run, scripts: the author's own settings
    ("", True, True, True),  # an embedded worker of the author's own campaign
    ("0", True, True, False),
])
def test_settings_code_allowed(monkeypatch, value, worker, embedded, expected):
    monkeypatch.setenv(trust.ENV_ALLOW_CODE, value)
    monkeypatch.setitem(trust._role, "worker", worker)
    monkeypatch.delenv("GRACEQ_BROKER_URL", raising=False)
    if embedded:
        monkeypatch.setenv("GRACEQ_EMBEDDED_DIR", "/tmp/some-campaign/broker")
    else:
        monkeypatch.delenv("GRACEQ_EMBEDDED_DIR", raising=False)
    assert trust.settings_code_allowed() is expected


# -- the registry ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["subprocess.Popen", "subprocess:Popen", "os.system", "builtins:eval",
                                  "ase.calculators.calculator.subprocess", "ase.calculators.calculator:subprocess"])
def test_a_settings_file_cannot_name_code_when_it_is_off(spec):
    with pytest.raises(CodeNotAllowed, match="may not name code"):
        resolve_calculator(spec, allow_code=False)
    with pytest.raises(CodeNotAllowed):
        check_engine_settings({"engine": "ase", "calculator": spec}, allow_code=False)


def test_code_is_refused_before_anything_is_imported():
    name = "graceq_trust_probe_module_never_imported"
    with pytest.raises(CodeNotAllowed):
        resolve_calculator(f"{name}.Calc", allow_code=False)
    with pytest.raises(CodeNotAllowed):
        engine_class(f"{name}:Engine", allow_code=False)
    assert name not in sys.modules
    # with code allowed the same path is imported (and missing here)
    with pytest.raises(ValueError, match="needs the Python package"):
        resolve_calculator(f"{name}.Calc", allow_code=True)


def test_registered_calculators_need_no_permission():
    from ase.calculators.emt import EMT
    from ase.calculators.lj import LennardJones

    assert resolve_calculator("emt", allow_code=False) is EMT
    assert resolve_calculator("ase.calculators.lj.LennardJones", allow_code=False) is LennardJones
    assert resolve_calculator("ase.calculators.lj:LennardJones", allow_code=False) is LennardJones
    assert resolve_calculator("subprocess.Popen", allow_code=True) is subprocess.Popen
    assert engine_class("replay", allow_code=False).__name__ == "ReplayEngine"
    with pytest.raises(CodeNotAllowed):
        engine_class("graceq.engines.replay:ReplayEngine", allow_code=False)
    assert engine_class("graceq.engines.replay:ReplayEngine", allow_code=True).__name__ == "ReplayEngine"


@pytest.mark.parametrize("params", [{"command": "touch /tmp/x"}, {"directory": "/home/op"}, {"label": "/etc/x"},
                                    {"profile": "x"}, {"txt": "/tmp/log"}, {"mpi_command": "mpirun"},
                                    {"Command": "x"}])
def test_calculator_parameters_that_name_programs_or_paths(params):
    with pytest.raises(CodeNotAllowed, match="calculator_parameters"):
        check_calculator_parameters(params, allow_code=False)
    check_calculator_parameters(params, allow_code=True)
    check_calculator_parameters({"xc": "PBE", "encut": 520, "kpts": [2, 2, 2]}, allow_code=False)


def test_make_engine_obeys_the_policy_of_its_process(monkeypatch):
    settings = {"engine": "ase", "calculator": "emt", "calculator_parameters": {"command": "touch /tmp/x"}}
    monkeypatch.setenv(trust.ENV_ALLOW_CODE, "0")
    with pytest.raises(CodeNotAllowed):
        make_engine(settings, "eV")
    monkeypatch.setenv(trust.ENV_ALLOW_CODE, "1")
    assert make_engine(settings, "eV").calculator_parameters == {"command": "touch /tmp/x"}


@pytest.mark.parametrize("slurm", [{"setup": ["curl evil | sh"]}, {"command": "bash -c id"},
                                   {"sbatch_args": ["--wrap=id"]}, {"sbatch": "/tmp/evil"},
                                   {"partition": "x\nid"}, {"mem": "4G; id"}])
def test_the_slurm_engines_shell_lines_are_code(slurm):
    settings = {"engine": "slurm", "calculator": "gfnff", "slurm": slurm}
    with pytest.raises(CodeNotAllowed):
        check_engine_settings(settings, allow_code=False)
    check_engine_settings(settings, allow_code=True)
    check_engine_settings({"engine": "slurm", "calculator": "gfnff",
                           "slurm": {"partition": "standard", "time": "08:00:00", "mem": "200G",
                                     "account": "my-project", "command": "graceq relax"}}, allow_code=False)


def _fake_package(site: Path) -> Path:
    """An installed distribution (a .dist-info with entry points) declaring a calculator and an engine."""
    pkg = site / "graceq_test_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from ase.calculators.lj import LennardJones\n"
        "from graceq.engines.replay import ReplayEngine\n"
        "class PluginLJ(LennardJones):\n    pass\n"
        "class PluginReplay(ReplayEngine):\n    name = 'plugin-replay'\n"
    )
    info = site / "graceq_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: graceq-test-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[graceq.calculators]\nplugin-lj = graceq_test_plugin:PluginLJ\n\n"
        "[graceq.engines]\nplugin-replay = graceq_test_plugin:PluginReplay\n"
    )
    return site


def test_entry_points_of_installed_packages_are_registered(tmp_path):
    site = _fake_package(tmp_path / "site")
    code = (
        "from graceq.engines import engine_class\n"
        "from graceq.engines.ase_relax import resolve_calculator\n"
        "print(resolve_calculator('plugin-lj', allow_code=False).__name__)\n"
        "print(engine_class('plugin-replay', allow_code=False).__name__)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PluginLJ", "PluginReplay"]
    # without the package, the same names are unknown (not imported as paths)
    with pytest.raises(ValueError, match="unknown"):
        resolve_calculator("plugin-lj", allow_code=False)
    with pytest.raises(ValueError, match="unknown reference engine"):
        engine_class("plugin-replay", allow_code=False)


def test_registered_entry_points_are_read_again_when_a_package_comes_or_goes(tmp_path, monkeypatch):
    import shutil

    from graceq.engines import ENGINE_GROUP, registered

    site = _fake_package(tmp_path / "site")
    assert "plugin-replay" not in registered(ENGINE_GROUP)
    assert registered(ENGINE_GROUP) == registered(ENGINE_GROUP)  # kept while nothing changed
    monkeypatch.syspath_prepend(str(site))  # a folder more on the import path
    assert "plugin-replay" in registered(ENGINE_GROUP)
    shutil.rmtree(site / "graceq_test_plugin-1.0.dist-info")  # uninstalled: the folder changed
    os.utime(site, ns=(0, os.stat(site).st_mtime_ns + 10**9))  # (a clock tick apart, whatever the clock)
    assert "plugin-replay" not in registered(ENGINE_GROUP)


# -- messages -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("campaigns")
    pool = write_subset(bundled("roy264", "roy264.extxyz"), folder / "roy12.extxyz", 22)
    (folder / "settings.toml").write_text(f'[campaign]\npool = "{pool}"\nunit = "kJ/mol"\nn_init = 8\n')
    run_cli("init", str(folder / "camp"), "--settings", str(folder / "settings.toml"))
    return folder / "camp"


def test_check_campaign_dir(campaign, tmp_path):
    root = campaign.parent
    assert trust.check_campaign_dir(str(campaign), [root]) == campaign.resolve()
    assert trust.check_campaign_dir(str(campaign), []) == campaign.resolve()  # no roots: any campaign
    with pytest.raises(UntrustedMessage, match="outside this worker's campaign roots"):
        trust.check_campaign_dir(str(campaign), [tmp_path])
    with pytest.raises(UntrustedMessage, match="outside"):
        trust.check_campaign_dir(f"{tmp_path}/{os.path.relpath(campaign, tmp_path)}", [tmp_path])
    link = tmp_path / "link"
    link.symlink_to(campaign)
    with pytest.raises(UntrustedMessage, match="outside"):  # a link into a root is judged by its target
        trust.check_campaign_dir(str(link), [tmp_path])
    with pytest.raises(UntrustedMessage, match="not a graceq campaign"):
        trust.check_campaign_dir(str(tmp_path), [tmp_path])
    with pytest.raises(UntrustedMessage, match="not a directory"):
        trust.check_campaign_dir(str(tmp_path / "nothing"), [])
    for bad in (None, 3, ["/"], ""):
        with pytest.raises(UntrustedMessage):
            trust.check_campaign_dir(bad, [])


def test_a_results_folder_that_leads_out_of_the_campaign_is_refused(campaign, tmp_path):
    copy = tmp_path / "camp"
    copy.mkdir()
    for name in ("pool.json", "settings.toml", "structures.db"):
        (copy / name).write_bytes((campaign / name).read_bytes())
    (copy / "results").symlink_to(tmp_path)
    with pytest.raises(UntrustedMessage, match="results/ is a link"):
        trust.check_campaign_dir(str(copy), [tmp_path])


def test_a_replay_source_outside_the_campaign_roots_is_refused(campaign, tmp_path):
    """A worker with campaign roots reads no file outside them for a campaign: not the pool file
    the replay engine falls back to, not a `source` naming another user's data."""
    from graceq.config import load_settings

    settings = load_settings(campaign / "settings.toml")
    trust.check_files_read(campaign, settings, [campaign.parent])   # the pool lies beside the campaign
    trust.check_files_read(campaign, settings, [])                  # no roots: nothing checked
    with pytest.raises(UntrustedMessage, match="would read .*roy12.extxyz, outside"):
        trust.check_files_read(campaign, settings, [campaign])
    copy = tmp_path / "camp"
    copy.mkdir()
    for name in ("pool.json", "structures.db"):
        (copy / name).write_bytes((campaign / name).read_bytes())
    secret = tmp_path.parent / f"{tmp_path.name}-elsewhere" / "answers.csv"
    secret.parent.mkdir()
    secret.write_text("name,energy_ref\n")
    text = (campaign.parent / "settings.toml").read_text()   # the author's settings, without [engine]
    (copy / "settings.toml").write_text(text + f'\n[engine]\nengine = "replay"\nsource = "{secret}"\n')
    with pytest.raises(UntrustedMessage, match="answers.csv, outside this worker's campaign roots"):
        trust.check_files_read(copy, load_settings(copy / "settings.toml"), [tmp_path])
    inside = tmp_path / "answers.csv"
    inside.write_text("name,energy_ref\n")
    (copy / "settings.toml").write_text(text + f'\n[engine]\nengine = "replay"\nsource = "{inside}"\n')
    trust.check_files_read(copy, load_settings(copy / "settings.toml"), [tmp_path])


def test_every_task_is_checked_and_names_its_campaign_dir():
    """The worker's checks go by argument name: a task whose campaign folder is not called
    `campaign_dir` would run unchecked. Also: every graceq task has the checking base class."""
    import inspect

    from graceq.app import app

    app.loader.import_default_modules()
    tasks = {name: task for name, task in app.tasks.items() if name.startswith("graceq.")}
    assert "graceq.run_reference" in tasks
    for name, task in tasks.items():
        assert isinstance(task, trust.CheckedTask), name
        if name != "graceq.noop":
            assert "campaign_dir" in inspect.signature(task.run).parameters, name


def _args(campaign, **kw):
    return {"campaign_dir": str(campaign), **kw}


def test_check_arguments(campaign):
    root = [campaign.parent]
    name0 = trust.pool_name(campaign, 0)
    trust.check_arguments("graceq.run_reference", _args(campaign, idx=0, name=name0), root)
    trust.check_arguments("graceq.run_reference", _args(campaign, idx=11, name=trust.pool_name(campaign, 11)), root)
    trust.check_arguments("graceq.select_lambda", _args(campaign, iteration=0), root)
    trust.check_arguments("graceq.fit_members", _args(campaign, iteration=3, start=0, stop=64, alpha=1e-3), root)
    trust.check_arguments("graceq.featurize", _args(campaign, chunk=0, start=0, stop=12), root)
    trust.check_arguments("graceq.fit_projection", _args(campaign, sample=[0, 5, 11], species=[1, 6, 7, 8, 16]), root)
    trust.check_arguments("graceq.noop", {"value": -1}, root)  # no campaign: nothing to check
    bad = {
        "idx must be >= 0": _args(campaign, idx=-1, name=name0),
        "out of range": _args(campaign, idx=12, name=name0),
        "idx must be an integer": _args(campaign, idx="0", name=name0),
        "must be an integer, got True": _args(campaign, idx=True, name=name0),
        "is named": _args(campaign, idx=1, name=name0),
        "iteration must be >= 0": _args(campaign, iteration=-5),
        "iteration 13 is out of range": _args(campaign, iteration=13),
        "start 5 must be < stop 5": _args(campaign, chunk=0, start=5, stop=5),
        "past the pool": _args(campaign, chunk=0, start=0, stop=13),
        "sample index": _args(campaign, sample=[0, 99], species=[6]),
        "atomic number": _args(campaign, sample=[0], species=[6, 200]),
        "alpha": _args(campaign, iteration=0, start=0, stop=8, alpha=float("nan")),
    }
    for match, arguments in bad.items():
        task = "graceq.featurize" if "chunk" in arguments else "graceq.run_reference"
        with pytest.raises(UntrustedMessage, match=match):
            trust.check_arguments(task, arguments, root)


# -- results ----------------------------------------------------------------------------------
def _record(numbers=(6, 6, 1), **changes):
    rec = {"name": "s1", "status": "converged", "energy": -12.5, "n_steps": 7, "message": "", "idx": 4,
           "task_id": "graceq-abc-it0001-dft-000004", "host": "node1",
           "atoms": {"numbers": list(numbers), "positions": [[0, 0, 0], [1.4, 0, 0], [0, 1.1, 0]],
                     "cell": [[5, 0, 0], [0, 5, 0], [0, 0, 5]], "pbc": [True, True, True]}}
    rec.update(changes)
    return rec


def test_check_result_accepts_what_was_sent():
    tid = "graceq-abc-it0001-dft-000004"
    assert trust.check_result(_record(), "s1", tid, [6, 1, 6], expected_idx=4) is None  # any atom order
    assert trust.check_result(_record(atoms=None), "s1", tid, [6, 6, 1]) is None
    assert trust.check_result(_record(status="failed", energy=None, atoms=None), "s1", tid) is None
    assert trust.check_result(_record(status="unstable", energy=None), "s1", tid, [6, 6, 1]) is None
    assert trust.check_result(_record(task_id=None), "s1", None, [6, 6, 1]) is None  # the coordinator's own record
    # a real engine's record passes as written
    from ase.build import bulk

    from graceq.engines import ReferenceResult

    atoms = bulk("Cu", cubic=True)
    real = dict(ReferenceResult("cu", "converged", -3.2, atoms, n_steps=3).to_json(), idx=0, task_id="t")
    assert trust.check_result(json.loads(json.dumps(real)), "cu", "t", atoms.numbers, expected_idx=0) is None


@pytest.mark.parametrize("changes, expected_name, numbers, reason", [
    ({"name": "s2"}, "s1", None, "structure name 's2' is not the one sent"),
    ({"task_id": "graceq-abc-it0001-dft-000005"}, "s1", None, "task id"),
    ({"task_id": None}, "s1", None, "task id None"),
    ({"idx": 5}, "s1", None, "pool index 5"),
    ({"status": "ok"}, "s1", None, "unknown status 'ok'"),
    ({"status": None}, "s1", None, "unknown status None"),
    ({"energy": None}, "s1", None, "needs a finite energy"),
    ({"energy": float("nan")}, "s1", None, "finite energy"),
    ({"energy": float("inf")}, "s1", None, "finite energy"),
    ({"energy": "-12.5"}, "s1", None, "finite energy"),
    ({"energy": True}, "s1", None, "finite energy"),
    ({"status": "failed"}, "s1", None, "must carry no energy"),
    ({"n_steps": -1}, "s1", None, "n_steps"),
    ({"n_steps": 1.5}, "s1", None, "n_steps"),
    ({"message": ["x"]}, "s1", None, "message"),
    ({"atoms": "CCH"}, "s1", None, "atoms must be an object"),
    ({"atoms": {"numbers": []}}, "s1", None, "non-empty list"),
    ({}, "s1", [6, 6, 8], "another composition"),
    ({}, "s1", [6, 6, 1, 1], "another composition"),
])
def test_check_result_refuses(changes, expected_name, numbers, reason):
    got = trust.check_result(_record(**changes), expected_name, "graceq-abc-it0001-dft-000004", numbers,
                             expected_idx=4)
    assert got is not None and reason in got, got


@pytest.mark.parametrize("atoms_changes, reason", [
    ({"positions": [[0, 0, 0], [1, 0, 0]]}, "positions"),
    ({"positions": [[0, 0, 0], [1, 0, 0], [0, math.nan, 0]]}, "positions"),
    ({"positions": None}, "positions"),
    ({"positions": [[0, 0, 0], [1, 0], [0, 1, 0]]}, "positions"),
    ({"cell": [[5, 0, 0], [0, 5, 0]]}, "cell"),
    ({"cell": [[5, 0, 0], [0, 5, 0], [0, 0, math.inf]]}, "cell"),
    ({"cell": [[5, 0, 0], [0, 5, 0], [5, 5, 0]]}, "zero volume"),
    ({"cell": "big"}, "cell"),
    ({"pbc": [True, True]}, "pbc"),
    ({"numbers": [6, "6", 1]}, "numbers"),
])
def test_check_result_refuses_a_broken_structure(atoms_changes, reason):
    rec = _record()
    rec["atoms"].update(atoms_changes)
    got = trust.check_result(rec, "s1", None, None)
    assert got is not None and reason in got, got


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"), (b"  \n", "empty file"), (b'{"name": "s1", "status": "conv', "not valid JSON"),
    (b"[1, 2]", "not a JSON object"), (b"\xff\xfe", "not valid JSON"), (b"null", "not a JSON object"),
])
def test_read_result_names_what_is_wrong(tmp_path, content, reason):
    path = tmp_path / "000004.json"
    path.write_bytes(content)
    record, why = trust.read_result(path)
    assert record is None and reason in why
    assert trust.read_result(tmp_path / "missing.json")[1].startswith("unreadable")
    path.write_text(json.dumps(_record()))
    assert trust.read_result(path) == (_record(), None)


def test_reject_moves_the_file_aside_with_its_reason(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    bad = results / "000004.json"
    bad.write_text('{"name": "s1", "status": "conv')
    first = trust.reject(bad, "not valid JSON (truncated)")
    assert not bad.exists()
    assert first.parent == results / "rejected" and first.read_text() == '{"name": "s1", "status": "conv'
    why = json.loads(first.with_name(first.name + ".reason.json").read_text())
    assert why["reason"] == "not valid JSON (truncated)" and why["file"] == str(bad)
    bad.write_text("")  # a second bad file for the same job keeps the first one
    second = trust.reject(bad, "empty file")
    assert second != first and first.exists() and second.exists()
    assert sorted(p.name for p in results.iterdir()) == ["rejected"]  # results/ holds no result file now


def test_accept_result_is_read_check_and_reject_in_one_call(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    good, bad, cut = results / "000004.json", results / "000005.json", results / "000006.json"
    good.write_text(json.dumps(_record()))
    bad.write_text(json.dumps(_record(name="s9")))
    cut.write_text(json.dumps(_record())[:40])
    tid = "graceq-abc-it0001-dft-000004"
    assert trust.accept_result(good, "s1", tid, [6, 6, 1], expected_idx=4) == _record()
    assert good.exists()
    assert trust.accept_result(bad, "s1", tid, [6, 6, 1]) is None and not bad.exists()
    assert trust.accept_result(cut, "s1", tid, [6, 6, 1]) is None and not cut.exists()
    reasons = sorted(json.loads(p.read_text())["reason"] for p in (results / "rejected").glob("*.reason.json"))
    assert len(reasons) == 2 and "not valid JSON" in reasons[0] and "structure name 's9'" in reasons[1]


# -- signing --------------------------------------------------------------------------------
def test_signature_covers_name_id_and_arguments():
    key = b"k" * 32
    base = trust.signature(key, "graceq.run_reference", "id-1", ["/c", 3, "s3"], {})
    assert base == trust.signature(key, "graceq.run_reference", "id-1", ("/c", 3, "s3"), None)
    assert base == trust.signature(key, "graceq.run_reference", "id-1", json.loads(json.dumps(["/c", 3, "s3"])), {})
    for other in (trust.signature(key, "graceq.featurize", "id-1", ["/c", 3, "s3"], {}),
                  trust.signature(key, "graceq.run_reference", "id-2", ["/c", 3, "s3"], {}),
                  trust.signature(key, "graceq.run_reference", "id-1", ["/c", 4, "s3"], {}),
                  trust.signature(key, "graceq.run_reference", "id-1", ["/c", 3, "s3"], {"x": 1}),
                  trust.signature(b"j" * 32, "graceq.run_reference", "id-1", ["/c", 3, "s3"], {})):
        assert other != base


def test_signing_key_from_the_environment_or_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv(trust.ENV_SIGNING_KEY, raising=False)
    monkeypatch.delenv(trust.ENV_SIGNING_KEY_FILE, raising=False)
    assert trust.signing_key() is None
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    key_file.chmod(0o600)
    monkeypatch.setenv(trust.ENV_SIGNING_KEY_FILE, str(key_file))
    assert trust.signing_key() == b"s3cret"
    monkeypatch.setenv(trust.ENV_SIGNING_KEY, "other")
    assert trust.signing_key() == b"other"
    monkeypatch.delenv(trust.ENV_SIGNING_KEY)
    key_file.write_text("")
    with pytest.raises(UntrustedMessage, match="empty"):
        trust.signing_key()


# -- TLS settings ------------------------------------------------------------------------------
def test_tls_options(monkeypatch, tmp_path):
    import ssl

    from graceq.app import tls_options

    for env in ("GRACEQ_BROKER_CA", "GRACEQ_BROKER_CERT", "GRACEQ_BROKER_KEY", "GRACEQ_BROKER_CERT_REQS"):
        monkeypatch.delenv(env, raising=False)
    assert tls_options("redis://h:6379/0") is None
    assert tls_options("rediss://h:6379/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    monkeypatch.setenv("GRACEQ_BROKER_CA", str(ca))
    monkeypatch.setenv("GRACEQ_BROKER_CERT_REQS", "optional")
    assert tls_options("rediss://h/0") == {"ssl_cert_reqs": ssl.CERT_OPTIONAL, "ssl_ca_certs": str(ca)}
    monkeypatch.setenv("GRACEQ_BROKER_CERT", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="GRACEQ_BROKER_CERT=.*no such file"):
        tls_options("rediss://h/0")
    monkeypatch.delenv("GRACEQ_BROKER_CERT")
    monkeypatch.setenv("GRACEQ_BROKER_CERT_REQS", "maybe")
    with pytest.raises(ValueError, match="required, optional or none"):
        tls_options("rediss://h/0")


# -- the command line: Flower's address guard, broker secrets -----------------------------------
@pytest.mark.parametrize("args", [
    ["--address=0.0.0.0"], ["--address", "0.0.0.0"], ["--address=::"], ["--address="], ["--address", "10.0.0.5"],
    ["--", "--address=0.0.0.0"], ["--", "--address", "0.0.0.0"], ["--", "-address=0.0.0.0"],
    ["--", "--address=::"], ["--", "--basic-auth=u:p"], ["--", "--basic_auth=u:p"], ["--", "--broker=redis://x"],
])
def test_flower_refuses_every_way_to_listen_beyond_localhost_without_auth(args):
    env = {k: v for k, v in os.environ.items() if k not in ("GRACEQ_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH")}
    env["GRACEQ_BROKER_URL"] = "redis://127.0.0.1:1/0"
    out = subprocess.run(GRACEQ + ["flower", *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "without authentication" in out.stderr or "not to Flower directly" in out.stderr, out.stderr


def test_broker_file_and_the_password_warning(tmp_path):
    broker_file = tmp_path / "broker_url"
    broker_file.write_text("redis://:pw-in-file@127.0.0.1:1/0\n")
    broker_file.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k != "GRACEQ_BROKER_URL"}
    # an unreadable campaign stops `graceq run` after the broker is read: enough to see the warnings
    out = subprocess.run(GRACEQ + ["run", str(tmp_path / "none"), "--broker-file", str(broker_file), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "readable by other users" in out.stderr and "pw-in-file" not in out.stderr + out.stdout
    out = subprocess.run(GRACEQ + ["run", str(tmp_path / "none"), "--broker", "redis://:pw-on-line@127.0.0.1:1/0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "visible to every user" in out.stderr and "pw-on-line" not in out.stderr + out.stdout
    out = subprocess.run(GRACEQ + ["worker", "--broker-file", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "cannot read it" in out.stderr
