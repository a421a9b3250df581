"""The `slurm` reference engine: each re-minimisation is a SLURM batch job (DESIGN.md section 7).

The scheduler pattern: ``submit`` writes a self-contained job directory and calls ``sbatch``; it
returns in a second, so the Celery task that calls it stays short. ``poll`` reads the job's state
from ``squeue -t all`` and from the job directory, and gives the result once
the job has ended. Inside the allocation the batch script runs ``graceq relax <workdir>``, which is
``relax_job``: the ``ase`` engine's relaxation with the configured calculator, writing
``<workdir>/result.json`` by atomic rename.

Everything a job needs and everything known about it lives in its directory, so a job survives a
worker, a coordinator or a login-node restart::

    <workdir>/structure.extxyz   the structure to relax (positions in Å)
    <workdir>/job.json           name, campaign unit and the ase engine's settings
    <workdir>/job.sh             the batch script (first line #!/bin/bash)
    <workdir>/slurm.json         every sbatch submission: job id, time, host (written before return)
    <workdir>/slurm-<id>.out     the job's stdout/stderr
    <workdir>/relax/             the ase engine's working directory (trajectory checkpoint)
    <workdir>/result.json        the ReferenceResult, written by the job

Settings (the campaign's ``[engine]`` table): ``engine = "slurm"``, the ``ase`` engine's keys
(``calculator``, ``fmax`` ...) and a ``[engine.slurm]`` sub-table with the scheduler's keys (see
``SlurmOptions``). ``sacct`` is not used: it needs accounting storage, which many small clusters
lack.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from graceq.engines.base import ReferenceEngine, ReferenceResult, read_job_result

log = logging.getLogger("graceq.engines.slurm")

#: job states in which SLURM still holds the job (it may yet write its result)
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})


#: environment variables never handed to a batch job (sbatch exports the submitter's environment,
#: and slurmctld keeps a job's environment in its state): the job needs none of them
SECRET_VARIABLES = ("GRACEQ_BROKER_URL", "GRACEQ_RESULT_BACKEND", "GRACEQ_FLOWER_BASIC_AUTH",
                    "FLOWER_BASIC_AUTH", "REDIS_PASSWORD", "REDISCLI_AUTH")


class SlurmError(RuntimeError):
    """sbatch/squeue could not do what was asked; the message has the command and its output."""


@dataclass
class SlurmOptions:
    """The ``[engine.slurm]`` table: how jobs are submitted and watched."""

    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"  # wall-time limit, SLURM format
    cpus_per_task: int = 1
    mem: str | None = None  # e.g. "4G"; None: the partition's default
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. ["--qos=short"]
    setup: list[str] = field(default_factory=list)  # shell lines before the run (module load, venv)
    command: str = "graceq relax"  # what runs the relaxation on the compute node
    max_submissions: int = 3  # sbatch calls per structure before it counts as failed
    poll_interval: float = 15.0  # s: squeue is asked at most this often
    result_grace: float = 30.0  # s an ended job's result may take to appear (shared file systems)
    sbatch: str = "sbatch"
    squeue: str = "squeue"

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "SlurmOptions":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"[engine.slurm]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        options = cls(**values)
        if options.max_submissions < 1:
            raise ValueError(f"[engine.slurm] max_submissions must be >= 1, got {options.max_submissions}")
        if options.cpus_per_task < 1:
            raise ValueError(f"[engine.slurm] cpus_per_task must be >= 1, got {options.cpus_per_task}")
        return options


def _atomic_write_text(path: Path, text: str) -> None:
    from graceq.store import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def ase_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``ase`` engine's settings inside a slurm engine's settings (what runs in the job)."""
    inner = {k: v for k, v in settings.items() if k not in ("engine", "slurm")}
    inner["engine"] = "ase"
    return inner


