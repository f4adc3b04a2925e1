"""autogrow's power policy: which pool nodes to power on, resume, drain and power off.

`decide` is a pure function of the scheduler's snapshot, autogrow's view of the pool, the billing
rules, the time and the settings: no awaits, no I/O, the clock passed in. The service, the tests and
the trace simulator all call it, so what the simulator measures is what production does.

The rule, level-triggered (the same inputs always give the same actions, and a lost decision is
simply made again on the next tick):

- Demand is the whole nodes the waiting jobs ask for; supply is the nodes that are idle or still
  booting. Stopped nodes are powered on for the difference (fresh images first, retiring nodes
  last), within `max_running`, and up to `min_running` even without demand.
- Idle nodes beyond demand go down once their paid time is used: per-second billing after an idle
  grace and never inside the 60 s minimum; hourly billing only in the last minutes of the paid hour.
  A node is drained first and powered off only once the scheduler shows it drained and idle, so no
  job can land on it in between; a busy node is never powered off.
- A node autogrow drained but still needs (demand came back, or it just booted drained) is resumed.
- A node that does not register with the scheduler within the boot timeout is powered off.

Each decision also says when time alone could change it (`recheck_at`), so an event-driven
simulator need not ask every second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.autogrow.billing import BillingRules, paid_seconds
from shared.events import BillingModel, PowerState
from shared.scheduler import NodeActivity, QueueSnapshot, SchedulerNode

# enum members as plain names: `PowerState.STOPPED` costs a class lookup per use, and decide() runs
# over every node of a 10,000-node pool
_STOPPED, _STARTING, _STOPPING = PowerState.STOPPED, PowerState.STARTING, PowerState.STOPPING
_BUSY, _DRAINING, _DOWN = NodeActivity.BUSY, NodeActivity.DRAINING, NodeActivity.DOWN
_HOURLY = BillingModel.HOURLY


@dataclass(frozen=True, slots=True)
class PoolNodeView:
    """A pool node as autogrow knows it: the pool's power state joined with its image's billing."""

    node_id: str
    scheduler_name: str
    power: PowerState
    since: datetime  # when it entered `power`; for RUNNING, when billing started
    billing: BillingModel = BillingModel.PER_SECOND
    image_built_at: datetime | None = None  # fresher images are powered on first
    retiring: bool = False  # the pool will replace it: powered off first, powered on last
    drain_requested: bool = False  # autogrow drained it and has not resumed it since


class PolicySettings(BaseModel):
    """The editable knobs of one pool's policy."""

    model_config = ConfigDict(frozen=True)

    min_running: int = Field(default=0, ge=0, description="Nodes kept running without demand.")
    max_running: int | None = Field(
        default=None, ge=0, description="Most nodes running or starting at once; None: the pool."
    )
    cores_per_node: int = Field(
        default=1, ge=1, description="Cores of a node, to turn waiting cores into whole nodes."
    )
    idle_seconds: float = Field(
        default=300.0,
        ge=0,
        description="Per-second billing: idle this long before a node goes down. A restart costs "
        "its billed boot, the wait it adds to the next job and a start that may fail, so a "
        "node is kept about as long as a restart would cost.",
    )
    hourly_window_seconds: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="Hourly billing: an idle node goes down only in the last this many seconds "
        "of its paid hour (300: from minute 55).",
    )
    boot_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="A node not registered by then is powered off."
    )
    partitions: frozenset[str] | None = Field(
        default=None, description="Partitions the pool serves; None: all of them."
    )

    @model_validator(mode="after")
    def _min_within_max(self) -> PolicySettings:
        if self.max_running is not None and self.min_running > self.max_running:
            raise ValueError(
                f"min_running ({self.min_running}) exceeds max_running ({self.max_running})"
            )
        return self


@dataclass(frozen=True, slots=True)
class NodeAction:
    node_id: str
    scheduler_name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now, each action with its reason, and the numbers it was decided on."""

    at: datetime
    demand_nodes: int  # whole nodes the waiting jobs ask for
    supply_nodes: int  # nodes idle or booting that could take them
    # the earliest time the same inputs could give other actions (an idle node falls due, a paid
    # hour ends, a boot times out), so an event-driven simulator knows when to ask again
    recheck_at: datetime | None = None
    power_on: tuple[NodeAction, ...] = ()
    resume: tuple[NodeAction, ...] = ()
    drain: tuple[NodeAction, ...] = ()
    power_off: tuple[NodeAction, ...] = ()

    @property
    def summary(self) -> str:
        return (
            f"demand {self.demand_nodes} nodes, supply {self.supply_nodes}: "
            f"on {len(self.power_on)}, resume {len(self.resume)}, drain {len(self.drain)}, "
            f"off {len(self.power_off)}"
        )


def _action(node: PoolNodeView, reason: str) -> NodeAction:
    return NodeAction(node.node_id, node.scheduler_name, reason)


def demand_nodes(snapshot: QueueSnapshot, settings: PolicySettings) -> int:
    """Whole nodes the waiting jobs of the pool's partitions ask for."""
    wanted = settings.partitions
    total = 0
    for demand in snapshot.partitions:
        if wanted is None or demand.partition in wanted:
            by_cores = math.ceil(demand.pending_cores / settings.cores_per_node)
            total += max(demand.pending_nodes, by_cores)
    return total


