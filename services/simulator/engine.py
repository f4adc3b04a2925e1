"""The trace simulator's event loop: one trace, one pool, one power policy, on a manual clock.

The simulated scheduler (EASY backfilling) plays arrivals and completions; the engine owns the
pool's power (a node is billed from its power-on, takes jobs `boot_seconds` later, or
`launch_seconds` for a policy without a warm pool) and wakes the policy the way a reconcile loop
would, without stepping through the idle seconds in between:

- at once when a job has to wait and a node is stopped (new demand is the hint that runs a
  reconcile loop now), and when a node finished booting (it was started for a waiting job);
- at the next tick of the policy's reconcile interval after any other change (completions), or
  later where that provably changes no decision (`_observe_by`: a saturated pool, an idle limit);
- at the time the policy itself asked for (an idle limit, a paid hour, `decide()`'s
  `recheck_at`): the instant time alone changes its answer.

Between those wakes the policy's inputs do not change, and every policy here is level-triggered,
so asking it more often would only repeat its last answer. This matters: `decide()` costs about
0.3 ms per call on a 338-node pool, and CTC-SP2 has 150,000 arrivals and completions. The run
ends when the last job ends; the nodes still running then are powered off and billed up to then.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from services.autogrow.billing import DEFAULT_RULES, BillingRules, billed_seconds
from services.autogrow.simulated import SimulatedJob, SimulatedScheduler
from services.autogrow.swf import SwfJob
from services.simulator.warm_pool import Provisioning, provision_warm_pool
from shared.clock import ManualClock
from shared.events import BillingModel
from shared.scheduler import QueueSnapshot

_INF = math.inf
PROGRESS_EVERY = 4096  # loop turns between two progress reports


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The pool and the cloud a trace is replayed on (the CLI's options)."""

    nodes: int
    cores_per_node: int
    billing: BillingModel = BillingModel.PER_SECOND
    boot_seconds: float = 60.0  # start of a stopped (warm) node to taking jobs, billed
    launch_seconds: float = 600.0  # cold launch from the image to taking jobs, billed
    reconcile_seconds: float = 60.0  # a policy's loop interval for changes that are not urgent
    rules: BillingRules = DEFAULT_RULES

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.cores_per_node < 1:
            raise ValueError("nodes and cores per node must be at least 1")
        if min(self.boot_seconds, self.launch_seconds) < 0 or self.reconcile_seconds <= 0:
            raise ValueError("boot and launch seconds must be >= 0, the reconcile interval > 0")


class Policy(Protocol):
    """A power policy as the engine drives it; see `services.simulator.policies`."""

    name: str
    warm_pool: bool  # starts stopped nodes (boot_seconds) rather than launching (launch_seconds)
    reacts_to_queue: bool  # woken at once by a waiting job or a booted node
    wakes_on_arrival: bool  # woken at once by any arrival (it warms nodes for what comes next)
    interval: float | None  # its own reconcile interval; None: the config's

    def setup(self, cluster: Cluster) -> None:
        """Called once at the first arrival, before any job is placed."""
        ...

    def patience(self, cluster: Cluster) -> float:
        """How long a change may go unseen while no job waits without changing what the policy
        does (0: see it at the next reconcile tick). Used only if it reacts to the queue."""
        ...

    def step(self, cluster: Cluster) -> float | None:
        """Look and act; return when time alone would change the answer (None: never)."""
        ...


