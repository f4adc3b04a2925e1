"""The simulated scheduler: EASY backfilling, power switched from outside, the Scheduler API."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.autogrow.simulated import SimulatedJob, SimulatedScheduler, UnknownNodeError
from services.autogrow.swf import SwfJob, bundled_trace, open_swf
from shared.clock import ManualClock
from shared.scheduler import NodeActivity, Scheduler


def job(
    job_id: int, submit: int, run: int, procs: int = 1, requested_time: int | None = None
) -> SwfJob:
    return SwfJob(
        job_id=job_id,
        submit=submit,
        wait=None,
        run_time=run,
        procs=procs,
        allocated_procs=procs,
        requested_procs=None,
        requested_time=run if requested_time is None else requested_time,
        status=1,
        queue=None,
        partition=None,
    )


def names(count: int) -> list[str]:
    return [f"n{i}" for i in range(count)]


def scheduler(
    jobs: list[SwfJob], nodes: int, *, up: bool = True, cores_per_node: int = 1
) -> tuple[SimulatedScheduler, ManualClock]:
    clock = ManualClock()
    sched = SimulatedScheduler(jobs, clock, nodes=names(nodes), cores_per_node=cores_per_node)
    if up:
        for name in names(nodes):
            sched.node_up(name)
    return sched, clock


def run_to_end(sched: SimulatedScheduler, clock: ManualClock) -> None:
    while (upcoming := sched.next_event_at()) is not None:
        clock.set(upcoming)
        sched.advance_to(upcoming)


def by_id(sched: SimulatedScheduler) -> dict[int, SimulatedJob]:
    return {j.job_id: j for j in sched.jobs}


def test_a_job_runs_from_its_submit_time_for_its_run_time() -> None:
    sched, clock = scheduler([job(1, submit=10, run=100, procs=2)], nodes=3)
    clock.advance(5)
    assert sched.take_snapshot().pending_jobs == 0
    run_to_end(sched, clock)
    [done] = sched.jobs
    assert (done.start, done.end, done.nodes) == (10, 110, ("n0", "n1"))
    assert sched.done


def test_easy_backfills_only_jobs_that_do_not_delay_the_head() -> None:
    sched, clock = scheduler(
        [
            job(1, submit=0, run=100, procs=2),
            job(2, submit=1, run=50, procs=4),  # the head: waits for job 1, reserved at 100
            job(3, submit=2, run=90, procs=1),  # ends at 92 <= 100: backfills
            job(4, submit=3, run=200, procs=1),  # would end after 100, no spare node: waits
            job(5, submit=4, run=50, procs=1),  # ends at 54: backfills behind job 4
        ],
        nodes=4,
    )
    run_to_end(sched, clock)
    jobs = by_id(sched)
    assert {i: j.start for i, j in jobs.items()} == {1: 0, 2: 100, 3: 2, 4: 150, 5: 4}
    assert jobs[2].reservation == 100


def test_a_long_job_backfills_on_nodes_the_head_will_not_need() -> None:
    sched, clock = scheduler(
        [
            job(1, submit=0, run=100, procs=2),
            job(2, submit=1, run=50, procs=4),  # 5 nodes at 100: one spare
            job(3, submit=2, run=500, procs=1),  # takes the spare
            job(4, submit=3, run=500, procs=1),  # no spare left
        ],
        nodes=5,
    )
    run_to_end(sched, clock)
    jobs = by_id(sched)
    assert (jobs[2].start, jobs[3].start, jobs[4].start) == (100, 2, 150)


def test_plans_use_the_requested_time_but_never_less_than_the_run() -> None:
    sched, clock = scheduler(
        [
            job(1, submit=0, run=100, procs=1, requested_time=50),  # overran its request
            job(2, submit=1, run=10, procs=2),  # head: reserved at 100, not 50
            job(3, submit=2, run=60, procs=1, requested_time=60),  # 62 <= 100: backfills
            job(4, submit=3, run=5, procs=1, requested_time=1000),  # short, but asked 1000
        ],
        nodes=2,
    )
    run_to_end(sched, clock)
    jobs = by_id(sched)
    assert jobs[2].reservation == 100
    assert (jobs[1].start, jobs[3].start, jobs[2].start, jobs[4].start) == (0, 2, 100, 110)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, list[SwfJob]]:
    nodes = draw(st.integers(1, 6))
    count = draw(st.integers(1, 25))
    jobs = []
    for job_id in range(count):
        run = draw(st.integers(0, 300))
        requested = draw(st.one_of(st.none(), st.integers(max(0, run - 50), run + 300)))
        jobs.append(
            job(
                job_id,
                submit=draw(st.integers(0, 400)),
                run=run,
                procs=draw(st.integers(1, nodes)),
                requested_time=requested,
            )
        )
    return nodes, jobs


@settings(max_examples=80, deadline=None)
@given(workloads())
def test_every_job_runs_once_on_free_nodes_and_no_head_is_delayed(
    workload: tuple[int, list[SwfJob]],
) -> None:
    nodes, jobs = workload
    sched, clock = scheduler(jobs, nodes)
    run_to_end(sched, clock)
    assert sched.done and not sched.rejected
    busy: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for j in sched.jobs:
        assert j.start is not None and j.end is not None
        assert j.start >= j.submit
        assert j.end == j.start + j.run_time
        assert len(set(j.nodes)) == len(j.nodes) == j.nodes_needed
        if j.reservation is not None:
            assert j.start <= j.reservation, "backfilling delayed the head past its reservation"
        for name in j.nodes:
            busy[name].append((j.start, j.end))
    for intervals in busy.values():
        intervals.sort()
        for (_, end), (start, _) in pairwise(intervals):
            assert end <= start, "a node ran two jobs at once"


def test_jobs_wait_for_nodes_to_come_up() -> None:
    sched, clock = scheduler([job(1, submit=0, run=100, procs=2)], nodes=2, up=False)
    clock.advance(30)
    sched.node_up("n0")
    snapshot = sched.take_snapshot()
    assert snapshot.pending_jobs == 1 and snapshot.running_jobs == 0
    clock.advance(30)
    sched.node_up("n1")
    [started] = sched.jobs
    assert (started.start, started.nodes) == (60, ("n0", "n1"))


def test_a_node_powered_off_under_a_job_sends_the_job_back_to_wait() -> None:
    sched, clock = scheduler([job(1, submit=0, run=100), job(2, submit=5, run=10)], nodes=1)
    clock.advance(20)
    sched.node_down("n0")
    first, second = sched.jobs
    assert first.start is None and first.interruptions == 1
    assert sched.take_snapshot().pending_jobs == 2
    clock.advance(10)
    sched.node_up("n0")
    run_to_end(sched, clock)
    assert (first.start, first.end, second.start) == (30, 130, 130)


def test_drained_nodes_finish_their_jobs_and_take_no_new_ones() -> None:
    sched, clock = scheduler([job(1, submit=0, run=100), job(2, submit=10, run=10)], nodes=1)
    clock.advance(5)
    sched.drain_nodes(["n0"])
    [node] = sched.take_snapshot().nodes
    assert (node.activity, node.cpus_allocated) == (NodeActivity.DRAINING, 1)
    clock.advance(100)
    snapshot = sched.take_snapshot()
    [node] = snapshot.nodes
    assert (node.activity, node.cpus_allocated) == (NodeActivity.DRAINING, 0)
    assert snapshot.pending_jobs == 1
    sched.resume_nodes(["n0"])
    assert by_id(sched)[2].start == 105


def test_a_drained_busy_node_frees_nothing_for_the_reservation() -> None:
    sched, clock = scheduler(
        [
            job(1, submit=0, run=100),  # on n0, which is then drained
            job(2, submit=0, run=1000),  # on n1
            job(3, submit=1, run=10, procs=2),  # head: only n1 and n2 can serve it, from 1000
            job(4, submit=2, run=500),  # 502 <= 1000: backfills on n2
        ],
        nodes=3,
    )
    clock.advance(0.5)
    sched.drain_nodes(["n0"])
    run_to_end(sched, clock)
    jobs = by_id(sched)
    assert jobs[3].reservation == 1000
    assert jobs[4].start == 2
    assert jobs[3].start == 1000 and set(jobs[3].nodes) == {"n1", "n2"}


def test_a_job_larger_than_the_cluster_is_rejected_not_left_blocking() -> None:
    sched, clock = scheduler([job(1, submit=0, run=10, procs=3), job(2, submit=1, run=10)], 2)
    run_to_end(sched, clock)
    assert [j.job_id for j in sched.rejected] == [1]
    assert by_id(sched)[2].start == 1
    assert sched.done


def test_jobs_take_whole_nodes_of_several_cores() -> None:
    sched, clock = scheduler(
        [job(1, submit=0, run=10, procs=5)], nodes=2, up=False, cores_per_node=4
    )
    demand = sched.take_snapshot().partitions[0]
    assert (demand.pending_jobs, demand.pending_cores, demand.pending_nodes) == (1, 5, 2)
    assert demand.oldest_pending_since == clock.now()
    sched.node_up("n0")
    sched.node_up("n1")
    snapshot = sched.take_snapshot()
    assert snapshot.running_jobs == 1
    assert [(n.cpus, n.cpus_allocated) for n in snapshot.nodes] == [(4, 4), (4, 4)]


def test_snapshot_reports_activity_and_idle_since_on_the_clock() -> None:
    sched, clock = scheduler([job(1, submit=0, run=100)], nodes=3, up=False)
    start = clock.now()
    sched.node_up("n0")
    clock.advance(40)
    sched.node_up("n1")
    clock.advance(100)
    snapshot = sched.take_snapshot()
    assert snapshot.taken_at == start + timedelta(seconds=140)
    assert [(n.name, n.activity, n.idle_since) for n in snapshot.nodes] == [
        ("n0", NodeActivity.IDLE, start + timedelta(seconds=100)),
        ("n1", NodeActivity.IDLE, start + timedelta(seconds=40)),
        ("n2", NodeActivity.DOWN, None),
    ]
    assert snapshot.nodes[0].partitions == ("batch",)


def test_origin_maps_trace_seconds_to_the_clock() -> None:
    clock = ManualClock()
    origin = clock.now() - timedelta(seconds=1000)  # trace second 1000 is now
    sched = SimulatedScheduler(
        [job(1, submit=1010, run=5)], clock, nodes=["a"], cores_per_node=1, origin=origin
    )
    sched.node_up("a")
    assert sched.next_event_at() == clock.now() + timedelta(seconds=10)
    clock.advance(10)
    assert sched.take_snapshot().running_jobs == 1
    assert sched.jobs[0].start == 1010


def test_unknown_nodes_are_refused_except_when_they_register() -> None:
    sched, _ = scheduler([], nodes=1)
    with pytest.raises(UnknownNodeError):
        sched.drain_nodes(["ghost"])
    with pytest.raises(UnknownNodeError):
        sched.node_down("ghost")
    sched.node_up("newcomer")
    assert [n.name for n in sched.take_snapshot().nodes] == ["n0", "newcomer"]


async def test_the_scheduler_interface_reads_and_acts_at_the_clock_time() -> None:
    simulated, clock = scheduler([job(1, submit=10, run=50), job(2, submit=20, run=5)], nodes=1)
    sched: Scheduler = simulated
    clock.advance(15)
    snapshot = await sched.snapshot()
    assert snapshot.running_jobs == 1
    await sched.drain(["n0"], reason="power-off")
    clock.advance(50)
    [node] = await sched.nodes()
    assert node.activity is NodeActivity.DRAINING and node.cpus_allocated == 0
    await sched.resume(["n0"])
    assert (await sched.snapshot()).running_jobs == 1
    assert simulated.jobs[1].start == 65


def test_the_bundled_slice_replays_completely_with_all_nodes_up() -> None:
    with open_swf(bundled_trace("SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz")) as reader:
        jobs = list(reader)
    sched, clock = scheduler(jobs, nodes=128)
    run_to_end(sched, clock)
    assert sched.done and not sched.rejected
    for j in sched.jobs:
        assert j.start is not None and j.start >= j.submit
        assert j.reservation is None or j.start <= j.reservation
