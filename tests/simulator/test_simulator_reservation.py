"""Power saving behind a blocked job: the scheduler plans over powered-off nodes, `decide()` stops
idle nodes kept for a far reservation and starts them a boot before it.

Times are trace seconds; one core per node; boot 60 s.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.autogrow.billing import DEFAULT_RULES
from services.autogrow.policy import PolicySettings, PoolNodeView, decide
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.swf import SwfJob
from services.simulator.engine import RunResult, SimConfig, run
from services.simulator.policies import Hpcfleet
from services.simulator.report import summarize, verify
from shared.clock import ManualClock
from shared.events import BillingModel, PowerState
from shared.scheduler import (
    HeadReservation,
    NodeActivity,
    PartitionDemand,
    QueueSnapshot,
    SchedulerNode,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def job(job_id: int, submit: int, run_time: int, procs: int = 1, requested: int = 0) -> SwfJob:
    return SwfJob(
        job_id=job_id,
        submit=submit,
        wait=None,
        run_time=run_time,
        procs=procs,
        allocated_procs=procs,
        requested_procs=None,
        requested_time=requested or run_time,
        status=1,
        queue=None,
        partition=None,
    )


# ---- the scheduler ------------------------------------------------------------------------------

NAMES = ["n0", "n1", "n2", "n3"]
# a 2-node job runs to 1000 s; a 4-node job waits for it; then a long 1-node job and a short one
BLOCKED = [job(1, 0, 1000, 2), job(2, 10, 100, 4), job(3, 20, 5000), job(4, 30, 100)]


def blocked(resume_seconds: float | None) -> tuple[SimulatedScheduler, ManualClock]:
    clock = ManualClock(T0)
    sched = SimulatedScheduler(
        BLOCKED[:2], clock, nodes=NAMES, cores_per_node=1, resume_seconds=resume_seconds
    )
    for name in NAMES:
        sched.node_up(name)
    clock.set(T0 + timedelta(seconds=10))
    return sched, clock


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_snapshot_tells_the_head_jobs_reservation_and_the_nodes_kept_for_it() -> None:
    sched, _ = blocked(60.0)
    reservation = sched.take_snapshot().reservation
    # two nodes run job 1 to 1000 s; the two idle ones are kept for job 2
    assert reservation == HeadReservation(start=at(1000), nodes=4, held=2, backfill=0)
    sched.node_down("n2")  # what the power policy does with an idle node kept for it
    sched.node_down("n3")
    assert sched.take_snapshot().reservation == reservation
    # without power saving the scheduler tells none: it cannot plan over powered-off nodes
    assert blocked(None)[0].take_snapshot().reservation is None


@pytest.mark.parametrize(("resume_seconds", "head_start"), [(60.0, 1000.0), (None, 5000.0)])
def test_a_head_job_keeps_its_reservation_over_powered_off_nodes(
    resume_seconds: float | None, head_start: float
) -> None:
    clock = ManualClock(T0)
    sched = SimulatedScheduler(
        BLOCKED[:3], clock, nodes=NAMES, cores_per_node=1, resume_seconds=resume_seconds
    )
    for name in NAMES:
        sched.node_up(name)
    clock.set(at(10))
    sched.advance_to(clock.now())
    sched.node_down("n2")
    sched.node_down("n3")
    clock.set(at(1000))  # job 1 ends: two nodes free, two off
    sched.advance_to(clock.now())
    long_one = {j.job_id: j for j in sched.jobs}[3]
    if resume_seconds is None:
        # the old way: too few nodes up, no reservation, the long job takes a freed node
        assert long_one.start == 1000
    else:
        assert long_one.start is None
        reservation = sched.take_snapshot().reservation
        assert reservation == HeadReservation(start=at(1060), nodes=4, held=4)
    for name in ("n2", "n3"):
        sched.node_up(name)
    clock.set(at(1060))
    sched.advance_to(clock.now())
    head = {j.job_id: j for j in sched.jobs}[2]
    assert head.start == (1000 if resume_seconds is not None else None)


def test_a_short_job_that_could_backfill_on_a_powered_off_node_asks_for_it() -> None:
    clock = ManualClock(T0)
    sched = SimulatedScheduler(
        [*BLOCKED[:2], BLOCKED[3]], clock, nodes=NAMES, cores_per_node=1, resume_seconds=60.0
    )
    for name in NAMES:
        sched.node_up(name)
    sched.node_down("n2")
    sched.node_down("n3")
    clock.set(at(30))
    reservation = sched.take_snapshot().reservation
    # job 4 (100 s) ends long before 1000 s: it could start at once on a node that were up
    assert reservation is not None and reservation.backfill == 1


# ---- decide() -----------------------------------------------------------------------------------

SETTINGS = PolicySettings(reserved_risk_seconds=0.0, reserved_wake_seconds=60.0)


def snapshot(now: datetime, start: datetime, *, idle: int, held: int) -> QueueSnapshot:
    """Two busy nodes, `idle` idle ones (idle since an hour before `now`), the rest down; a
    4-node job waits for a reservation at `start`."""
    nodes = []
    for i, name in enumerate(NAMES):
        if i < 2:
            activity = NodeActivity.BUSY
        elif i < 2 + idle:
            activity = NodeActivity.IDLE
        else:
            activity = NodeActivity.DOWN
        nodes.append(
            SchedulerNode(
                name=name,
                activity=activity,
                cpus=1,
                cpus_allocated=1 if activity is NodeActivity.BUSY else 0,
                idle_since=now - timedelta(hours=1) if activity is NodeActivity.IDLE else None,
            )
        )
    return QueueSnapshot(
        taken_at=now,
        partitions=(PartitionDemand(partition="batch", pending_jobs=1, pending_cores=4),),
        running_jobs=1,
        nodes=tuple(nodes),
        reservation=HeadReservation(start=start, nodes=4, held=held),
    )


def views(now: datetime, stopped: int) -> list[PoolNodeView]:
    return [
        PoolNodeView(
            name,
            name,
            PowerState.STOPPED if i >= 4 - stopped else PowerState.RUNNING,
            now - timedelta(hours=2),
        )
        for i, name in enumerate(NAMES)
    ]


def test_decide_drains_idle_nodes_kept_for_a_far_reservation() -> None:
    now = at(3600)
    decision = decide(
        snapshot(now, now + timedelta(hours=3), idle=2, held=2),
        views(now, 0),
        DEFAULT_RULES,
        now,
        SETTINGS,
    )
    assert [a.scheduler_name for a in decision.drain] == ["n2", "n3"]
    assert "kept for the first waiting job" in decision.drain[0].reason
    assert not decision.power_on


def test_decide_keeps_them_while_idling_costs_less_than_a_restart_and_its_risk() -> None:
    now = at(3600)
    # idling 50 s to a boot before the start costs less than the restart's 60 s minimum
    near = snapshot(now, now + timedelta(seconds=110), idle=2, held=2)
    assert not decide(near, views(now, 0), DEFAULT_RULES, now, SETTINGS).drain
    far = snapshot(now, now + timedelta(hours=3), idle=2, held=2)
    cautious = SETTINGS.model_copy(update={"reserved_risk_seconds": 4 * 3600.0})
    assert not decide(far, views(now, 0), DEFAULT_RULES, now, cautious).drain
    never = SETTINGS.model_copy(update={"reserved_risk_seconds": None})
    assert not decide(far, views(now, 0), DEFAULT_RULES, now, never).drain


def test_decide_starts_nodes_kept_off_one_boot_before_the_reservation() -> None:
    now, start = at(3600), at(3600 + 3 * 3600)
    off = snapshot(now, start, idle=0, held=2)
    decision = decide(off, views(now, 2), DEFAULT_RULES, now, SETTINGS)
    assert not decision.power_on
    assert decision.recheck_at == start - timedelta(seconds=60)
    wake = start - timedelta(seconds=60)
    decision = decide(off, views(wake, 2), DEFAULT_RULES, wake, SETTINGS)
    assert [a.scheduler_name for a in decision.power_on] == ["n2", "n3"]


# ---- the replay ---------------------------------------------------------------------------------


def replay(jobs: list[SwfJob], risk: float | None, nodes: int = 4) -> RunResult:
    config = SimConfig(nodes=nodes, cores_per_node=1)
    result = run(jobs, config, Hpcfleet(tuning={"reserved_risk_seconds": risk}))
    assert verify(result) == []
    return result


def test_idle_nodes_behind_a_blocked_job_go_down_and_are_back_in_time() -> None:
    # job 1 holds 2 of 4 nodes for 20,000 s; job 2 needs all 4: its 2 idle nodes wait for it
    jobs = [job(1, 0, 20_000, 2), job(2, 10, 100, 4)]
    kept, stopped = replay(jobs, None), replay(jobs, 0.0)
    assert [j.start for j in stopped.jobs] == [j.start for j in kept.jobs] == [60.0, 20_060.0]
    # two nodes off from 10 s + 300 s idle to a boot before 20,060 s; two more starts
    assert kept.billed_seconds - stopped.billed_seconds == pytest.approx(2 * (20_000 - 370), abs=2)
    assert stopped.starts == kept.starts + 2


def test_a_head_job_that_can_start_early_waits_at_most_a_tick_and_a_boot() -> None:
    # job 1 asks for 40,000 s and ends at 20,000 s: the reservation was far, the start is not
    jobs = [job(1, 0, 20_000, 2, requested=40_000), job(2, 10, 100, 4)]
    kept, stopped = replay(jobs, None), replay(jobs, 0.0)
    assert kept.jobs[1].start == 20_060
    assert 20_060 < (stopped.jobs[1].start or 0) <= 20_060 + 60 + 60


traces = st.lists(
    st.tuples(
        st.integers(0, 20_000),  # submit
        st.integers(1, 5_000),  # run time
        st.integers(1, 4),  # nodes
        st.integers(0, 20_000),  # requested time beyond the run time
    ),
    min_size=1,
    max_size=25,
).map(
    lambda rows: [
        job(i, submit, run_time, procs, run_time + extra)
        for i, (submit, run_time, procs, extra) in enumerate(rows)
    ]
)
PROPERTIES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTIES
@given(traces, st.sampled_from(list(BillingModel)))
def test_stopping_kept_nodes_runs_every_job_and_changes_no_decision_by_a_shortcut(
    jobs: list[SwfJob], billing: BillingModel
) -> None:
    config = SimConfig(nodes=4, cores_per_node=1, billing=billing)
    tuning = {"reserved_risk_seconds": 0.0}
    fast = run(jobs, config, Hpcfleet(tuning=tuning))
    assert verify(fast) == []
    assert summarize(fast)["jobs_run"] == len(jobs)
    slow = run(jobs, config, Hpcfleet(tuning=tuning), shortcuts=False)
    every = Hpcfleet(tuning=tuning)
    every.skip_idle_steps = False  # decide() on every step, never `_quiet_until`
    full = run(jobs, config, every, shortcuts=False)
    for other in (slow, full):
        assert sorted(fast.intervals) == sorted(other.intervals)
        assert [(j.start, j.nodes) for j in fast.jobs] == [(j.start, j.nodes) for j in other.jobs]
