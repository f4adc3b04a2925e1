"""A scheduler that replays a workload trace with EASY backfilling, on the injected clock.

It stands in for Slurm in the single-process mode and in the trace simulator, so it implements the
same `Scheduler` interface and behaves like a batch scheduler: jobs arrive at their submit time,
wait in submit order, start on whole nodes that are up and not drained, run for their recorded run
time and free their nodes. Nodes are powered on and off from outside (`node_up` / `node_down`),
exactly as the pool would. The replay is a discrete-event loop over arrivals and completions, so a
year of trace takes seconds; `advance_to` lets an async service and a synchronous simulator drive it
alike. Times inside are float seconds since `origin`, the instant trace second 0 maps to.

EASY (Lifka 1995): the first waiting job gets a reservation at the earliest time enough nodes free
up, planned with requested run times; a later job may start now only if it ends by then or uses
nodes the first job will not need.

Power saving (`resume_seconds`, as Slurm's SuspendProgram/ResumeProgram): a node that runs no job
and cannot take one now (powered off, booting, or drained to be powered off) still counts in the
reservation, as available `resume_seconds` from now, the way Slurm plans jobs over powered-down
nodes and resumes them. So a power policy may stop nodes the first job waits for without the job
losing its reservation; the snapshot tells it that reservation (`HeadReservation`): when, and how
many of its nodes are kept idle or off for it rather than freed by running jobs by then. The job
itself starts only on nodes that are up: bringing the others up is the power policy's part.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice

from services.autogrow.swf import SwfJob
from shared.clock import Clock
from shared.scheduler import (
    MAX_SUBMISSIONS,
    HeadReservation,
    JobSubmission,
    NodeActivity,
    PartitionDemand,
    QueueSnapshot,
    SchedulerNode,
)

_INF = math.inf


class UnknownNodeError(KeyError):
    """A node name the scheduler does not know, as Slurm rejects an invalid node name."""


@dataclass(slots=True, eq=False)
class SimulatedJob:
    """One trace job's life in the replay. Times are seconds since the scheduler's origin."""

    job_id: int
    seq: int  # position in submit order: a stable tie-break for equal times
    submit: float
    run_time: float
    procs: int
    nodes_needed: int  # whole nodes: a job never shares a node
    estimate: float  # what EASY plans with: the requested time, never less than the recorded run
    start: float | None = None
    end: float | None = None
    nodes: tuple[str, ...] = ()
    reservation: float | None = None  # the start EASY first promised it while it led the queue
    interruptions: int = 0  # times a node under it was powered off and the job went back to wait


@dataclass(slots=True, eq=False)
class _Node:
    name: str
    index: int  # registration order: free nodes are taken lowest first, like Slurm's node order
    up: bool = False
    drained: bool = False
    job: SimulatedJob | None = None
    idle_since: float | None = None
    in_heap: bool = False
    available: bool = False  # up, not drained, no job
    busy_drained: bool = False  # drained with a job still on it
    view: SchedulerNode | None = field(default=None, repr=False)  # rebuilt only after a change


class SimulatedScheduler:
    """EASY backfilling over a trace's jobs on nodes switched on and off from outside.

    All nodes start down. A job needs ceil(procs / cores_per_node) whole nodes; one that needs more
    nodes than the scheduler knows when it arrives can never run, so it is rejected and listed in
    `rejected` instead of blocking the queue forever. A node powered off under a running job kills
    the job, which waits again in its submit-order place (counted in `interruptions`).
    """

    def __init__(
        self,
        jobs: Iterable[SwfJob],
        clock: Clock,
        *,
        nodes: Sequence[str],
        cores_per_node: int,
        origin: datetime | None = None,
        partition: str = "batch",
        resume_seconds: float | None = None,
    ) -> None:
        if cores_per_node < 1:
            raise ValueError("cores_per_node must be at least 1")
        if resume_seconds is not None and resume_seconds < 0:
            raise ValueError("resume_seconds must be >= 0")
        self.resume_seconds = resume_seconds  # None: no power saving, off nodes are not planned
        self._clock = clock
        self.origin = clock.now() if origin is None else origin
        self.partition = partition
        self.cores_per_node = cores_per_node
        ordered = sorted(jobs, key=lambda j: (j.submit, j.job_id))
        self.jobs = [
            SimulatedJob(
                job_id=j.job_id,
                seq=seq,
                submit=float(j.submit),
                run_time=float(j.run_time),
                procs=j.procs,
                nodes_needed=-(-j.procs // cores_per_node),
                estimate=float(max(j.run_time, j.requested_time or 0)),
            )
            for seq, j in enumerate(ordered)
        ]
        self.rejected: list[SimulatedJob] = []
        self._nodes: dict[str, _Node] = {}
        self._by_index: list[_Node] = []
        self._view_list: list[SchedulerNode] = []  # every node's view, by index
        for name in nodes:
            self._register(name)
        self._now = 0.0
        self._next_arrival = 0
        self._queue: list[SimulatedJob] = []  # waiting, in (submit, seq) order
        self._pending_cores = 0
        self._pending_nodes = 0
        self._completions: list[tuple[float, int, int, SimulatedJob]] = []  # (end, seq, try, job)
        self._planned: list[tuple[float, int, SimulatedJob]] = []  # (start + estimate, seq, job)
        self._free_heap: list[int] = []  # indexes of free nodes, plus stale ones skipped on pop
        self._free = 0  # nodes available now
        self._busy_drained = 0  # drained nodes still running a job: they free nothing at its end
        self._allocated = 0  # nodes running a job; the rest are free now or resumable
        self._running = 0
        self._node_views: tuple[SchedulerNode, ...] | None = None  # None: a node changed since
        self._stale: list[_Node] = []  # nodes whose view changed since `_node_views`

    # ---- driving the replay -------------------------------------------------------------------

    def advance_to(self, now: datetime) -> None:
        """Play every arrival and completion up to `now`; starts happen at the exact event times."""
        self._advance((now - self.origin).total_seconds())

    def next_event_at(self) -> datetime | None:
        """When the next arrival or completion happens, so an event-driven loop can jump there."""
        upcoming = min(self._next_arrival_time(), self._next_completion_time())
        return None if upcoming == _INF else self.origin + timedelta(seconds=upcoming)

    @property
    def done(self) -> bool:
        """Every job has arrived and none waits or runs."""
        return self._next_arrival >= len(self.jobs) and not self._queue and not self._running

    @property
    def pending_jobs(self) -> int:
        return len(self._queue)

    @property
    def running_jobs(self) -> int:
        return self._running

    @property
    def free_nodes(self) -> int:
        """Nodes up, not drained and running no job."""
        return self._free

    def recent_arrivals(self, seconds: float) -> tuple[tuple[datetime, int], ...]:
        """(submit time, whole nodes) of the jobs submitted in the last `seconds`, newest first:
        what squeue and sacct tell a live service about recent submissions."""
        self._catch_up()
        jobs, since = self.jobs, self._now - seconds
        found = []
        i = self._next_arrival - 1
        while i >= 0 and jobs[i].submit > since:
            found.append((self._at(jobs[i].submit), jobs[i].nodes_needed))
            i -= 1
        return tuple(found)

    def submissions(self, limit: int = MAX_SUBMISSIONS) -> tuple[JobSubmission, ...]:
        """The newest `limit` jobs that arrived, newest first, as a live scheduler lists them in
        the snapshot the service reads (`listed_snapshot`)."""
        self._catch_up()
        jobs, first = self.jobs, max(0, self._next_arrival - limit)
        return tuple(
            JobSubmission.model_construct(
                job_id=str(job.job_id),
                partition=self.partition,
                submitted_at=self._at(job.submit),
                nodes=job.nodes_needed,
                cores=job.procs,
            )
            for job in reversed(jobs[first : self._next_arrival])
        )

    def listed_snapshot(self) -> QueueSnapshot:
        """`take_snapshot` with the latest `submissions`: what the service's watcher reads. The
        trace simulator's engine takes the plain one and asks `recent_arrivals` directly."""
        snapshot = self.take_snapshot()
        return snapshot.model_copy(update={"submissions": self.submissions()})

    # ---- power and drain, from outside --------------------------------------------------------

    def node_up(self, name: str) -> None:
        """The node booted and registered (an unknown name registers a new node)."""
        self._catch_up()
        node = self._nodes.get(name) or self._register(name)
        if not node.up:
            node.up = True
            self._settle(node)
            self._schedule()

    def node_down(self, name: str) -> None:
        """The node powered off; a job running on it is killed and waits again."""
        self._catch_up()
        node = self._node(name)
        if not node.up:
            return
        if node.job is not None:
            self._interrupt(node.job)
        node.up = False
        self._settle(node)
        self._schedule()

    def drain_nodes(self, names: Sequence[str]) -> None:
        """No new jobs on these nodes; running jobs finish."""
        self._catch_up()
        for node in [self._node(name) for name in names]:
            if not node.drained:
                node.drained = True
                self._settle(node)
        self._schedule()

    def resume_nodes(self, names: Sequence[str]) -> None:
        """These nodes take jobs again (once they are up)."""
        self._catch_up()
        for node in [self._node(name) for name in names]:
            if node.drained:
                node.drained = False
                self._settle(node)
        self._schedule()

    def take_snapshot(self, with_nodes: bool = True) -> QueueSnapshot:
        """The queue and the nodes at the clock's now, synchronously (the queue alone, as squeue
        tells it, without `with_nodes`)."""
        self._catch_up()
        head = self._queue[0] if self._queue else None
        demand = PartitionDemand(
            partition=self.partition,
            pending_jobs=len(self._queue),
            pending_cores=self._pending_cores,
            pending_nodes=self._pending_nodes,
            oldest_pending_since=None if head is None else self._at(head.submit),
        )
        # built from values this class made and validated: validating 10,000 nodes again on
        # every step was a third of a simulator run's time
        return QueueSnapshot.model_construct(
            taken_at=self._clock.now(),
            partitions=(demand,),
            running_jobs=self._running,
            nodes=self._views() if with_nodes else (),
            reservation=None if head is None else self.head_reservation(),
        )

    def head_reservation(self) -> HeadReservation | None:
        """The first waiting job's reservation, with power saving on (None without, or with no
        job waiting): when it starts at the latest and how many nodes are kept for it."""
        self._catch_up()
        if self.resume_seconds is None or not self._queue:
            return None
        queue = self._queue
        head = queue[0]
        start, extra, released = self._plan(head)
        if start == _INF:
            return None
        off = len(self._by_index) - self._allocated  # nodes that run no job
        held = min(max(head.nodes_needed - released, 0), off)
        # the jobs behind it that EASY would start now if every node were up: nodes to power on
        wanted = 0
        if off > self._free:
            now, room = self._now, off
            for job in islice(queue, 1, None):
                need = job.nodes_needed
                if need > room:
                    continue
                if now + job.estimate > start:
                    if need > extra:
                        continue
                    extra -= need
                room -= need
                wanted += need
                if room == 0:
                    break
        return HeadReservation.model_construct(
            start=self._at(start),
            nodes=head.nodes_needed,
            held=held,
            backfill=max(wanted - self._free, 0),
        )

    # ---- the Scheduler interface --------------------------------------------------------------

    async def snapshot(self) -> QueueSnapshot:
        return self.listed_snapshot()

    async def nodes(self) -> Sequence[SchedulerNode]:
        self._catch_up()
        return self._views()

    async def drain(self, node_names: Sequence[str], reason: str) -> None:
        self.drain_nodes(node_names)

    async def resume(self, node_names: Sequence[str]) -> None:
        self.resume_nodes(node_names)

    # ---- the event loop -----------------------------------------------------------------------

    def _catch_up(self) -> None:
        self.advance_to(self._clock.now())

    def _next_arrival_time(self) -> float:
        jobs = self.jobs
        return jobs[self._next_arrival].submit if self._next_arrival < len(jobs) else _INF

    def _next_completion_time(self) -> float:
        return self._completions[0][0] if self._completions else _INF

    def _advance(self, until: float) -> None:
        jobs, completions = self.jobs, self._completions
        total = len(jobs)
        while True:
            arrival = jobs[self._next_arrival].submit if self._next_arrival < total else _INF
            completion = completions[0][0] if completions else _INF
            at = arrival if arrival < completion else completion
            if at > until:
                break
            self._now = at
            while completions and completions[0][0] == at:
                _, _, attempt, job = heapq.heappop(completions)
                if attempt == job.interruptions:  # else the entry of a killed run
                    self._release(job)
            while self._next_arrival < total and jobs[self._next_arrival].submit == at:
                self._arrive(jobs[self._next_arrival])
                self._next_arrival += 1
            self._schedule()
        if until > self._now:
            self._now = until

    def _arrive(self, job: SimulatedJob) -> None:
        if job.nodes_needed > len(self._nodes):
            self.rejected.append(job)
            return
        self._enqueue(job)

    def _enqueue(self, job: SimulatedJob) -> None:
        insort(self._queue, job, key=lambda j: (j.submit, j.seq))
        self._pending_cores += job.procs
        self._pending_nodes += job.nodes_needed

    def _schedule(self) -> None:
        """One EASY pass: start queue heads in order, then backfill behind the first that waits."""
        queue = self._queue
        if not queue or self._free == 0:
            return
        now = self._now
        started = 0
        while started < len(queue) and queue[started].nodes_needed <= self._free:
            self._start(queue[started])
            started += 1
        if started:
            del queue[:started]
        if len(queue) < 2 or self._free == 0:
            return
        head = queue[0]
        shadow = -1.0  # computed on the first job that fits, since most passes backfill nothing
        extra = 0
        backfilled = False
        for index in range(1, len(queue)):
            job = queue[index]
            if job.nodes_needed > self._free:
                continue
            if shadow < 0:
                shadow, extra, _ = self._plan(head)
                if head.reservation is None and shadow != _INF:
                    head.reservation = shadow
            if now + job.estimate > shadow:  # still running at the reservation: spare nodes only
                if job.nodes_needed > extra:
                    continue
                extra -= job.nodes_needed
            self._start(job)
            backfilled = True
            if self._free == 0:
                break
        if backfilled:
            queue[:] = [job for job in queue if job.start is None]

    def _plan(self, head: SimulatedJob) -> tuple[float, int, int]:
        """When the head job can start at the latest, how many nodes it leaves free then, and
        how many nodes running jobs free by then.

        Running jobs are assumed to run their full estimate, so the head starts by this time
        whatever jobs backfill under the rule. With power saving, the nodes that run no job and
        are not free now join `resume_seconds` from now. Without it, with too few nodes up the
        head can never be reserved (infinite), and backfilling is unrestricted until more nodes
        come up.
        """
        free = self._free
        need = head.nodes_needed
        planned = self._planned
        exact = self._busy_drained == 0
        released = 0
        resumable = 0  # joins at `resumed_at`
        resumed_at = _INF
        if self.resume_seconds is not None:
            resumable = len(self._by_index) - free - self._allocated
            if resumable:
                resumed_at = self._now + self.resume_seconds
        for i, (end, _, job) in enumerate(planned):
            if resumed_at <= end:
                free += resumable
                if free >= need:
                    return resumed_at, free - need, released
                resumed_at = _INF
            freed = job.nodes_needed if exact else self._releasable(job)
            free += freed
            released += freed
            if free >= need:
                for later_end, _, later in islice(planned, i + 1, None):
                    if later_end != end:
                        break
                    freed = later.nodes_needed if exact else self._releasable(later)
                    free += freed
                    released += freed
                return end, free - need, released
        if resumed_at != _INF and free + resumable >= need:
            return resumed_at, free + resumable - need, released
        return _INF, 0, released

    def _releasable(self, job: SimulatedJob) -> int:
        return sum(not self._nodes[name].drained for name in job.nodes)

    def _start(self, job: SimulatedJob) -> None:
        """Put the job on the lowest free nodes. The hot path: `_settle` inlined for free nodes."""
        now = self._now
        taken: list[str] = []
        heap, by_index = self._free_heap, self._by_index
        while len(taken) < job.nodes_needed:
            node = by_index[heapq.heappop(heap)]
            node.in_heap = False
            if node.available:
                node.job = job
                node.available = False
                node.idle_since = None
                node.view = None
                self._stale.append(node)
                taken.append(node.name)
        self._node_views = None
        self._free -= job.nodes_needed
        job.start = now
        job.end = now + job.run_time
        job.nodes = tuple(taken)
        self._allocated += len(taken)
        heapq.heappush(self._completions, (job.end, job.seq, job.interruptions, job))
        insort(self._planned, (now + job.estimate, job.seq, job))
        self._pending_cores -= job.procs
        self._pending_nodes -= job.nodes_needed
        self._running += 1

    def _release(self, job: SimulatedJob) -> None:
        """Free a running job's nodes (all up) and forget its plan, finished or killed."""
        assert job.start is not None
        planned = self._planned
        del planned[bisect_left(planned, (job.start + job.estimate, job.seq))]
        self._running -= 1
        self._allocated -= len(job.nodes)
        nodes = self._nodes
        for name in job.nodes:
            node = nodes[name]
            node.job = None
            if node.drained:
                self._settle(node)
                continue
            node.available = True
            node.idle_since = self._now
            node.view = None
            self._stale.append(node)
            self._node_views = None
            self._free += 1
            if not node.in_heap:
                node.in_heap = True
                heapq.heappush(self._free_heap, node.index)

    def _interrupt(self, job: SimulatedJob) -> None:
        self._release(job)
        job.start = job.end = job.reservation = None
        job.nodes = ()
        job.interruptions += 1
        self._enqueue(job)

    # ---- nodes --------------------------------------------------------------------------------

    def _register(self, name: str) -> _Node:
        node = _Node(name=name, index=len(self._nodes))
        self._node_views = None
        self._view_list.append(self._view(node))
        self._nodes[name] = node
        self._by_index.append(node)
        return node

    def _node(self, name: str) -> _Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise UnknownNodeError(name) from None

    def _settle(self, node: _Node) -> None:
        """Bring a node's derived state and the free count in line after any change to it."""
        node.view = None
        self._stale.append(node)
        self._node_views = None
        available = node.up and not node.drained and node.job is None
        if available != node.available:
            node.available = available
            if available:
                self._free += 1
                if not node.in_heap:
                    node.in_heap = True
                    heapq.heappush(self._free_heap, node.index)
            else:
                self._free -= 1
        busy_drained = node.drained and node.job is not None
        if busy_drained != node.busy_drained:
            node.busy_drained = busy_drained
            self._busy_drained += 1 if busy_drained else -1
        idle = node.up and node.job is None
        if not idle:
            node.idle_since = None
        elif node.idle_since is None:
            node.idle_since = self._now

    def _views(self) -> tuple[SchedulerNode, ...]:
        """Every node's view; the same tuple until a node changes, since the trace simulator
        takes a snapshot per policy step and most steps follow a change to a few nodes only."""
        views = self._node_views
        if views is None:
            listed = self._view_list
            for node in self._stale:
                if node.view is None:  # a node changed twice is listed twice
                    listed[node.index] = self._view(node)
            self._stale.clear()
            views = self._node_views = tuple(listed)
        return views

    def _view(self, node: _Node) -> SchedulerNode:
        cores = self.cores_per_node
        if not node.up:
            activity = NodeActivity.DOWN
        elif node.drained:
            activity = NodeActivity.DRAINING
        elif node.job is not None:
            activity = NodeActivity.BUSY
        else:
            activity = NodeActivity.IDLE
        node.view = SchedulerNode.model_construct(  # from this class's own checked state
            name=node.name,
            activity=activity,
            cpus=cores,
            cpus_allocated=0 if node.job is None else cores,
            partitions=(self.partition,),
            idle_since=None if node.idle_since is None else self._at(node.idle_since),
        )
        return node.view

    def _at(self, seconds: float) -> datetime:
        return self.origin + timedelta(seconds=seconds)