class SlurmEngine(ReferenceEngine):
    """Reference engine that runs each relaxation as a SLURM batch job.

    Parameters
    ----------
    settings : the campaign's ``[engine]`` table as a dict (``engine = "slurm"``, the ``ase``
        engine's keys, and an optional ``slurm`` sub-table of ``SlurmOptions``).
    unit : the campaign's energy unit; the job reports energies in it (total per cell).
    """

    name = "slurm"

    def __init__(self, settings: dict[str, Any], unit: str):
        self.settings = dict(settings)
        self.unit = unit
        self.options = SlurmOptions.from_dict(self.settings.get("slurm"))
        self.inner_settings = ase_settings(self.settings)
        self._snapshot: dict[str, tuple[str, str]] = {}
        self._snapshot_at = float("-inf")
        self._asked: set[str] = set()
        self._retry_after = float("-inf")
        self._ended_seen: dict[str, float] = {}

    def check(self) -> None:
        """Fail early, at `graceq init`, when sbatch is not there or the calculator is unknown."""
        from graceq.engines import make_engine

        if shutil.which(self.options.sbatch) is None:
            raise ValueError(
                f"engine 'slurm': '{self.options.sbatch}' not found on {socket.gethostname()}; "
                "run graceq where SLURM's commands are (a login node) or set [engine.slurm] sbatch"
            )
        make_engine(self.inner_settings, self.unit, None)

    # -- commands --------------------------------------------------------------------------------
    def _call(self, argv: list[str], ok_codes=(0,)) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]}: command not found on {socket.gethostname()}") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{' '.join(argv)}: no answer from SLURM in 120 s") from None
        if proc.returncode not in ok_codes:
            raise SlurmError(
                f"{' '.join(shlex.quote(a) for a in argv)} exited with {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    # -- the job directory -------------------------------------------------------------------------
    @staticmethod
    def job_name(name: str) -> str:
        """The SLURM job name of a structure: graceq-<name>, shell- and squeue-safe."""
        return "graceq-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]

    def _find_job(self, name: str, workdir: Path) -> str | None:
        """The id of a job SLURM knows with this structure's job name and working directory."""
        try:
            proc = self._call([self.options.squeue, "-h", "-t", "all", "--name", self.job_name(name),
                               "-o", "%i|%Z"], ok_codes=(0, 1))
        except SlurmError:
            return None
        for line in proc.stdout.splitlines():
            job_id, _, where = line.strip().partition("|")
            if where and Path(where).resolve() == workdir and job_id.isdigit():
                return job_id
        return None

    def batch_script(self, name: str, workdir: Path) -> str:
        """The batch script of one job: #SBATCH options, setup lines, then `graceq relax <workdir>`."""
        o = self.options
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={self.job_name(name)}",
            f"#SBATCH --output={workdir}/slurm-%j.out",
            f"#SBATCH --chdir={workdir}",
            "#SBATCH --nodes=1",
            "#SBATCH --ntasks=1",
            f"#SBATCH --cpus-per-task={o.cpus_per_task}",
            f"#SBATCH --time={o.time}",
        ]
        if o.partition:
            lines.append(f"#SBATCH --partition={o.partition}")
        if o.account:
            lines.append(f"#SBATCH --account={o.account}")
        if o.mem:
            lines.append(f"#SBATCH --mem={o.mem}")
        lines += [f"#SBATCH {arg}" for arg in o.sbatch_args]
        lines += [
            "# written by graceq (engine 'slurm'): relaxes structure.extxyz, writes result.json",
            "set -euo pipefail",
            *o.setup,
            'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
            'export RAYON_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
            f"exec {o.command} {shlex.quote(str(workdir))}",
        ]
        return "\n".join(lines) + "\n"

    @contextmanager
    def _locked(self, workdir: Path):
        """One submitter at a time per job directory (a duplicate delivery waits, then sees slurm.json)."""
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / ".submit.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _sbatch(self, workdir: Path, record: dict) -> str:
        """Submit job.sh once more; the job id is in slurm.json before this returns."""
        proc = self._call([self.options.sbatch, "--parsable", str(workdir / "job.sh")])
        job_id = proc.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        if not job_id.isdigit():
            raise SlurmError(f"sbatch {workdir / 'job.sh'}: unexpected answer {proc.stdout.strip()!r}")
        record.setdefault("submissions", []).append(
            {"job_id": job_id, "submitted_at": time.time(), "host": socket.gethostname()}
        )
        record["job_id"] = job_id
        _atomic_write_text(workdir / "slurm.json", json.dumps(record, indent=1))
        return job_id

    def submit(self, atoms, name: str, workdir: str | Path, heartbeat: Callable[[], None] | None = None) -> str:
        """Write the job directory and sbatch it; returns the SLURM job id.

        Idempotent: when ``slurm.json`` already records a job, its id is returned and nothing is
        submitted (a re-delivered Celery task, a restarted coordinator).
        """
        from ase.io import write

        workdir = Path(workdir).resolve()
        with self._locked(workdir):
            record = _read_json(workdir / "slurm.json")
            if record and record.get("job_id"):
                return str(record["job_id"])
            if (workdir / "job.sh").exists():
                # an earlier submit died between sbatch and slurm.json: adopt its job if SLURM has it
                found = self._find_job(name, workdir)
                if found is not None:
                    record = {"name": name, "job_id": found, "submissions": [
                        {"job_id": found, "submitted_at": time.time(), "host": socket.gethostname(),
                         "adopted": True}]}
                    _atomic_write_text(workdir / "slurm.json", json.dumps(record, indent=1))
                    return found
            write(workdir / "structure.extxyz", atoms, format="extxyz")
            _atomic_write_text(workdir / "job.json", json.dumps(
                {"name": name, "unit": self.unit, "engine": self.inner_settings}, indent=1))
            _atomic_write_text(workdir / "job.sh", self.batch_script(name, workdir))
            return self._sbatch(workdir, {"name": name, "submissions": []})

    # -- watching ----------------------------------------------------------------------------------
    def _states(self, job_ids: list[str], fresh: bool = False) -> dict[str, tuple[str, str]]:
        """(state, reason) of each job SLURM still knows; jobs it forgot are absent.

        ``squeue -t all`` lists ended jobs too, for MinJobAge seconds after their end (what
        ``scontrol show job`` knows as well); no sacct, which needs accounting storage. One squeue
        call for every job asked about, at most every `poll_interval` seconds unless `fresh`.
        """
        now = time.time()
        wanted = set(job_ids)
        if fresh or now - self._snapshot_at > self.options.poll_interval or not wanted <= self._asked:
            argv = [self.options.squeue, "-h", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(sorted(wanted))]
            proc = self._call(argv, ok_codes=(0, 1))
            if proc.returncode == 1 and "Invalid job id" not in proc.stderr:
                raise SlurmError(f"{' '.join(argv)} exited with 1: {proc.stderr.strip()}")
            snapshot = {}
            for line in proc.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) == 3:
                    snapshot[parts[0]] = (parts[1].split()[0], parts[2])
            self._snapshot, self._snapshot_at, self._asked = snapshot, now, wanted
        return {j: self._snapshot[j] for j in job_ids if j in self._snapshot}

    def poll(self, workdirs, resubmit: bool = True) -> dict[Path, ReferenceResult | None]:
        """Each job's result once it has ended, None while SLURM still runs (or queues) it.

        One squeue call for all the given job directories (keys: the given paths). A job that
        ended without writing ``result.json`` (node failure, wall time, cancelled) is submitted
        again, up to ``max_submissions`` sbatch calls in all; after that a failed result names the
        job ids, their last state and the output file to read.
        """
        given = [Path(w) for w in workdirs]
        answers = self._poll_resolved([w.resolve() for w in given], resubmit)
        return {w: answers[w.resolve()] for w in given}

    def _poll_resolved(self, workdirs: list[Path], resubmit: bool) -> dict[Path, ReferenceResult | None]:
        answers: dict[Path, ReferenceResult | None] = {}
        records: dict[Path, dict] = {}
        for w in workdirs:
            answers[w] = self._result_file(w)
            if answers[w] is None:
                record = _read_json(w / "slurm.json")
                if not record or not record.get("job_id"):
                    raise SlurmError(f"{w}: no slurm.json, the job was never submitted")
                records[w] = record
        if not records:
            return answers
        newest = max(float(r["submissions"][-1]["submitted_at"]) for r in records.values())
        if time.time() < self._retry_after:
            return answers
        try:
            states = self._states([r["job_id"] for r in records.values()], fresh=self._snapshot_at < newest)
        except SlurmError as exc:  # slurmctld restarting, a network blip: ask again in a while
            log.warning("cannot read job states, trying again in %s s: %s", self.options.poll_interval, exc)
            self._retry_after = time.time() + self.options.poll_interval
            return answers
        for w, record in records.items():
            job_id = str(record["job_id"])
            state = states.get(job_id)
            if state is not None and state[0] in ACTIVE_STATES:
                self._ended_seen.pop(job_id, None)
                continue
            result = self._result_file(w)
            if result is not None:
                answers[w] = result
                continue
            # ended without a result: give a shared file system time to show the file
            first_seen = self._ended_seen.setdefault(job_id, time.time())
            if time.time() - first_seen < self.options.result_grace:
                continue
            self._ended_seen.pop(job_id, None)
            how = f"{state[0]}{' (' + state[1] + ')' if state[1] and state[1] != 'None' else ''}" \
                if state else "gone from squeue"
            attempts = len(record.get("submissions", []))
            if resubmit and attempts < self.options.max_submissions:
                with self._locked(w):
                    if self._result_file(w) is None and _read_json(w / "slurm.json") == record:
                        self._sbatch(w, record)
                continue
            ids = ", ".join(s["job_id"] for s in record.get("submissions", []))
            answers[w] = ReferenceResult.failed(
                record.get("name", w.name),
                f"SLURM job(s) {ids} ended without a result (last: {how}); "
                f"see {w / ('slurm-' + job_id + '.out')}{_tail(w / ('slurm-' + job_id + '.out'))}",
            )
        return answers

    _result_file = staticmethod(read_job_result)

    # -- the ReferenceEngine interface ---------------------------------------------------------------
    def run(self, atoms, name: str, workdir: str | Path, heartbeat: Callable[[], None] | None = None
            ) -> ReferenceResult:
        """Submit (or find the submitted job) and wait for its result, beating while it waits.

        Blocking fallback for callers that do not poll themselves; graceq's coordinator submits and
        polls instead, so that no worker waits on SLURM.
        """
        self.submit(atoms, name, workdir)
        while True:
            result = self.poll([workdir])[Path(workdir)]
            if result is not None:
                return result
            if heartbeat is not None:
                heartbeat()
            time.sleep(min(self.options.poll_interval, 5.0))


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()[-n:]
    except FileNotFoundError:
        return ""
    return (": " + " | ".join(lines)) if lines else ""


