"""benchmarks/async_slots.py's bookkeeping: the jobs' timeline, the busy-slot curve its figure draws
and the utilisation it reports, against direct counts."""

import numpy as np

from conftest import load_benchmark


def _simulated(slots=3, n=12, seed=0):
    """A simulation that keeps ``slots`` jobs in flight until ``n`` have been sent and one more
    has landed (the last one still running when the run ends)."""
    bench = load_benchmark("async_slots")
    hours = np.random.default_rng(seed).lognormal(0.0, 1.0, size=n)
    sim = bench.Simulation(slots, hours, n_initial=2)
    queue = list(range(n))
    while queue:
        while queue and len(sim.running) < slots:
            sim.send(queue.pop(0))
        sim.next_arrival()
    sim.next_arrival()
    return bench, sim, hours


def test_timeline_is_every_job_sent_and_a_running_job_ends_now():
    bench, sim, hours = _simulated()
    jobs = sim.timeline(window={1, 4})
    assert len(jobs) == len(sim.sent)
    for (start, end, in_window), (t, i) in zip(jobs, sim.started):
        assert start == round(t, 3)
        assert end == round(min(t + hours[i], sim.clock), 3)   # still running: cut at the run's end
        assert in_window == int(i in {1, 4})
    assert any(t + hours[i] > sim.clock for t, i in sim.started)  # the case of a running job is exercised


def test_busy_curve_counts_the_jobs_running_and_integrates_to_the_utilisation():
    bench, sim, hours = _simulated()
    jobs = sim.timeline(window=set())
    t, busy = bench._busy(jobs)
    for when in np.random.default_rng(1).uniform(0.0, sim.clock, size=200):
        direct = sum(1 for start, end, _ in jobs if start <= when < end)
        assert busy[np.searchsorted(t, when, side="right") - 1] == direct
    slot_hours = float(np.sum(np.diff(np.append(t, sim.clock)) * busy))
    assert np.isclose(slot_hours / (sim.slots * sim.clock), sim.utilisation(), atol=1e-3)


def test_no_schedule_of_the_whole_pool_beats_the_ceiling():
    """Random orders of sending the whole pool (the slots filled as they free) stay at or under the
    ceiling, and the ceiling is reached when no job outlasts the slots' share of the work."""
    bench = load_benchmark("async_slots")
    rng = np.random.default_rng(2)
    for trial in range(30):
        slots, n = int(rng.integers(2, 9)), int(rng.integers(10, 40))
        hours = rng.lognormal(0.0, 1.0, size=n)
        ceiling = bench.whole_pool_ceiling(hours, slots)
        sim = bench.Simulation(slots, hours, n_initial=1)
        queue = list(rng.permutation(n))
        while queue or sim.running:
            while queue and len(sim.running) < slots:
                sim.send(queue.pop(0))
            sim.next_arrival()
        assert sim.utilisation() <= ceiling + 1e-12
    longest = bench.whole_pool_ceiling(np.array([10.0, 1.0, 1.0, 1.0]), 2)
    assert np.isclose(longest, 13.0 / 20.0)          # the 10 h job sets the end: 13 slot-h of 20
    assert bench.whole_pool_ceiling(np.ones(8), 4) == 1.0
