"""decide(): table-driven cases for each rule, and properties that must hold for any input."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.autogrow.billing import BillingRules
from services.autogrow.policy import Decision, PolicySettings, PoolNodeView, decide
from shared.events import BillingModel, PowerState
from shared.scheduler import NodeActivity, PartitionDemand, QueueSnapshot, SchedulerNode

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RULES = BillingRules()
STOPPED, STARTING, RUNNING, STOPPING = (
    PowerState.STOPPED,
    PowerState.STARTING,
    PowerState.RUNNING,
    PowerState.STOPPING,
)
IDLE, BUSY, DRAINING, DOWN = (
    NodeActivity.IDLE,
    NodeActivity.BUSY,
    NodeActivity.DRAINING,
    NodeActivity.DOWN,
)
HOURLY = BillingModel.HOURLY


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def node(
    node_id: str,
    power: PowerState = RUNNING,
    up: float = 3600,
    billing: BillingModel = BillingModel.PER_SECOND,
    **extra: object,
) -> PoolNodeView:
    return PoolNodeView(node_id, node_id, power, ago(up), billing, **extra)  # type: ignore[arg-type]


def seen(
    name: str, activity: NodeActivity, idle: float | None = None, busy: bool = False
) -> SchedulerNode:
    return SchedulerNode(
        name=name,
        activity=activity,
        cpus=1,
        cpus_allocated=1 if busy or activity is BUSY else 0,
        idle_since=None if idle is None else ago(idle),
    )


def snapshot(
    nodes: list[SchedulerNode], pending_nodes: int = 0, pending_cores: int | None = None
) -> QueueSnapshot:
    cores = pending_nodes if pending_cores is None else pending_cores
    demand = PartitionDemand(
        partition="batch", pending_jobs=cores, pending_cores=cores, pending_nodes=pending_nodes
    )
    return QueueSnapshot(taken_at=NOW, partitions=(demand,), nodes=tuple(nodes))


@dataclass
class Case:
    pool: list[PoolNodeView]
    views: list[SchedulerNode]
    pending: int = 0
    settings: PolicySettings = field(default_factory=PolicySettings)
    on: tuple[str, ...] = ()
    resume: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    off: tuple[str, ...] = ()


def stopped(*ids: str) -> list[PoolNodeView]:
    return [node(i, STOPPED) for i in ids]


def down(*ids: str) -> list[SchedulerNode]:
    return [seen(i, DOWN) for i in ids]


JAN, FEB, MAR = (datetime(2026, m, 1, tzinfo=UTC) for m in (1, 2, 3))

CASES = {
    "nothing waits, nothing runs": Case(stopped("a", "b"), down("a", "b")),
    "power on what the waiting jobs need": Case(
        stopped("a", "b", "c", "d"), down("a", "b", "c", "d"), pending=2, on=("a", "b")
    ),
    "fresh images first, retiring nodes last": Case(
        [
            node("a", STOPPED, image_built_at=JAN),
            node("b", STOPPED, image_built_at=FEB),
            node("c", STOPPED, image_built_at=MAR, retiring=True),
            node("d", STOPPED),
        ],
        down("a", "b", "c", "d"),
        pending=3,
        on=("b", "a", "d"),
    ),
    "idle and booting nodes count as supply": Case(
        [node("a"), node("b", up=20), *stopped("c", "d", "e")],
        [seen("a", IDLE, idle=10), *down("b", "c", "d", "e")],
        pending=4,
        on=("c", "d"),
    ),
    "a starting node counts as supply": Case(
        [node("a", STARTING, up=5), *stopped("b")], down("a", "b"), pending=1
    ),
    "never more than max_running": Case(
        [node("a"), *stopped("b", "c", "d")],
        [seen("a", BUSY), *down("b", "c", "d")],
        pending=5,
        settings=PolicySettings(max_running=2),
        on=("b",),
    ),
    "min_running keeps nodes up without demand": Case(
        stopped("a", "b", "c"),
        down("a", "b", "c"),
        settings=PolicySettings(min_running=2),
        on=("a", "b"),
    ),
    "per second: idle inside the grace is kept": Case([node("a")], [seen("a", IDLE, idle=200)]),
    "per second: idle past the grace is drained": Case(
        [node("a")], [seen("a", IDLE, idle=400)], drain=("a",)
    ),
    "per second: drained and idle is powered off": Case(
        [node("a", drain_requested=True)], [seen("a", DRAINING, idle=400)], off=("a",)
    ),
    "per second: drain asked but not yet effective is asked again": Case(
        [node("a", drain_requested=True)], [seen("a", IDLE, idle=400)], drain=("a",)
    ),
    "per second: never inside the 60 s minimum, even retiring": Case(
        [node("a", up=50, retiring=True)], [seen("a", IDLE, idle=50)]
    ),
    "per second: retiring goes as soon as the minimum is used": Case(
        [node("a", up=70, retiring=True)], [seen("a", IDLE, idle=70)], drain=("a",)
    ),
    "hourly: idle at minute 30 is kept": Case(
        [node("a", up=1800, billing=HOURLY)], [seen("a", IDLE, idle=1200)]
    ),
    "hourly: idle at minute 56 is drained": Case(
        [node("a", up=56 * 60, billing=HOURLY)], [seen("a", IDLE, idle=1200)], drain=("a",)
    ),
    "hourly: a new paid hour is kept until its minute 55": Case(
        [node("a", up=61 * 60, billing=HOURLY)], [seen("a", IDLE, idle=600)]
    ),
    "hourly: minute 56 of the second hour, drained": Case(
        [node("a", up=116 * 60, billing=HOURLY, drain_requested=True)],
        [seen("a", DRAINING, idle=600)],
        off=("a",),
    ),
    "a busy node is never powered off": Case([node("a", up=86400)], [seen("a", BUSY)]),
    "a busy node autogrow drained is resumed": Case(
        [node("a", drain_requested=True)], [seen("a", BUSY)], resume=("a",)
    ),
    "a draining node with a job left is busy, not drained": Case(
        [node("a", drain_requested=True), node("b", drain_requested=True)],
        [seen("a", DRAINING, busy=True), seen("b", DRAINING, idle=900)],
        resume=("a",),
        off=("b",),
    ),
    "a drained idle node is resumed when jobs wait": Case(
        [node("a", drain_requested=True), *stopped("b")],
        [seen("a", DRAINING, idle=900), *down("b")],
        pending=1,
        resume=("a",),
    ),
    "a node that booted drained is resumed": Case(
        [node("a", up=90, drain_requested=True)], [seen("a", DRAINING, idle=30)], resume=("a",)
    ),
    "an operator's drain is left alone and is no supply": Case(
        [node("a"), *stopped("b")],
        [seen("a", DRAINING, idle=9000), *down("b")],
        pending=1,
        on=("b",),
    ),
    "not registered within the boot timeout: powered off": Case(
        [node("a", up=1900), node("b", STARTING, up=2000)], down("a"), off=("a", "b")
    ),
    "min_running keeps an idle node": Case(
        [node("a")], [seen("a", IDLE, idle=9000)], settings=PolicySettings(min_running=1)
    ),
    "only the surplus goes, retiring and longest idle first": Case(
        [node("a"), node("b"), node("c", retiring=True), node("d")],
        [
            seen("a", IDLE, idle=500),
            seen("b", IDLE, idle=3000),
            seen("c", IDLE, idle=400),
            seen("d", IDLE, idle=1000),
        ],
        pending=2,
        drain=("c", "b"),
    ),
    "a node already draining goes before an idle one": Case(
        [node("a"), node("b", drain_requested=True)],
        [seen("a", IDLE, idle=3000), seen("b", DRAINING, idle=400)],
        pending=1,
        off=("b",),
    ),
    "stopping nodes are neither supply nor candidates": Case(
        [node("a", STOPPING), *stopped("b")], down("a", "b"), pending=1, on=("b",)
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide(case: Case) -> None:
    decision = decide(snapshot(case.views, case.pending), case.pool, RULES, NOW, case.settings)
    assert tuple(a.node_id for a in decision.power_on) == case.on
    assert tuple(a.node_id for a in decision.resume) == case.resume
    assert tuple(a.node_id for a in decision.drain) == case.drain
    assert tuple(a.node_id for a in decision.power_off) == case.off
    for action in (*decision.power_on, *decision.resume, *decision.drain, *decision.power_off):
        assert action.reason and action.scheduler_name == action.node_id


def test_reasons_say_why() -> None:
    decision = decide(
        snapshot([seen("a", IDLE, idle=400), *down("b", "c")], pending_nodes=0),
        [node("a", up=56 * 60, billing=HOURLY), *stopped("b", "c")],
        RULES,
        NOW,
        PolicySettings(min_running=2),
    )
    assert decision.drain == ()  # min_running 2 keeps a
    assert [a.reason for a in decision.power_on] == ["keep at least 2 running"]
    decision = decide(
        snapshot([seen("a", IDLE, idle=400)]),
        [node("a", up=56 * 60, billing=HOURLY)],
        RULES,
        NOW,
        PolicySettings(),
    )
    assert decision.drain[0].reason == "idle, 240 s left of its paid hour; drain before power-off"
    assert decision.summary == "demand 0 nodes, supply 1: on 0, resume 0, drain 1, off 0"


@pytest.mark.parametrize(
    ("partitions", "pending_cores", "cores_per_node", "expected"),
    [
        (None, 10, 4, 3),  # cores only: rounded up to whole nodes
        (frozenset({"batch"}), 10, 1, 10),
        (frozenset({"gpu"}), 10, 1, 0),  # another pool's partition
    ],
)
def test_demand_in_whole_nodes_of_the_pool_partitions(
    partitions: frozenset[str] | None, pending_cores: int, cores_per_node: int, expected: int
) -> None:
    settings = PolicySettings(partitions=partitions, cores_per_node=cores_per_node)
    pool = stopped(*(f"n{i}" for i in range(20)))
    decision = decide(
        snapshot(down(*(n.node_id for n in pool)), pending_cores=pending_cores),
        pool,
        RULES,
        NOW,
        settings,
    )
    assert (decision.demand_nodes, len(decision.power_on)) == (expected, expected)


def test_settings_refuse_min_above_max() -> None:
    with pytest.raises(ValidationError, match="min_running"):
        PolicySettings(min_running=5, max_running=2)


# ---- properties -------------------------------------------------------------------------------


@st.composite
def situations(
    draw: st.DrawFn,
) -> tuple[QueueSnapshot, list[PoolNodeView], PolicySettings]:
    pool: list[PoolNodeView] = []
    views: list[SchedulerNode] = []
    for i in range(draw(st.integers(0, 12))):
        name = f"n{i:02d}"
        power = draw(st.sampled_from([RUNNING, RUNNING, RUNNING, STOPPED, STARTING, STOPPING]))
        up = draw(st.integers(0, 4 * 3600))
        pool.append(
            PoolNodeView(
                name,
                name,
                power,
                ago(up),
                draw(st.sampled_from(list(BillingModel))),
                retiring=draw(st.booleans()),
                drain_requested=draw(st.booleans()),
            )
        )
        activity = draw(st.sampled_from([IDLE, IDLE, DRAINING, DRAINING, BUSY, DOWN, None]))
        if power is STOPPED or power is STOPPING:
            activity = draw(st.sampled_from([None, DOWN]))
        if activity is not None:
            busy = activity is BUSY or (activity is DRAINING and draw(st.booleans()))
            idle = None if busy or activity is DOWN else draw(st.integers(0, up))
            views.append(
                SchedulerNode(
                    name=name,
                    activity=activity,
                    cpus=1,
                    cpus_allocated=int(busy),
                    idle_since=None if idle is None else ago(idle),
                )
            )
    minimum = draw(st.sampled_from([0, 0, 0, 1, 3]))
    maximum = draw(st.one_of(st.none(), st.integers(minimum, 14)))
    settings = PolicySettings(
        min_running=minimum,
        max_running=maximum,
        idle_seconds=draw(st.sampled_from([0, 60, 300, 900])),
    )
    pending = draw(st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 20)))
    return snapshot(views, pending), pool, settings


def _supply(pool: list[PoolNodeView], views: dict[str, SchedulerNode]) -> int:
    """Nodes that could take a waiting job soon: booting, or up, idle and not someone's drain."""
    count = 0
    for n in pool:
        view = views.get(n.node_id)
        if n.power is STARTING or (n.power is RUNNING and (view is None or view.activity is DOWN)):
            count += (NOW - n.since).total_seconds() <= PolicySettings().boot_timeout_seconds
        elif n.power is RUNNING and view is not None and view.cpus_allocated == 0:
            count += view.activity is IDLE or n.drain_requested
    return count


