"""The power policies the simulator compares: the field's rules and hpcfleet's own `decide()`.

Every policy sees only what it would see in production: the scheduler's snapshot (queue and nodes)
or, for the auto scaling group, aggregate numbers on a 5-minute period. The elastic rules share one
reading of demand (the whole nodes the waiting jobs ask for, against the nodes idle or booting) so
that the comparison is about when nodes go down, not about how demand is counted:

- `always-on`: the fixed cluster, every node up from the first arrival to the last completion.
- `idle-600` / `idle-300`: an idle node goes down after 10 (ParallelCluster's and AWS PCS's
  default) or 5 minutes (CycleCloud's). Nodes are started from the same warm pool as hpcfleet's,
  so the comparison isolates the rule; with ParallelCluster's cold launches their waits would be
  longer, not their bills lower.
- `asg-5min`: EC2 Auto Scaling target tracking, with cold launches and no scheduler knowledge.
- `hour-boundary`: the original rule: an idle node runs until minute 55 of its paid hour.
- `hpcfleet`: the real `decide()` of autogrow with its production settings.
- `hpcfleet-warm`: the same `decide()` with its warm reserve on (`WARM_TUNING`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import Any

from services.autogrow.policy import (
    PolicySettings,
    PoolNodeView,
    QueueOutlook,
    _ceil_timedelta,
    decide,
    demand_nodes,
    held_for_reservation,
)
from services.simulator.engine import Cluster, Policy
from shared.events import BillingModel, PowerState
from shared.scheduler import NodeActivity, QueueSnapshot

_IDLE = NodeActivity.IDLE


def _demand(snapshot: QueueSnapshot, cores_per_node: int) -> int:
    """Whole nodes the waiting jobs ask for (as `decide()` counts them)."""
    return sum(
        max(p.pending_nodes, -(-p.pending_cores // cores_per_node)) for p in snapshot.partitions
    )


def _idle(cluster: Cluster, snapshot: QueueSnapshot) -> list[tuple[float, int]]:
    """(idle since, node) for every up node with no job, in node order."""
    origin, index = cluster.origin, cluster.index
    return [
        ((n.idle_since - origin).total_seconds(), index[n.name])
        for n in snapshot.nodes
        if n.activity is _IDLE and n.idle_since is not None
    ]


class AlwaysOn:
    """The fixed cluster: all nodes up for the whole trace, registered from the first second."""

    name = "always-on"
    warm_pool = True
    reacts_to_queue = False
    wakes_on_arrival = False
    interval: float | None = None

    def setup(self, cluster: Cluster) -> None:
        cluster.power_on(sorted(cluster.stopped), delay=0.0)

    def patience(self, cluster: Cluster) -> float:
        return math.inf

    def step(self, cluster: Cluster) -> float | None:
        return None


class _Reactive(ABC):
    """Start stopped nodes for waiting jobs at once; let idle nodes beyond demand go when `due`.

    Nodes are started lowest-numbered first (Slurm's node order); of the idle nodes that may go,
    the longest idle go first.
    """

    name = "reactive"
    warm_pool = True
    reacts_to_queue = True
    wakes_on_arrival = False
    interval: float | None = None

    def setup(self, cluster: Cluster) -> None:
        return None

    def patience(self, cluster: Cluster) -> float:
        return 0.0

    @abstractmethod
    def due_at(self, cluster: Cluster, node: int, idle_since: float) -> float:
        """When this idle node may go down."""

    def step(self, cluster: Cluster) -> float | None:
        snapshot = cluster.snapshot()
        demand = _demand(snapshot, cluster.config.cores_per_node)
        idle = _idle(cluster, snapshot)
        supply = len(idle) + len(cluster.booting)
        if demand > supply and cluster.stopped:
            cluster.power_on(sorted(cluster.stopped)[: demand - supply])
        may_go = supply - demand
        if may_go <= 0:
            return None  # time alone changes nothing: every idle node is wanted
        now = cluster.now
        idle.sort()
        due = [(self.due_at(cluster, i, since), i) for since, i in idle]
        going = [i for at, i in due if at <= now][:may_go]
        if going:
            cluster.power_off(going)
        later = [at for at, _ in due if at > now]
        return min(later) if later and len(going) < may_go else None


class IdleTimeout(_Reactive):
    """Power off a node idle for `seconds` (if no waiting job wants it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.name = f"idle-{seconds:.0f}"

    def patience(self, cluster: Cluster) -> float:
        return self.seconds

    def due_at(self, cluster: Cluster, node: int, idle_since: float) -> float:
        return idle_since + self.seconds


class HourBoundary(_Reactive):
    """The original rule: an idle node runs until minute 55 of its paid hour, billing or not."""

    name = "hour-boundary"
    MINUTE = 55

    def due_at(self, cluster: Cluster, node: int, idle_since: float) -> float:
        since = cluster.on_since[node]
        assert since is not None
        hour = cluster.config.rules.hour
        up_for = cluster.now - since
        return since + math.floor(up_for / hour) * hour + self.MINUTE * 60


class TargetTracking:
    """EC2 Auto Scaling target tracking, cold launches, no knowledge of the scheduler's nodes.

    The metric is what such a group can have without a scheduler integration: the nodes the
    running and waiting jobs ask for, published every 5 minutes (standard CloudWatch resolution);
    the target keeps one instance per node of work. A scaling activity is followed by a 300 s
    cooldown; it scales in only after three periods below target (target tracking's scale-in alarm
    waits 15 minutes), terminating instances by the default termination policy (closest to the
    next instance hour) among those not protected: a node protects itself from scale-in while it
    runs a job, as AWS advises for long-running work. Instances are launched, never stopped.
    """

    name = "asg-5min"
    warm_pool = False
    reacts_to_queue = False
    wakes_on_arrival = False
    PERIOD = 300.0
    COOLDOWN = 300.0
    SCALE_IN_PERIODS = 3

    def __init__(self) -> None:
        self.interval: float | None = self.PERIOD
        self.cooldown_until = -math.inf
        self.below = 0  # consecutive periods with capacity above the metric

    def setup(self, cluster: Cluster) -> None:
        return None

    def patience(self, cluster: Cluster) -> float:
        return 0.0

    def step(self, cluster: Cluster) -> float | None:
        now = cluster.now
        snapshot = cluster.snapshot()
        busy = sum(1 for n in snapshot.nodes if n.cpus_allocated > 0)
        wanted = min(cluster.config.nodes, busy + _demand(snapshot, cluster.config.cores_per_node))
        capacity = cluster.powered
        self.below = self.below + 1 if wanted < capacity else 0
        next_period = math.floor(now / self.PERIOD) * self.PERIOD + self.PERIOD
        if now < self.cooldown_until:
            return next_period if wanted != capacity else None
        if wanted > capacity:
            cluster.power_on(sorted(cluster.stopped)[: wanted - capacity])
            self.cooldown_until = now + self.COOLDOWN
            return None
        if wanted < capacity:
            if self.below < self.SCALE_IN_PERIODS:
                return next_period
            protected = {cluster.index[n.name] for n in snapshot.nodes if n.cpus_allocated > 0}
            hour = cluster.config.rules.hour
            victims = sorted(
                (-((now - since) % hour), i)
                for i, since in enumerate(cluster.on_since)
                if since is not None and i not in protected
            )
            going = [i for _, i in victims[: capacity - wanted]]
            if going:
                cluster.power_off(going)
                self.cooldown_until = now + self.COOLDOWN
            self.below = 0
            return next_period if len(going) < capacity - wanted else None
        return None


class Hpcfleet:
    """autogrow's `decide()` as the service runs it: drain, then power off once drained.

    A drain takes effect at once in the simulated scheduler, so the pass that drained a node
    decides again at the same instant, as the service's next pass would after re-reading the
    scheduler.
    """

    name = "hpcfleet"
    warm_pool = True
    reacts_to_queue = True
    interval: float | None = None
    stops_held_nodes = True  # decide() may stop idle nodes kept for a far reservation
    skip_idle_steps = True  # skip decide() where `_quiet_until` shows it does nothing
    PASSES = 4  # decide, act, look again: drains then power-offs settle within two passes

    def __init__(
        self,
        settings: PolicySettings | None = None,
        name: str = "hpcfleet",
        tuning: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.tuning = tuning or {}  # settings beside the pool's cores, when none are given
        self.views: list[PoolNodeView] = []
        self.draining: set[int] = set()  # nodes up or booting that autogrow drained
        self.wakes_on_arrival = False

    def setup(self, cluster: Cluster) -> None:
        config = cluster.config
        if self.settings is None:
            self.settings = PolicySettings(
                cores_per_node=config.cores_per_node,
                reserved_wake_seconds=config.boot_seconds,
                **self.tuning,
            )
        self.stops_held_nodes = self.settings.reserved_risk_seconds is not None
        self.wakes_on_arrival = self.settings.warm_starts and self.settings.warm_max_nodes > 0
        since = cluster.at(cluster.now)
        self.views = [
            PoolNodeView(name, name, PowerState.STOPPED, since, config.billing)
            for name in cluster.names
        ]

    def patience(self, cluster: Cluster) -> float:
        """Per-second billing: a node freed now is not due before the idle grace (`decide()`'s
        rule); hourly billing: it may be due at once, in the last minutes of its paid hour.

        With a warm reserve, none: a node freed now joins the reserve (the most lately idle are
        warm) and pushes the longest idle of it out, and that one is due at its own idle start
        plus `idle_seconds`, which may be now."""
        assert self.settings is not None, "setup() first"
        settings = self.settings
        warm = settings.warm_max_nodes and settings.warm_window_seconds
        if cluster.config.billing is BillingModel.PER_SECOND and not warm:
            return settings.idle_seconds
        return 0.0

    def step(self, cluster: Cluster) -> float | None:
        assert self.settings is not None, "setup() first"
        views, rules, settings = self.views, cluster.config.rules, self.settings
        index = cluster.index
        now = cluster.at(cluster.now)
        if self.skip_idle_steps:
            quiet = self._quiet_until(cluster, now)
            if quiet is not None:
                return None if quiet == math.inf else quiet
        arrivals = cluster.scheduler.recent_arrivals(settings.warm_window_seconds)
        decision = None
        for _ in range(self.PASSES):
            outlook = QueueOutlook(arrivals)
            decision = decide(cluster.snapshot(), views, rules, now, settings, outlook)
            if decision.power_on:
                started = [index[a.scheduler_name] for a in decision.power_on]
                cluster.power_on(started)
                for i in started:
                    views[i] = _with(views[i], PowerState.RUNNING, now, views[i].drain_requested)
                    if views[i].drain_requested:
                        self.draining.add(i)
            for actions, drain in ((decision.drain, True), (decision.resume, False)):
                if actions:
                    nodes = [index[a.scheduler_name] for a in actions]
                    (cluster.drain if drain else cluster.resume)(nodes)
                    for i in nodes:
                        view = views[i]
                        views[i] = _with(view, view.power, view.since, drain)
                        (self.draining.add if drain else self.draining.discard)(i)
            if decision.power_off:
                stopped = [index[a.scheduler_name] for a in decision.power_off]
                cluster.power_off(stopped)
                for i in stopped:
                    views[i] = _with(views[i], PowerState.STOPPED, now, views[i].drain_requested)
                    self.draining.discard(i)
            if not (decision.drain or decision.resume):
                break
        assert decision is not None
        at = decision.recheck_at
        return None if at is None else (at - cluster.origin).total_seconds()

    def _quiet_until(self, cluster: Cluster, now: datetime) -> float | None:
        """When the next decision falls due, if `decide()` would act on nothing now (None: it
        may act, ask it).

        Nodes kept off for a far reservation make the engine step on every change while the
        queue is blocked, and `decide()` then mostly confirms that they stay off. This is that
        case, checked against `decide()`'s own rules, only without a warm reserve or
        `min_running`, with no node booting or draining: jobs wait for at least the idle nodes;
        every stopped node is kept off for the reservation; no idle node kept for it may be
        stopped. Then `decide()` returns no action and asks again a boot before the start.
        (`tests/simulator/test_simulator_reservation.py` replays with and without this.)
        """
        settings = self.settings
        assert settings is not None
        scheduler = cluster.scheduler
        if (
            scheduler.pending_jobs == 0
            or cluster.booting
            or settings.min_running
            or (settings.warm_max_nodes and settings.warm_window_seconds)
        ):
            return None
        snapshot = scheduler.take_snapshot(with_nodes=False)
        idle = scheduler.free_nodes
        if demand_nodes(snapshot, settings) < idle or self.draining:
            return None
        held, backfill, lead, stop_held_in = held_for_reservation(
            snapshot, now, cluster.config.rules, settings, self.views
        )
        stopped = len(cluster.stopped)
        if max(min(held, stopped - backfill), 0) != stopped:
            return None  # a stopped node is wanted now
        if stop_held_in > 0 and held > stopped and idle:
            return None  # an idle node kept for the reservation may go
        if not stopped:
            return math.inf
        at = now + _ceil_timedelta(lead - settings.reserved_wake_seconds)
        return (at - cluster.origin).total_seconds()


def _with(
    view: PoolNodeView, power: PowerState, since: datetime, drain_requested: bool
) -> PoolNodeView:
    """The view with a new power state and drain flag (`dataclasses.replace`, without its cost)."""
    return PoolNodeView(
        view.node_id,
        view.scheduler_name,
        power,
        since,
        view.billing,
        view.image_built_at,
        view.retiring,
        drain_requested,
    )


# decide() with its warm reserve on: 16 nodes at most, sized by the last 10 minutes' arrivals,
# started ahead of jobs and kept 15 minutes idle. Not the production default: on the traces it
# cuts waits where the pool is larger than the load (2x) but costs more than it saves in waiting
# at the machine's size (see the README).
WARM_TUNING: dict[str, Any] = {
    "warm_window_seconds": 600.0,
    "warm_max_nodes": 16,
    "warm_idle_seconds": 900.0,
    "warm_starts": True,
}

POLICIES: dict[str, Callable[[], Policy]] = {
    # in the order of the tables: the fixed cluster, the field, then hpcfleet
    "always-on": AlwaysOn,
    "idle-600": lambda: IdleTimeout(600),
    "idle-300": lambda: IdleTimeout(300),
    "asg-5min": TargetTracking,
    "hour-boundary": HourBoundary,
    "hpcfleet": Hpcfleet,
    "hpcfleet-warm": lambda: Hpcfleet(name="hpcfleet-warm", tuning=WARM_TUNING),
}
