"""Warming through the real decide(): nodes powered on before the jobs that use them arrive.

Jobs of one node arrive every 120 s and run 1,200 s: ten run at once, so a purely reactive rule
has no idle node for each new job until the first ones end, and every one of those waits a boot.
"""

from __future__ import annotations

from services.autogrow.policy import PolicySettings
from services.autogrow.swf import SwfJob
from services.simulator.engine import RunResult, SimConfig, run
from services.simulator.policies import Hpcfleet
from services.simulator.report import verify

WARM = PolicySettings(idle_seconds=300, warm_window_seconds=600, warm_max_nodes=2, warm_starts=True)
COLD = PolicySettings(idle_seconds=300)


def steady(count: int = 20, every: int = 120, run_time: int = 1200) -> list[SwfJob]:
    return [
        SwfJob(
            job_id=i + 1,
            submit=i * every,
            wait=None,
            run_time=run_time,
            procs=1,
            allocated_procs=1,
            requested_procs=None,
            requested_time=run_time,
            status=1,
            queue=None,
            partition=None,
        )
        for i in range(count)
    ]


def replay(settings: PolicySettings, jobs: list[SwfJob]) -> RunResult:
    result = run(jobs, SimConfig(nodes=16, cores_per_node=1), Hpcfleet(settings))
    assert verify(result) == []
    return result


def test_warming_powers_nodes_on_before_the_jobs_arrive() -> None:
    jobs = steady()
    cold, warm = replay(COLD, jobs), replay(WARM, jobs)
    cold_waits = [j.start - j.submit for j in cold.jobs if j.start is not None]
    warm_waits = [j.start - j.submit for j in warm.jobs if j.start is not None]
    assert cold_waits[:10] == [60.0] * 10  # reactive: each of the first ten waits a boot
    assert warm_waits[0] == 60.0  # nothing has arrived yet to say what comes
    assert warm_waits[1:] == [0.0] * 19  # every later job found a node already up
    # the nodes they ran on were started before they were submitted
    on_at = {}
    for node, on, _, _ in warm.intervals:
        on_at.setdefault(warm.names[node], []).append(on)
    for job in warm.jobs[1:]:
        assert job.start is not None
        assert min(on_at[job.nodes[0]]) < job.submit


def test_warming_starts_are_bounded_by_the_reserve() -> None:
    jobs = steady()
    cold, warm = replay(COLD, jobs), replay(WARM, jobs)
    # never more than a start per job plus the reserve: warming moves starts earlier, it does
    # not multiply them
    assert cold.starts <= warm.starts <= len(jobs) + WARM.warm_max_nodes


def test_quiet_spells_let_the_reserve_go() -> None:
    # two bursts six hours apart: between them nothing arrives, so nothing stays warm
    jobs = steady(5) + [
        j._replace(job_id=100 + j.job_id, submit=j.submit + 6 * 3600) for j in steady(5)
    ]
    warm = replay(WARM, jobs)
    gap_start, gap_end = 5 * 120 + 1200 + 60, 6 * 3600
    hours_on_in_gap = sum(
        max(0.0, min(off, gap_end) - max(on, gap_start)) for _, on, _, off in warm.intervals
    )
    assert hours_on_in_gap / 3600 < 1.0  # far less than a node-hour over the quiet hours