class Cluster:
    """The pool's nodes and the scheduler, as a policy sees and drives them.

    Times are float seconds since `origin` (trace second 0); node `i` is `names[i]` in the
    scheduler. Powering a node on bills it from now; powering it off stops the bill.
    """

    def __init__(
        self,
        jobs: Sequence[SwfJob],
        config: SimConfig,
        origin: datetime,
        start: float,
        boot_delay: float,
    ) -> None:
        self.config = config
        self.origin = origin
        self.now = start
        self.clock = ManualClock(self.at(start))
        self.names = [f"node{i + 1:04d}" for i in range(config.nodes)]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.scheduler = SimulatedScheduler(
            jobs,
            self.clock,
            nodes=self.names,
            cores_per_node=config.cores_per_node,
            origin=origin,
            resume_seconds=boot_delay,  # power saving: stopped nodes count in EASY's plan
        )
        self.boot_delay = boot_delay
        self.on_since: list[float | None] = [None] * config.nodes  # billing start, None: off
        self.ready_at: list[float] = [0.0] * config.nodes  # when it registers (registered)
        self.stopped: set[int] = set(range(config.nodes))
        self.booting: dict[int, float] = {}  # node -> when it registers
        self._boot_heap: list[tuple[float, int]] = []
        self.intervals: list[tuple[int, float, float, float]] = []  # (node, on, ready, off)
        self.billed = 0.0
        self.starts = 0
        self.running_changes: list[tuple[float, int]] = [(start, 0)]  # (time, nodes powered)

    def at(self, seconds: float) -> datetime:
        return self.origin + timedelta(seconds=seconds)

    def snapshot(self) -> QueueSnapshot:
        return self.scheduler.take_snapshot()

    @property
    def powered(self) -> int:
        return self.config.nodes - len(self.stopped)

    def power_on(self, nodes: Sequence[int], delay: float | None = None) -> None:
        """Start stopped nodes; each registers with the scheduler after `delay` (default: the
        policy's boot or launch time)."""
        ready = self.now + (self.boot_delay if delay is None else delay)
        for i in nodes:
            if i not in self.stopped:
                raise ValueError(f"{self.names[i]} is not stopped")
            self.stopped.discard(i)
            self.on_since[i] = self.now
            self.ready_at[i] = ready
            self.starts += 1
            if ready <= self.now:
                self.scheduler.node_up(self.names[i])
            else:
                self.booting[i] = ready
                heapq.heappush(self._boot_heap, (ready, i))
        self._record_running()

    def power_off(self, nodes: Sequence[int]) -> None:
        """Stop running or booting nodes and bill their run (a job on one is killed: the
        scheduler puts it back in the queue, and the run counts the interruption)."""
        now = self.now
        model, rules = self.config.billing, self.config.rules
        for i in nodes:
            since = self.on_since[i]
            if since is None:
                raise ValueError(f"{self.names[i]} is already off")
            self.scheduler.node_down(self.names[i])
            self.booting.pop(i, None)
            self.on_since[i] = None
            self.stopped.add(i)
            self.intervals.append((i, since, min(self.ready_at[i], now), now))
            self.billed += billed_seconds(model, now - since, rules)
        self._record_running()

    def drain(self, nodes: Sequence[int]) -> None:
        self.scheduler.drain_nodes([self.names[i] for i in nodes])

    def resume(self, nodes: Sequence[int]) -> None:
        self.scheduler.resume_nodes([self.names[i] for i in nodes])

    def next_boot(self) -> float:
        heap = self._boot_heap
        while heap and self.booting.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # a node powered off (or restarted) while it booted
        return heap[0][0] if heap else _INF

    def finish_boots(self) -> bool:
        """Register every node whose boot is over by now; True if any did."""
        finished = False
        while self.next_boot() <= self.now:
            _, i = heapq.heappop(self._boot_heap)
            del self.booting[i]
            self.scheduler.node_up(self.names[i])
            finished = True
        return finished

    def _record_running(self) -> None:
        powered = self.powered
        changes = self.running_changes
        if changes[-1][0] == self.now:
            changes[-1] = (self.now, powered)
        elif changes[-1][1] != powered:
            changes.append((self.now, powered))


@dataclass(slots=True)
class RunResult:
    """One policy's replay: every job's record, every node's powered intervals, the bill."""

    policy: str
    config: SimConfig
    origin: datetime
    names: list[str]
    jobs: list[SimulatedJob]  # submit order; start is None for a job that never ran
    start: float  # first arrival
    end: float  # last completion (or when the replay stopped)
    intervals: list[tuple[int, float, float, float]]  # (node, on, registered, off)
    billed_seconds: float
    starts: int
    running_changes: list[tuple[float, int]]
    steps: int  # policy calls
    wall_seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    provisioning: Provisioning | None = None


def origin_of(unix_start_time: int | None) -> datetime:
    """The instant trace second 0 maps to: the header's UnixStartTime, or the epoch."""
    return datetime.fromtimestamp(unix_start_time or 0, tz=UTC)


