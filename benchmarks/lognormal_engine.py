"""The reference engine of the real run of benchmarks/async_slots.py: the replay engine, with each
structure's job taking its own time, and a log of when each job ran.

Structure i of the source takes ``delay_s * durations_h(n, seed)[i]`` seconds: the log-normal
(median 1, sigma 1, seeded) that the simulation draws its hours from, scaled so that the median
job takes ``delay_s`` seconds. Every completed run appends ``start end`` (s since the epoch) to
``<job dir>/runs.log`` (O_APPEND), from which the benchmark measures the slots' busy time.
Named as ``engine = "lognormal_engine:LogNormalReplay"`` with benchmarks/ on the workers'
PYTHONPATH.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from graceq.engines.replay import ReplayEngine


def durations_h(n: int, seed: int) -> np.ndarray:
    """Hours each structure's reference job takes: log-normal, median 1 h, sigma 1 (seeded)."""
    return np.random.default_rng([seed, 1]).lognormal(mean=0.0, sigma=1.0, size=n)


class LogNormalReplay(ReplayEngine):
    """Replay answers; structure i's job lasts its own log-normal time (median ``delay_s`` s)."""

    name = "lognormal-replay"
    SETTINGS = ReplayEngine.SETTINGS | {"delay_seed"}

    def __init__(self, settings, unit, pool_source=None):
        settings = dict(settings)
        self.delay_seed = int(settings.pop("delay_seed", 0))
        super().__init__(settings, unit, pool_source)
        self.median_s = self.delay_s

    @classmethod
    def from_settings(cls, settings, unit, pool_source=None):
        return cls(settings, unit, pool_source)

    def run(self, atoms, name, workdir=None, heartbeat=None):
        table = self._table()
        seconds = durations_h(len(table.index), self.delay_seed) * self.median_s
        self.delay_s = float(seconds[table.index[str(name)]]) if str(name) in table.index else 0.0
        start = time.time()
        result = super().run(atoms, name, workdir, heartbeat)
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            with open(Path(workdir) / "runs.log", "a") as log:
                log.write(f"{start:.4f} {time.time():.4f}\n")
        return result
