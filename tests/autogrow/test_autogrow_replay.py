"""decide() driving the simulated scheduler on a manual clock: the pieces fit, the invariants hold.

A minimal stand-in for the pool (power on takes a boot, power off is at once) and for autogrow's
acting (drain, resume, power off), so the decide -> act -> observe loop runs as the service and the
simulator will run it.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from dataclasses import replace
from datetime import datetime, timedelta
from itertools import islice

import pytest

from services.autogrow.billing import BillingRules, billed_seconds
from services.autogrow.policy import PolicySettings, PoolNodeView, decide
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.swf import SwfJob, bundled_trace, open_swf
from shared.clock import ManualClock
from shared.events import BillingModel, PowerState

BOOT_SECONDS = 60
BOOTED = timedelta(seconds=BOOT_SECONDS)


def workload(seed: int, nodes: int) -> list[SwfJob]:
    """Bursts of jobs with quiet hours between them, so nodes go up and down many times."""
    rng = random.Random(seed)
    jobs = []
    for job_id in range(80):
        burst, offset = divmod(job_id, 10)
        run = rng.randint(30, 1800)
        procs = rng.randint(1, nodes)
        jobs.append(
            SwfJob(
                job_id=job_id,
                submit=burst * 3 * 3600 + offset * 120,
                wait=None,
                run_time=run,
                procs=procs,
                allocated_procs=procs,
                requested_procs=None,
                requested_time=run,
                status=1,
                queue=None,
                partition=None,
            )
        )
    return jobs


def replay(
    jobs: list[SwfJob], nodes: int, billing: BillingModel
) -> tuple[SimulatedScheduler, dict[str, list[tuple[datetime, datetime]]], float]:
    """Event-driven: wake at the next arrival or completion, boot end, or `recheck_at`."""
    clock = ManualClock()
    names = [f"n{i}" for i in range(nodes)]
    sched = SimulatedScheduler(jobs, clock, nodes=names, cores_per_node=1)
    pool = {
        name: PoolNodeView(name, name, PowerState.STOPPED, clock.now(), billing) for name in names
    }
    powered: dict[str, list[tuple[datetime, datetime]]] = {name: [] for name in names}
    booting: dict[str, datetime] = {}
    billed = 0.0
    while not sched.done:
        now = clock.now()
        for name, ready in list(booting.items()):
            if ready <= now:
                sched.node_up(name)
                del booting[name]
        for _ in range(3):  # a drain is effective at once here, so look again at the same instant
            decision = decide(
                sched.take_snapshot(), list(pool.values()), BillingRules(), now, PolicySettings()
            )
            for action in decision.power_on:
                pool[action.node_id] = replace(
                    pool[action.node_id], power=PowerState.RUNNING, since=now
                )
                booting[action.node_id] = now + timedelta(seconds=BOOT_SECONDS)
            for action in decision.drain:
                sched.drain_nodes([action.scheduler_name])
                pool[action.node_id] = replace(pool[action.node_id], drain_requested=True)
            for action in decision.resume:
                sched.resume_nodes([action.scheduler_name])
                pool[action.node_id] = replace(pool[action.node_id], drain_requested=False)
            for action in decision.power_off:
                node = pool[action.node_id]
                sched.node_down(action.scheduler_name)
                powered[action.node_id].append((node.since, now))
                billed += billed_seconds(billing, (now - node.since).total_seconds())
                pool[action.node_id] = replace(node, power=PowerState.STOPPED, since=now)
            if not (decision.drain or decision.resume):
                break
        wakes = [sched.next_event_at(), decision.recheck_at, *booting.values()]
        upcoming = [at for at in wakes if at is not None]
        assert upcoming, "jobs are left but nothing will ever happen"
        clock.set(max(min(upcoming), now))
        assert len(sched.rejected) == 0
    for name, node in pool.items():
        if node.power is PowerState.RUNNING:
            powered[name].append((node.since, clock.now()))
            billed += billed_seconds(billing, (clock.now() - node.since).total_seconds())
    return sched, powered, billed


@pytest.mark.parametrize("billing", list(BillingModel))
@pytest.mark.parametrize("seed", [1, 2])
def test_jobs_run_only_on_powered_nodes_and_idle_nodes_go_down(
    billing: BillingModel, seed: int
) -> None:
    nodes = 8
    sched, powered, billed = replay(workload(seed, nodes), nodes, billing)
    check_invariants(sched, powered, billed)
    assert sum(len(intervals) for intervals in powered.values()) > nodes, "nodes never went down"


def test_a_real_trace_replays_under_decide() -> None:
    with open_swf(bundled_trace("SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz")) as reader:
        jobs = list(islice(reader, 600))  # about six days of SDSC-SP2
    sched, powered, billed = replay(jobs, 128, BillingModel.PER_SECOND)
    check_invariants(sched, powered, billed)


def check_invariants(
    sched: SimulatedScheduler, powered: dict[str, list[tuple[datetime, datetime]]], billed: float
) -> None:
    """Every job ran, only while its nodes were up and registered, and the bill is plausible."""
    origin = sched.origin
    for job in sched.jobs:
        assert job.start is not None and job.end is not None
        assert job.interruptions == 0, "a node was powered off under a job"
        start, end = origin + timedelta(seconds=job.start), origin + timedelta(seconds=job.end)
        for name in job.nodes:
            intervals = powered[name]  # in time order
            latest = bisect_right(intervals, start, key=lambda i: i[0] + BOOTED) - 1
            assert latest >= 0 and end <= intervals[latest][1], (
                f"job {job.job_id} ran on {name} while it was not running"
            )
    lower_bound = sum(job.run_time * job.nodes_needed for job in sched.jobs)
    first = min(job.submit for job in sched.jobs)
    always_on = len(powered) * (max(job.end or 0 for job in sched.jobs) - first)
    assert lower_bound < billed < always_on
