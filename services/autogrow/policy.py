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
- Warm reserve (off by default; needs the `QueueOutlook` of recent submissions): the nodes the
  jobs of the last `warm_window_seconds` asked for, capped at `warm_max_nodes`, are what is
  likely to arrive next. That many idle nodes beyond the waiting jobs' stay up for
  `warm_idle_seconds` instead of `idle_seconds`, and with `warm_starts` stopped nodes are started
  to fill the reserve before jobs come, so the next job need not wait a boot. Starts count as a
  cost: the reserve is bounded, it shrinks as the arrivals age out of the window, and a quiet
  spell lets every warm node go. The simulator measures what it buys (README).

Each decision also says when time alone could change it (`recheck_at`), so an event-driven
simulator need not ask every second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Annotated, NamedTuple

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


@dataclass(frozen=True, slots=True)
class QueueOutlook:
    """What the queue tells beyond the snapshot's totals, for the pool's partitions; optional.

    The service reads it with the snapshot (Slurm: the submit times and node counts of the
    jobs `squeue --json` lists, pending and running). Without it there is no warm reserve.
    """

    # jobs submitted lately: (submit time, whole nodes), any order; older than the settings'
    # `warm_window_seconds` are ignored
    arrivals: tuple[tuple[datetime, int], ...] = ()


# a restart's risk beyond its bill, for the reservation rule (README, "What hpcfleet's policy
# costs"): high enough that stopping nodes behind a blocked job adds fewer starts than it saves
RESERVED_RISK_SECONDS = 24 * 3600.0


BillingOverride = Annotated[
    BillingModel | None,
    Field(
        description="Bill the nodes this way (per-second or hourly) whatever their image says, "
        "for the power decisions and the cost; None: by the image's billing model. The "
        "service's setting holds for every pool without its own."
    ),
]
"""The billing override, declared once: a pool's policy (`PoolPolicy.billing`, the API's JSON)
and the service's default (`AutogrowSettings.billing`, `HPCFLEET_AUTOGROW_BILLING`) both use it."""


class PolicySettings(BaseModel):
    """The editable knobs of one pool's policy, declared once: the service's settings nest them
    (`AutogrowSettings.policy`, `HPCFLEET_AUTOGROW_POLICY__<KNOB>`), the per-pool policy API
    inherits them (`PoolPolicy`, the JSON of `/autogrow/policies/{pool}`), the simulator builds
    them; a knob added here is in all three at once."""

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
    warm_window_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Needs the queue outlook. The warm reserve is the whole nodes the jobs "
        "submitted in this many seconds before now asked for (0: no reserve): what just arrived "
        "is the best guess of what arrives next. Idle nodes within the reserve stay up for "
        "`warm_idle_seconds`; with `warm_starts`, stopped nodes are started to fill it.",
    )
    warm_max_nodes: int = Field(
        default=0, ge=0, description="The most nodes the warm reserve holds (0: no reserve)."
    )
    warm_idle_seconds: float = Field(
        default=900.0,
        ge=0,
        description="Per-second billing: how long an idle node within the warm reserve stays up.",
    )
    warm_starts: bool = Field(
        default=False,
        description="Start stopped nodes to fill the warm reserve before jobs come for them.",
    )
    boot_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="A node not registered by then is powered off."
    )
    reserved_risk_seconds: float | None = Field(
        default=RESERVED_RISK_SECONDS,
        ge=0,
        description="Needs the scheduler's reservation for the first waiting job. A node kept idle "
        "for it goes down if idling until `reserved_wake_seconds` before it costs more than the "
        "restart's bill plus this many node-seconds: what a start risks beyond its bill (it may "
        "fail; a job that starts early waits its boot; one more start). None: never.",
    )
    reserved_wake_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Nodes kept off for the first waiting job's reservation are powered on this "
        "long before it starts: their boot, so the job waits no longer.",
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