@hypothesis_settings(max_examples=100)
@given(situations())
def test_properties_of_every_decision(
    situation: tuple[QueueSnapshot, list[PoolNodeView], PolicySettings],
) -> None:
    snap, pool, settings = situation
    decision = decide(snap, pool, RULES, NOW, settings)
    assert decide(snap, pool, RULES, NOW, settings) == decision  # pure: same input, same answer
    by_id = {n.node_id: n for n in pool}
    views = {v.name: v for v in snap.nodes}
    actions = [*decision.power_on, *decision.resume, *decision.drain, *decision.power_off]
    assert len({a.node_id for a in actions}) == len(actions), "one action per node at most"
    assert all(a.reason for a in actions)

    # power on: only stopped nodes, never more than demand needs, never beyond max_running
    assert all(by_id[a.node_id].power is STOPPED for a in decision.power_on)
    if settings.min_running == 0:
        assert len(decision.power_on) <= max(0, decision.demand_nodes - _supply(pool, views))
    on = sum(1 for n in pool if n.power in (RUNNING, STARTING)) - len(decision.power_off)
    if settings.max_running is not None and decision.power_on:
        assert on + len(decision.power_on) <= settings.max_running

    timed_out = [a for a in decision.power_off if "not registered" in a.reason]
    going = len(decision.drain) + len(decision.power_off) - len(timed_out)
    if going:
        running = sum(1 for n in pool if n.power in (RUNNING, STARTING)) - len(timed_out)
        assert running - going >= settings.min_running, "below min_running"
    for action in (*decision.drain, *decision.power_off):
        pool_node, view = by_id[action.node_id], views.get(action.node_id)
        registered = pool_node.power is RUNNING and view is not None and view.activity is not DOWN
        if not registered:
            assert action in decision.power_off and "not registered" in action.reason
            continue
        assert view is not None
        # never a busy node, and only a drained one is powered off
        assert view.cpus_allocated == 0 and view.activity is not BUSY
        if action in decision.power_off:
            assert view.activity is DRAINING and pool_node.drain_requested
        else:
            assert view.activity is not DRAINING or pool_node.drain_requested
        up = (NOW - pool_node.since).total_seconds()
        if pool_node.billing is HOURLY:
            minute = (up % 3600) / 60
            assert minute >= 55 or (up > 0 and up % 3600 == 0), "hourly: before minute 55"
        else:
            assert up >= RULES.per_second_minimum, "per second: inside the 60 s minimum"
        assert decision.demand_nodes < decision.supply_nodes, "went down while jobs need it"


