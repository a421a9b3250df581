"""A reference engine for tests: replays answers, but one named structure kills its worker process.

It stands for a real failure mode of DFT jobs on clusters: a structure whose calculation is
killed by the kernel (out of memory) or crashes the code, every time it is tried.
"""

from __future__ import annotations

import os
import signal

from graceq.engines.replay import ReplayEngine


class KillerEngine(ReplayEngine):
    def __init__(self, settings, unit, pool_source=None):
        settings = dict(settings)
        self.victim = settings.pop("victim")
        super().__init__(settings, unit, pool_source)

    @classmethod
    def from_settings(cls, settings, unit, pool_source=None):
        return cls(settings, unit, pool_source)

    def run(self, atoms, name, workdir=None, heartbeat=None):
        if name == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(atoms, name, workdir, heartbeat)
