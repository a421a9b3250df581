"""A reference engine for tests: replays answers, each structure's job taking its own time.

Real reference jobs last from an hour to days, so jobs sent together end apart. Structure k of the
source (file order) takes ``delay_s * (1 + k % 3)`` seconds.
"""

from __future__ import annotations

from graceq.engines.replay import ReplayEngine


class StaggeredReplay(ReplayEngine):
    def __init__(self, settings, unit, pool_source=None):
        super().__init__(settings, unit, pool_source)
        self.base_s = self.delay_s

    @classmethod
    def from_settings(cls, settings, unit, pool_source=None):
        return cls(settings, unit, pool_source)

    def run(self, atoms, name, workdir=None, heartbeat=None):
        k = self._table().index.get(str(name), 0)
        self.delay_s = self.base_s * (1 + k % 3)
        return super().run(atoms, name, workdir, heartbeat)