def run(
    jobs: Sequence[SwfJob],
    config: SimConfig,
    policy: Policy,
    *,
    origin: datetime | None = None,
    skipped: dict[str, int] | None = None,
    progress: Callable[[float], None] | None = None,
    shortcuts: bool = True,
) -> RunResult:
    """Replay `jobs` (each must fit the pool) under `policy`; `progress` gets the trace fraction.

    `shortcuts=False` steps the policy at the reconcile tick after every change, ignoring its
    patience and saturation: slower, and the same result, which the tests check.
    """
    started = time.perf_counter()
    if not jobs:
        raise ValueError("no job to simulate")
    if any(-(-j.procs // config.cores_per_node) > config.nodes for j in jobs):
        raise ValueError("a job needs more nodes than the pool has: filter with `fitting`")
    origin = origin_of(None) if origin is None else origin
    arrivals = sorted(j.submit for j in jobs)
    first, last_arrival = float(arrivals[0]), float(arrivals[-1])
    delay = config.boot_seconds if policy.warm_pool else config.launch_seconds
    cluster = Cluster(jobs, config, origin, first, delay)
    provisioning = None
    if policy.warm_pool:
        before = cluster.at(first) - timedelta(seconds=3 * config.launch_seconds)
        provisioning = provision_warm_pool(
            config.nodes, config.launch_seconds, config.billing, config.rules, before
        )
    scheduler, clock = cluster.scheduler, cluster.clock
    interval = policy.interval or config.reconcile_seconds
    reacts = policy.reacts_to_queue
    policy.setup(cluster)
    wake = _INF
    tick = _INF  # when the policy must see the changes since its last step
    unseen_since = _INF  # the first change since then
    seen_empty = True  # no job waited at its last step
    next_arrival = 0
    steps = turns = 0
    span = max(last_arrival - first, 1.0)
    now = first
    while True:
        upcoming = scheduler.next_event_at()
        event = _INF if upcoming is None else (upcoming - origin).total_seconds()
        now = min(event, cluster.next_boot(), wake, tick)
        if now == _INF:
            break  # nothing will ever happen again; any job still waiting never runs
        cluster.now = now
        clock.set(cluster.at(now))
        urgent = changed = False
        if event <= now:
            scheduler.advance_to(clock.now())
            changed = True
            arrived = False
            while next_arrival < len(arrivals) and arrivals[next_arrival] <= now:
                next_arrival += 1
                arrived = True
            if scheduler.done:
                break
            urgent = (
                arrived
                and reacts
                and bool(cluster.stopped)
                and (scheduler.pending_jobs > 0 or policy.wakes_on_arrival)
            )
        if cluster.finish_boots():
            changed = True
            urgent = urgent or reacts
        if changed and not urgent:
            if unseen_since == _INF:
                unseen_since = now
            if shortcuts:
                observe_by = _observe_by(cluster, policy, interval, unseen_since, seen_empty)
            else:
                observe_by = math.floor(now / interval) * interval + interval
            tick = min(tick, observe_by)
        if urgent or now >= wake or now >= tick:
            asked = policy.step(cluster)
            steps += 1
            wake = _INF if asked is None else max(asked, now)
            tick = unseen_since = _INF
            seen_empty = scheduler.pending_jobs == 0
        turns += 1
        if progress is not None and turns % PROGRESS_EVERY == 0:
            progress(min(1.0, (now - first) / span))
    end = max((j.end for j in scheduler.jobs if j.end is not None), default=now)
    cluster.now = max(now, end) if scheduler.done else now
    clock.set(cluster.at(cluster.now))
    running = [i for i in range(config.nodes) if cluster.on_since[i] is not None]
    if running:
        cluster.power_off(running)
    if progress is not None:
        progress(1.0)
    return RunResult(
        policy=policy.name,
        config=config,
        origin=origin,
        names=cluster.names,
        jobs=scheduler.jobs,
        start=first,
        end=cluster.now,
        intervals=cluster.intervals,
        billed_seconds=cluster.billed,
        starts=cluster.starts,
        running_changes=cluster.running_changes,
        steps=steps,
        wall_seconds=time.perf_counter() - started,
        skipped=dict(skipped or {}),
        provisioning=provisioning,
    )


def _observe_by(
    cluster: Cluster, policy: Policy, interval: float, unseen_since: float, seen_empty: bool
) -> float:
    """When the policy must see the changes it has not seen (the first at `unseen_since`).

    At the next reconcile tick, with two exceptions that change no decision, only how often the
    policy is asked (`shortcuts=False` checks this). While the pool is saturated (jobs wait, every
    node is up and none boots), a queue-aware rule can neither start a node nor stop one the
    waiting jobs want, and time changes nothing, so it need not look (unless it stops idle nodes
    kept for the first waiting job's reservation, `stops_held_nodes`, and one is idle). While no
    job waits, and none
    did when it last looked (so every idle node it saw has its wake-up), a node freed since then
    cannot fall due before its idle limit counted from `unseen_since`: the policy reads idle times
    from the scheduler, not from when it looked.
    """
    now = cluster.now
    tick = math.floor(now / interval) * interval + interval
    patience = policy.patience(cluster)
    if patience == _INF:
        return _INF
    if not policy.reacts_to_queue:
        return tick
    if cluster.scheduler.pending_jobs == 0:
        return max(tick, unseen_since + patience) if seen_empty else tick
    # a policy that stops idle nodes kept for the first waiting job's reservation may act even so
    stops_held = getattr(policy, "stops_held_nodes", False) and cluster.scheduler.free_nodes > 0
    if not cluster.stopped and not cluster.booting and not stops_held:
        return _INF
    return tick


def fitting(jobs: Sequence[SwfJob], nodes: int, cores_per_node: int) -> tuple[list[SwfJob], int]:
    """The jobs that fit a pool of `nodes`, and how many did not (skipped and counted)."""
    kept = [j for j in jobs if -(-j.procs // cores_per_node) <= nodes]
    return kept, len(jobs) - len(kept)