def _due(
    node: PoolNodeView,
    idle_for: float,
    now: datetime,
    billing: BillingRules,
    settings: PolicySettings,
) -> tuple[str | None, float]:
    """Why an idle node may go down now (None while keeping it pays), and when that changes.

    The second value is the seconds until the answer flips if nothing but the time changes.
    """
    up_for = max(0.0, (now - node.since).total_seconds())
    left = paid_seconds(node.billing, up_for, billing) - up_for
    if node.billing is _HOURLY:
        window = settings.hourly_window_seconds
        if left <= 0:  # the paid hour ends this instant: running on starts (and pays) the next
            left = billing.hour
        if left > window:
            return None, left - window
        return f"idle, {left:.0f} s left of its paid hour", left
    grace = 0.0 if node.retiring else settings.idle_seconds
    if idle_for < grace or left > 0:
        return None, max(grace - idle_for, left)
    return f"idle {idle_for:.0f} s (grace {grace:.0f} s), per-second minimum used", math.inf


def decide(
    snapshot: QueueSnapshot,
    nodes: Sequence[PoolNodeView],
    billing: BillingRules,
    now: datetime,
    settings: PolicySettings,
) -> Decision:
    """The power actions for this instant; pure, so every caller gets the same answer."""
    seen: dict[str, SchedulerNode] = {n.name: n for n in snapshot.nodes}
    stopped: list[PoolNodeView] = []
    idle: list[tuple[PoolNodeView, float]] = []  # with seconds idle
    booting = 0
    committed = 0  # running or starting, and not being powered off for failing to register
    soonest = math.inf  # seconds until time alone could change the answer
    resume: list[NodeAction] = []
    power_off: list[NodeAction] = []

    for node in nodes:
        power = node.power
        if power is _STOPPED:
            stopped.append(node)
            continue
        if power is _STOPPING:
            continue
        view = seen.get(node.scheduler_name)
        if power is _STARTING or view is None or view.activity is _DOWN:
            up_for = (now - node.since).total_seconds()
            if up_for >= settings.boot_timeout_seconds:
                reason = f"not registered with the scheduler {up_for:.0f} s after power-on"
                power_off.append(_action(node, reason))
            else:
                booting += 1
                committed += 1
                soonest = min(soonest, settings.boot_timeout_seconds - up_for)
            continue
        committed += 1
        if view.cpus_allocated > 0 or view.activity is _BUSY:
            if node.drain_requested:
                resume.append(_action(node, "took a job before the drain; keep it working"))
            continue
        if view.activity is _DRAINING and not node.drain_requested:
            continue  # drained by someone else (an operator): theirs to resume
        since = view.idle_since or node.since
        idle.append((node, max(0.0, (now - since).total_seconds())))

    demand = demand_nodes(snapshot, settings)
    supply = len(idle) + booting

    power_on: list[NodeAction] = []
    wanted = max(demand - supply, settings.min_running - committed)
    if settings.max_running is not None:
        wanted = min(wanted, settings.max_running - committed)
    if wanted > 0 and stopped:
        stopped.sort(key=_power_on_order)
        for node in stopped[:wanted]:
            if demand > supply:
                reason = f"{demand} nodes wanted by waiting jobs, {supply} idle or booting"
            else:
                reason = f"keep at least {settings.min_running} running"
            if node.retiring:
                reason += "; retiring, but no other node is stopped"
            power_on.append(_action(node, reason))

    drain: list[NodeAction] = []
    # how many idle nodes may go depends on demand and supply only, never on the time
    may_go = min(supply - demand, len(idle), committed - settings.min_running)
    if may_go > 0:
        idle.sort(key=_power_off_order)
    for node, idle_for in idle:
        due: str | None = None
        if may_go > 0:
            due, changes_in = _due(node, idle_for, now, billing, settings)
            soonest = min(soonest, changes_in)
        if due is None or may_go == 0:
            if node.drain_requested:
                why = "not due to go down yet" if due is None else "wanted by jobs or min_running"
                resume.append(_action(node, f"idle, {why}: take jobs again"))
            continue
        may_go -= 1
        if node.retiring:
            due = "retiring; " + due
        if node.drain_requested and seen[node.scheduler_name].activity is _DRAINING:
            power_off.append(_action(node, due + ", drained"))
        else:
            drain.append(_action(node, due + "; drain before power-off"))

    return Decision(
        at=now,
        demand_nodes=demand,
        supply_nodes=supply,
        recheck_at=None if soonest == math.inf else now + _ceil_timedelta(soonest),
        power_on=tuple(power_on),
        resume=tuple(resume),
        drain=tuple(drain),
        power_off=tuple(power_off),
    )


def _ceil_timedelta(seconds: float) -> timedelta:
    """Rounded up to the microsecond, so that at `recheck_at` the threshold has surely passed."""
    return timedelta(microseconds=math.ceil(seconds * 1e6))


def _power_on_order(node: PoolNodeView) -> tuple[bool, float, str]:
    """Non-retiring first, then the freshest image, then by id for a stable choice."""
    built = node.image_built_at.timestamp() if node.image_built_at is not None else -math.inf
    return (node.retiring, -built, node.node_id)


def _power_off_order(entry: tuple[PoolNodeView, float]) -> tuple[bool, bool, float, float, str]:
    """Retiring first, then those already draining, the oldest image, the longest idle."""
    node, idle_for = entry
    built = node.image_built_at.timestamp() if node.image_built_at is not None else -math.inf
    return (not node.retiring, not node.drain_requested, built, -idle_for, node.node_id)