def _action_sets(decision: Decision) -> tuple[set[str], ...]:
    lists = (decision.power_on, decision.resume, decision.drain, decision.power_off)
    return tuple({a.node_id for a in actions} for actions in lists)


@hypothesis_settings(max_examples=60)
@given(situations(), st.floats(min_value=0, max_value=1, exclude_max=True))
def test_nothing_changes_before_recheck_at_if_nothing_else_does(
    situation: tuple[QueueSnapshot, list[PoolNodeView], PolicySettings], fraction: float
) -> None:
    snap, pool, settings = situation
    decision = decide(snap, pool, RULES, NOW, settings)
    if decision.recheck_at is None:
        later = NOW + timedelta(days=30, seconds=1234.5)  # not a whole number of hours
    else:
        assert decision.recheck_at > NOW
        span = (decision.recheck_at - NOW) // timedelta(microseconds=1)
        later = NOW + timedelta(microseconds=math.floor(span * fraction))  # strictly before
    assert _action_sets(decide(snap, pool, RULES, later, settings)) == _action_sets(decision)


def test_recheck_at_is_when_the_first_idle_node_falls_due() -> None:
    decision = decide(
        snapshot([seen("a", IDLE, idle=100), seen("b", BUSY), seen("c", IDLE, idle=10)]),
        [node("a"), node("b"), node("c", up=56 * 60, billing=HOURLY), node("d", STARTING, up=30)],
        RULES,
        NOW,
        PolicySettings(idle_seconds=300, boot_timeout_seconds=600),
    )
    assert decision.drain[0].node_id == "c"  # hourly, minute 56: due now, until the hour ends
    assert decision.recheck_at == NOW + timedelta(seconds=200)  # a falls due; c at 240, d at 570