class NodeAction(NamedTuple):
    """One node to act on, and why. A named tuple, not a frozen dataclass: a call may return
    thousands, a frozen dataclass sets each field through `object.__setattr__`, and a tuple of
    strings is dropped from the collector's watch after its first collection."""

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
    warm: str | None,
) -> tuple[str | None, float]:
    """Why an idle node may go down now (None while keeping it pays), and when that changes.

    The second value is the seconds until the answer may flip if nothing but the time changes.
    `warm` says why the node is in the warm reserve, if it is.
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
    if node.retiring:
        grace = 0.0
    elif warm is not None:
        grace = settings.warm_idle_seconds
    else:
        grace = settings.idle_seconds
    if idle_for < grace or left > 0:
        return None, max(grace - idle_for, left)
    if warm is not None:
        return f"idle {idle_for:.0f} s (warm reserve: {warm}, grace {grace:.0f} s)", math.inf
    return f"idle {idle_for:.0f} s (grace {grace:.0f} s), per-second minimum used", math.inf


def warm_reserve(
    outlook: QueueOutlook | None, now: datetime, settings: PolicySettings
) -> tuple[int, float]:
    """Nodes to keep warm: what the jobs of the last `warm_window_seconds` asked for, capped;
    and the seconds until the oldest of those jobs leaves the window (the reserve may shrink)."""
    window = settings.warm_window_seconds
    if outlook is None or window <= 0 or settings.warm_max_nodes == 0:
        return 0, math.inf
    total = 0
    oldest = math.inf
    for submitted, nodes in outlook.arrivals:
        age = (now - submitted).total_seconds()
        if 0 <= age < window:
            total += nodes
            oldest = min(oldest, window - age)
    return min(total, settings.warm_max_nodes), oldest


def decide(
    snapshot: QueueSnapshot,
    nodes: Sequence[PoolNodeView],
    billing: BillingRules,
    now: datetime,
    settings: PolicySettings,
    outlook: QueueOutlook | None = None,
) -> Decision:
    """The power actions for this instant; pure, so every caller gets the same answer.

    Written to allocate little: with 10,000 nodes, every object that outlives a young-generation
    collection here brings the next full collection of the whole process nearer, and that full
    collection, not this loop, is what a slow call is made of.
    """
    listed = snapshot.nodes
    by_name: dict[str, SchedulerNode] | None = None  # built only if the orders differ
    stopped: list[PoolNodeView] = []
    idle: list[PoolNodeView] = []
    idle_for: list[float] = []  # seconds idle, beside `idle`
    drained: list[bool] = []  # the scheduler shows it drained, beside `idle`
    booting = 0
    committed = 0  # running or starting, and not being powered off for failing to register
    soonest = math.inf  # seconds until time alone could change the answer
    resume: list[NodeAction] = []
    power_off: list[NodeAction] = []
    boot_timeout = settings.boot_timeout_seconds

    # the scheduler usually lists nodes in the pool's order: pair them without a lookup
    paired = (
        listed if len(listed) >= len(nodes) else (*listed, *[None] * (len(nodes) - len(listed)))
    )
    for node, view in zip(nodes, paired, strict=False):
        power = node.power
        if power is _STOPPED:
            stopped.append(node)
            continue
        if power is _STOPPING:
            continue
        name = node.scheduler_name
        if view is None or view.name != name:
            if by_name is None:
                by_name = {n.name: n for n in listed}
            view = by_name.get(name)
        if power is _STARTING or view is None or view.activity is _DOWN:
            up_for = (now - node.since).total_seconds()
            if up_for >= boot_timeout:
                reason = f"not registered with the scheduler {up_for:.0f} s after power-on"
                power_off.append(_action(node, reason))
            else:
                booting += 1
                committed += 1
                if boot_timeout - up_for < soonest:
                    soonest = boot_timeout - up_for
            continue
        committed += 1
        activity = view.activity
        if view.cpus_allocated > 0 or activity is _BUSY:
            if node.drain_requested:
                resume.append(_action(node, _TOOK_A_JOB))
            continue
        if activity is _DRAINING and not node.drain_requested:
            continue  # drained by someone else (an operator): theirs to resume
        since = view.idle_since or node.since
        idle.append(node)
        idle_for.append(max(0.0, (now - since).total_seconds()))
        drained.append(activity is _DRAINING)

    demand = demand_nodes(snapshot, settings)
    supply = len(idle) + booting
    # nodes kept for the first waiting job's reservation, far ahead: stay off, or go if it pays
    held, backfill, lead, stop_held_in = held_for_reservation(
        snapshot, now, billing, settings, idle
    )
    keep_off = max(min(held, len(stopped) - backfill), 0)
    # none while a job behind it could start on a node that were up: start one, stop none
    stop_held = min(held - keep_off, len(idle)) if stop_held_in > 0 and not backfill else 0
    if keep_off:  # to be woken a boot before the start
        soonest = min(soonest, lead - settings.reserved_wake_seconds)
    if stop_held:
        soonest = min(soonest, stop_held_in)
    warm, warm_changes = warm_reserve(outlook, now, settings)
    warm_why = ""
    if warm:
        soonest = min(soonest, warm_changes)
        warm_why = f"jobs of the last {settings.warm_window_seconds:.0f} s asked for {warm} nodes"

    power_on: list[NodeAction] = []
    wanted = max(demand - supply, settings.min_running - committed)
    warming = settings.warm_starts and demand + warm - supply > wanted
    if warming:
        wanted = demand + warm - supply
    if settings.max_running is not None:
        wanted = min(wanted, settings.max_running - committed)
    wanted = min(wanted, len(stopped) - keep_off)
    if wanted > 0 and stopped:
        _sort_for_power_on(stopped)
        if warming:
            reason = f"warm before jobs come: {warm_why}; {demand} wanted by waiting jobs, "
            reason += f"{supply} idle or booting"
        elif demand > supply:
            reason = f"{demand} nodes wanted by waiting jobs, {supply} idle or booting"
        else:
            reason = f"keep at least {settings.min_running} running"
        for node in stopped[:wanted]:
            if node.retiring:
                power_on.append(_action(node, reason + "; retiring, but no other node is stopped"))
            else:
                power_on.append(_action(node, reason))

    drain: list[NodeAction] = []
    # how many idle nodes may go depends on demand and supply only, and on whether stopping
    # those kept for a far reservation pays; the last `warm` of them in power-off order (the
    # most lately idle) are the warm reserve
    may_go = min(supply - demand, len(idle), committed - settings.min_running)
    cold = may_go - warm  # the first this many in power-off order are not in the reserve
    if stop_held:
        may_go = min(max(may_go, 0) + stop_held, len(idle), committed - settings.min_running)
    order: Sequence[int] = range(len(idle))
    if may_go > 0:
        order = sorted(order, key=lambda i: _power_off_order(idle[i], idle_for[i]))
    for rank, i in enumerate(order):
        node = idle[i]
        due: str | None = None
        if may_go > 0:
            reserve = warm_why if warm and rank >= cold else None
            due, changes_in = _due(node, idle_for[i], now, billing, settings, reserve)
            if changes_in < soonest:
                soonest = changes_in
        if due is None or may_go == 0:
            if node.drain_requested:
                why = _NOT_DUE if due is None else _WANTED
                resume.append(_action(node, why))
            continue
        may_go -= 1
        if may_go < stop_held:  # beyond what demand leaves spare: kept for the reservation
            due = f"kept for the first waiting job, which starts in {lead:.0f} s; {due}"
        if node.retiring:
            due = "retiring; " + due
        if node.drain_requested and drained[i]:
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


def held_for_reservation(
    snapshot: QueueSnapshot,
    now: datetime,
    billing: BillingRules,
    settings: PolicySettings,
    idle: Sequence[PoolNodeView],
) -> tuple[int, int, float, float]:
    """Nodes the scheduler keeps idle or off for the first waiting job's reservation while it
    starts more than a boot ahead (0 otherwise: they are wanted like any waiting job's), the
    stopped nodes jobs behind it could backfill on at once (these are started), the seconds
    until it starts, and the seconds during which stopping such an idle node still pays
    (0: it does not): idling until a boot before the start must cost more than the restart's
    bill plus its risk (`reserved_risk_seconds`). Under hourly billing the restart's bill is a
    whole hour, so only a far reservation pays."""
    reservation = snapshot.reservation
    risk = settings.reserved_risk_seconds
    if reservation is None or not reservation.held or risk is None:
        return 0, 0, math.inf, 0.0
    wake = settings.reserved_wake_seconds
    lead = (reservation.start - now).total_seconds()
    if lead <= wake:
        return 0, 0, lead, 0.0
    model = idle[0].billing if idle else BillingModel.PER_SECOND
    pays_for = lead - wake - paid_seconds(model, wake, billing) - risk
    return reservation.held, reservation.backfill, lead, max(pays_for, 0.0)


_TOOK_A_JOB = "took a job before the drain; keep it working"
_NOT_DUE = "idle, not due to go down yet: take jobs again"
_WANTED = "idle, wanted by jobs or min_running: take jobs again"


def _ceil_timedelta(seconds: float) -> timedelta:
    """Rounded up to the microsecond, so that at `recheck_at` the threshold has surely passed."""
    return timedelta(microseconds=math.ceil(seconds * 1e6))


def _sort_for_power_on(stopped: list[PoolNodeView]) -> None:
    """Non-retiring first, then the freshest image, then by id for a stable choice.

    Three stable sorts on plain keys rather than one on a tuple per node: a tuple per stopped
    node is thousands of collector-tracked objects a call, which is what made calls slow. The
    image dates are compared as they are, by a key in C (a Python key function turning each into
    a number was a fifth of a call); nodes with no known image date go after the dated ones.
    """
    stopped.sort(key=_node_id)
    dated = [node for node in stopped if node.image_built_at is not None]
    if dated:
        dated.sort(key=_built_at, reverse=True)  # stable, reverse or not
        if len(dated) < len(stopped):
            dated += [node for node in stopped if node.image_built_at is None]
        stopped[:] = dated
    stopped.sort(key=_retiring)


_node_id = attrgetter("node_id")
_retiring = attrgetter("retiring")
_built_at = attrgetter("image_built_at")


def _power_off_order(node: PoolNodeView, idle_for: float) -> tuple[bool, bool, float, float, str]:
    """Retiring first, then those already draining, the oldest image, the longest idle."""
    built = node.image_built_at.timestamp() if node.image_built_at is not None else -math.inf
    return (not node.retiring, not node.drain_requested, built, -idle_for, node.node_id)
