"""The reference engine of benchmarks/faults.py: the replay engine, plus a log of completed runs and
an optional poison structure.

Every completed run appends one line to ``<job dir>/runs.log`` (O_APPEND: lines of concurrent
runs do not mix), and every run whose result the engine then kept (``<job dir>/result.json``
written, the step after which the job is done and never run again) one line to ``kept.log``: a
job kept twice is a duplicated result; a run in runs.log that was not kept (its result could not
be written: a full disk) is a re-run, which is how such a job recovers. The structure named ``poison`` kills its worker process every time it is tried
(``poison_mode = "kill"``: the kernel's OOM killer, a crashing code), or fails as an ordinary
failed reference (``"fail"``: what the campaign must end up recording for it).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from graceq.engines.base import ReferenceResult
from graceq.engines.replay import ReplayEngine


class CountingReplay(ReplayEngine):
    def __init__(self, settings, unit, pool_source=None):
        settings = dict(settings)
        self.poison = settings.pop("poison", "")
        self.poison_mode = settings.pop("poison_mode", "kill")
        super().__init__(settings, unit, pool_source)

    @classmethod
    def from_settings(cls, settings, unit, pool_source=None):
        return cls(settings, unit, pool_source)

    def submit(self, atoms, name, workdir, heartbeat=None):
        kept = Path(workdir) / "result.json"
        already = kept.exists()
        super().submit(atoms, name, workdir, heartbeat)
        if not already:
            with open(Path(workdir) / "kept.log", "a") as log:
                log.write(f"{os.getpid()} {time.time():.3f}\n")

    def run(self, atoms, name, workdir=None, heartbeat=None):
        if name == self.poison:
            if self.poison_mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return ReferenceResult(name=name, status="failed", energy=None, atoms=None, message="poison")
        result = super().run(atoms, name, workdir, heartbeat)
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            with open(Path(workdir) / "runs.log", "a") as log:
                log.write(f"{os.getpid()} {time.time():.3f}\n")
        return result