# -- inside the job ------------------------------------------------------------------------------------
def relax_job(workdir: str | Path, heartbeat: Callable[[], None] | None = None) -> ReferenceResult:
    """Relax ``workdir/structure.extxyz`` with the ase engine of ``job.json``; writes result.json.

    What ``graceq relax <workdir>`` runs inside the allocation. A re-run (requeued job) resumes from
    the ase engine's checkpoint in ``workdir/relax``; an engine that breaks gives a failed result
    with the reason, so that the campaign goes on and the user sees why.
    """
    from ase.io import read

    from graceq.engines import make_engine

    workdir = Path(workdir).resolve()
    output = workdir / "result.json"
    existing = SlurmEngine._result_file(workdir)
    if existing is not None:
        return existing
    try:
        job = json.loads((workdir / "job.json").read_text())
        atoms = read(workdir / "structure.extxyz", format="extxyz")
    except (OSError, ValueError) as exc:
        raise SlurmError(f"{workdir}: not a graceq SLURM job directory ({type(exc).__name__}: {exc})") from None
    name = job["name"]
    try:
        engine = make_engine(job["engine"], job["unit"], None)
        result = engine.run(atoms, name, workdir / "relax", heartbeat=heartbeat)
    except Exception as exc:
        result = ReferenceResult.failed(name, f"{type(exc).__name__}: {exc}")
    record = result.to_json()
    record.update(host=socket.gethostname(), slurm_job_id=os.environ.get("SLURM_JOB_ID"))
    _atomic_write_text(output, json.dumps(record, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m graceq.engines.slurm WORKDIR``: the same as ``graceq relax WORKDIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m graceq.engines.slurm JOB_DIR", file=sys.stderr)
        return 2
    result = relax_job(args[0])
    print(f"{result.name}: {result.status} energy={result.energy} steps={result.n_steps} {result.message or ''}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
