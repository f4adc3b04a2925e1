"""Every rule of the pool planner, one table row per situation (spec: 4 nodes, 25 % surge = 1)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from pool_kit import (
    NEW,
    OLD,
    T0,
    TYPES,
    briefs,
    launches,
    make_spec,
    node,
    seen,
    stray,
)

from services.pool.plan import (
    FAILED_LAUNCH_HOLD,
    Adopt,
    NodeRecord,
    NodeState,
    ObservedInstance,
    Placement,
    RecordState,
    client_token,
    plan,
)
from services.pool.spec import NODE_TAG, POOL_TAG, PoolSpec
from shared.events import RetireReason

S = NodeState
R = RetireReason
MIN = timedelta(minutes=1)


def pool(n: int = 4, state: NodeState = S.STOPPED, **kw: Any) -> list[NodeRecord]:
    """n provisioned nodes n1..n<n>, alternating zones za, zb."""
    return [node(f"n{i}", state, zone="za" if i % 2 else "zb", **kw) for i in range(1, n + 1)]


def new(node_id: str, state: NodeState, age: timedelta = 5 * MIN, **kw: Any) -> NodeRecord:
    """A node not provisioned yet, in zone zb."""
    return node(node_id, state, provisioned=False, age=age, zone="zb", **kw)


THREE = pool(3)
FOUR = pool(4)
OLD_STOPPED = [replace(r, image_id=OLD, retiring=R.OUTDATED) for r in FOUR]
WARM_SPARE = node("n5", zone="za", age=10 * MIN)


@dataclass(frozen=True)
class Case:
    name: str
    rows: list[NodeRecord]
    instances: list[ObservedInstance]
    expected: list[str]
    spec: dict[str, object] = field(default_factory=dict)
    backoffs: dict[Placement, datetime] = field(default_factory=dict)
    problem: str | None = None


def all_seen(rows: list[NodeRecord]) -> list[ObservedInstance]:
    return [seen(r) for r in rows]


CASES = [
    # refuse
    Case("invalid budget plans nothing", [], [], [], {"max_surge_percent": 0}, problem="budget"),
    Case("no image yet plans nothing", [], [], [], {"image_id": None}, problem="no image"),
    # fill and steady state
    Case("steady pool does nothing", FOUR, all_seen(FOUR), []),
    Case(
        "empty pool launches size nodes, balanced over zones",
        [],
        [],
        ["Launch c7i.large@za", "Launch c7i.large@zb"] * 2,
    ),
    Case(
        "zero size with nothing to do",
        [],
        [],
        [],
        {"size": 0},
    ),
    # gone
    Case(
        "a vanished provisioned node is forgotten, announced and replaced",
        FOUR,
        all_seen(THREE),
        ["Forget n4 unhealthy", "Launch c7i.large@zb"],
    ),
    Case(
        "a node terminated outside the pool is forgotten and replaced",
        FOUR,
        [*all_seen(THREE), seen(FOUR[3], S.TERMINATED)],
        ["Forget n4 unhealthy", "Launch c7i.large@zb"],
    ),
    Case(
        "a vanished node already announced as retiring is not announced again",
        [*THREE, replace(FOUR[3], image_id=OLD, retiring=R.OUTDATED)],
        all_seen(THREE),
        ["Forget n4", "Launch c7i.large@zb"],
    ),
    Case(
        "a just-launched instance missing from EC2 is eventual consistency, not a loss",
        [*THREE, new("n4", S.PENDING, age=MIN)],
        all_seen(THREE),
        [],
    ),
    # launch intents
    Case(
        "an unconfirmed launch is retried",
        [*THREE, new("n4", S.LAUNCHING)],
        all_seen(THREE),
        ["Launch c7i.large@zb"],
    ),
    Case(
        "an unconfirmed launch whose instance exists is bound by client token",
        [*THREE, new("n4", S.LAUNCHING)],
        [*all_seen(THREE), seen(new("n4", S.PENDING), booted=False, tags={POOL_TAG: "hpc"})],
        ["Bind n4 i-n4"],
    ),
    Case(
        "an unconfirmed launch whose instance exists is bound by node tag",
        [*THREE, new("n4", S.LAUNCHING)],
        [*all_seen(THREE), seen(new("n4", S.PENDING), booted=False, client_token=None)],
        ["Bind n4 i-n4"],
    ),
    Case(
        "a bound instance that finished booting is warmed in the same plan",
        [*THREE, new("n4", S.LAUNCHING)],
        [*all_seen(THREE), seen(new("n4", S.RUNNING))],
        ["Bind n4 i-n4", "Stop n4"],
    ),
    Case(
        "an unconfirmed launch whose instance already ended is forgotten and relaunched",
        [*THREE, new("n4", S.LAUNCHING)],
        [*all_seen(THREE), seen(new("n4", S.TERMINATED))],
        ["Forget n4", "Launch c7i.large@zb"],
    ),
    Case(
        "a launch refused for capacity falls back to another zone at once",
        [*THREE, new("n4", S.FAILED, since=T0 - MIN)],
        all_seen(THREE),
        ["Forget n4", "Launch c7i.large@za"],
        backoffs={Placement(TYPES[0], "zb"): T0 + 9 * MIN},
    ),
    Case(
        "another refused launch holds its slot for a while",
        [*THREE, new("n4", S.FAILED, since=T0 - MIN, last_error="InvalidAMIID.NotFound")],
        all_seen(THREE),
        [],
    ),
    Case(
        "another refused launch is tried again after the hold",
        [*THREE, new("n4", S.FAILED, since=T0 - FAILED_LAUNCH_HOLD)],
        all_seen(THREE),
        ["Forget n4", "Launch c7i.large@zb"],
    ),
    # capacity
    Case(
        "a type backed off in every zone gives way to the next type",
        THREE,
        all_seen(THREE),
        ["Launch c6i.large@zb"],
        backoffs={Placement(TYPES[0], "za"): T0 + MIN, Placement(TYPES[0], "zb"): T0 + MIN},
    ),
    Case(
        "a back-off that has ended is ignored",
        THREE,
        all_seen(THREE),
        ["Launch c7i.large@zb"],
        backoffs={Placement(TYPES[0], "zb"): T0},
    ),
    Case(
        "no capacity anywhere: keep the nodes and say so",
        THREE,
        all_seen(THREE),
        [],
        backoffs={Placement(t, z): T0 + MIN for t in TYPES for z in ("za", "zb")},
        problem="insufficient capacity",
    ),
    # new nodes
    Case(
        "a pending new node waits",
        [*THREE, new("n4", S.PENDING)],
        [*all_seen(THREE), seen(new("n4", S.PENDING), booted=False)],
        [],
    ),
    Case(
        "a running new node waits for its boot",
        [*THREE, new("n4", S.RUNNING)],
        [*all_seen(THREE), seen(new("n4", S.RUNNING), booted=False)],
        [],
    ),
    Case(
        "a booted new node is stopped into the warm state",
        [*THREE, new("n4", S.RUNNING)],
        [*all_seen(THREE), seen(new("n4", S.RUNNING))],
        ["Stop n4"],
    ),
    Case(
        "a stopping new node waits",
        [*THREE, new("n4", S.STOPPING)],
        [*all_seen(THREE), seen(new("n4", S.STOPPING))],
        [],
    ),
    Case(
        "a stopped new node is provisioned",
        [*THREE, new("n4", S.STOPPED)],
        [*all_seen(THREE), seen(new("n4", S.STOPPED))],
        ["Provision n4"],
    ),
    Case(
        "a new node past the boot timeout is terminated and replaced",
        [*THREE, new("n4", S.RUNNING, age=30 * MIN)],
        [*all_seen(THREE), seen(new("n4", S.RUNNING, age=30 * MIN), booted=False)],
        ["Terminate n4", "Launch c7i.large@zb"],
    ),
    Case(
        "a new node on an image that moved on is terminated and replaced",
        [*THREE, new("n4", S.PENDING, image=OLD)],
        [*all_seen(THREE), seen(new("n4", S.PENDING, image=OLD), booted=False)],
        ["Terminate n4", "Launch c7i.large@zb"],
    ),
    # provisioned nodes and state
    Case(
        "a running provisioned node is never stopped by the plan",
        pool(4, S.RUNNING),
        all_seen(pool(4, S.RUNNING)),
        [],
    ),
    Case(
        "a state EC2 reports differently is recorded",
        FOUR,
        [*all_seen(THREE), seen(FOUR[3], S.RUNNING)],
        ["RecordState n4 running"],
    ),
    Case(
        "a terminated row is forgotten once EC2 shows it gone",
        [*THREE, replace(FOUR[3], state=S.SHUTTING_DOWN)],
        [*all_seen(THREE), seen(FOUR[3], S.TERMINATED)],
        ["Forget n4", "Launch c7i.large@zb"],
    ),
    Case(
        "a terminated row still stopped in EC2 is terminated again, not re-recorded",
        [*THREE, replace(FOUR[3], state=S.SHUTTING_DOWN)],
        [*all_seen(THREE), seen(FOUR[3], S.STOPPED)],
        ["Terminate n4", "Launch c7i.large@zb"],
    ),
    Case(
        "a terminated row running in EC2 is reported and left alone",
        [*THREE, replace(FOUR[3], state=S.SHUTTING_DOWN)],
        [*all_seen(THREE), seen(FOUR[3], S.RUNNING)],
        ["Launch c7i.large@zb"],
        problem="left alone",
    ),
    # garbage collection
    Case(
        "a running duplicate launch (same client token) is terminated",
        FOUR,
        [*all_seen(FOUR), stray("i-dup", S.RUNNING, client_token=client_token("n2"))],
        ["TerminateUntracked i-dup"],
    ),
    Case(
        "a duplicate launch found by node tag is terminated",
        FOUR,
        [*all_seen(FOUR), stray("i-dup", S.PENDING, node_tag="n2")],
        ["TerminateUntracked i-dup"],
    ),
    Case(
        "an untracked pending instance is left to settle",
        THREE,
        [*all_seen(THREE), stray("i-x", S.PENDING)],
        ["Launch c7i.large@zb"],
    ),
    Case(
        "an untracked fresh stopped instance fills a short pool",
        THREE,
        [*all_seen(THREE), stray("i-x", S.STOPPED)],
        ["Adopt i-x stopped fresh"],
    ),
    Case(
        "an untracked fresh running instance fills a short pool",
        THREE,
        [*all_seen(THREE), stray("i-x", S.RUNNING)],
        ["Adopt i-x running fresh"],
    ),
    Case(
        "an untracked stopped instance on an old image is terminated",
        THREE,
        [*all_seen(THREE), stray("i-x", S.STOPPED, image=OLD)],
        ["TerminateUntracked i-x", "Launch c7i.large@zb"],
    ),
    Case(
        "an untracked stopped instance the full pool does not need is terminated",
        FOUR,
        [*all_seen(FOUR), stray("i-x", S.STOPPED)],
        ["TerminateUntracked i-x"],
    ),
    Case(
        "an untracked running instance the full pool does not need is adopted retiring",
        FOUR,
        [*all_seen(FOUR), stray("i-x", S.RUNNING)],
        ["Adopt i-x running shrink"],
    ),
    Case(
        "an untracked running instance on an old image is adopted retiring",
        THREE,
        [*all_seen(THREE), stray("i-x", S.RUNNING, image=OLD)],
        ["Adopt i-x running outdated", "Launch c7i.large@za"],
    ),
    # rolling replacement
    Case(
        "a new image marks every old node and surges one replacement",
        [replace(r, image_id=OLD) for r in FOUR],
        all_seen([replace(r, image_id=OLD) for r in FOUR]),
        [*(f"MarkRetiring n{i} outdated" for i in range(1, 5)), "Launch c7i.large@za"],
    ),
    Case(
        "a warm replacement lets one stopped old node go, and the next is launched",
        [*OLD_STOPPED, WARM_SPARE],
        all_seen([*OLD_STOPPED, WARM_SPARE]),
        ["Terminate n1", "Launch c7i.large@za"],
    ),
    Case(
        "without surge, the unavailable budget terminates first",
        OLD_STOPPED,
        all_seen(OLD_STOPPED),
        ["Terminate n1", "Launch c7i.large@za"],
        {"max_surge_percent": 0, "max_unavailable_percent": 25},
    ),
    Case(
        "old running nodes are never interrupted, even with a spare warm",
        [*(replace(r, state=S.RUNNING) for r in OLD_STOPPED), WARM_SPARE],
        all_seen([*(replace(r, state=S.RUNNING) for r in OLD_STOPPED), WARM_SPARE]),
        [],
    ),
    Case(
        "an old node that powered off goes once its replacement is warm",
        [*(replace(r, state=S.RUNNING) for r in OLD_STOPPED[:3]), OLD_STOPPED[3], WARM_SPARE],
        all_seen(
            [*(replace(r, state=S.RUNNING) for r in OLD_STOPPED[:3]), OLD_STOPPED[3], WARM_SPARE]
        ),
        ["Terminate n4", "Launch c7i.large@zb"],
    ),
    Case(
        "an old node whose replacement is not warm yet stays",
        [*OLD_STOPPED, new("n5", S.RUNNING)],
        [*all_seen(OLD_STOPPED), seen(new("n5", S.RUNNING), booted=False)],
        [],
    ),
    Case(
        "a node past max age is replaced like an outdated one",
        [node("n1", age=timedelta(days=31)), *FOUR[1:]],
        all_seen([node("n1", age=timedelta(days=31)), *FOUR[1:]]),
        ["MarkRetiring n1 expired", "Launch c7i.large@za"],
        {"max_node_age": timedelta(days=30)},
    ),
    Case(
        "an unhealthy node goes before an outdated one",
        [OLD_STOPPED[0], replace(FOUR[1], retiring=R.UNHEALTHY), *FOUR[2:], WARM_SPARE],
        all_seen([OLD_STOPPED[0], FOUR[1], *FOUR[2:], WARM_SPARE]),
        ["Terminate n2", "Launch c7i.large@zb"],
    ),
    # shrink
    Case(
        "shrink terminates the oldest stopped nodes",
        [node(f"n{i}", age=timedelta(days=5 - i)) for i in range(1, 5)],
        all_seen([node(f"n{i}", age=timedelta(days=5 - i)) for i in range(1, 5)]),
        ["Terminate n1 shrink", "Terminate n2 shrink"],
        {"size": 2},
    ),
    Case(
        "shrink terminates stopped nodes and marks running ones, never stops them",
        [FOUR[0], *(replace(r, state=S.RUNNING) for r in FOUR[1:])],
        all_seen([FOUR[0], *(replace(r, state=S.RUNNING) for r in FOUR[1:])]),
        ["MarkRetiring n2 shrink", "Terminate n1 shrink"],
        {"size": 2},
    ),
    Case(
        "shrink removes nodes not provisioned yet first, newest first",
        [*FOUR[:2], new("n3", S.PENDING, age=10 * MIN), new("n4", S.PENDING)],
        [*all_seen(FOUR[:2]), seen(new("n3", S.PENDING, age=10 * MIN)), seen(new("n4", S.PENDING))],
        ["Terminate n4", "Terminate n3"],
        {"size": 2},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case: Case) -> None:
    spec = make_spec(**case.spec)
    result = plan(spec, case.rows, case.instances, T0, backoffs=case.backoffs)
    assert briefs(result) == case.expected
    assert all(action.reason for action in result.actions)
    if case.problem is None:
        assert result.problems == ()
    else:
        assert any(case.problem in p for p in result.problems), result.problems


def test_a_launch_writes_a_fresh_intent_with_a_derived_token_and_the_pool_tags() -> None:
    spec = make_spec(tags={"project": "climate"})
    (launch,) = launches(plan(spec, THREE, all_seen(THREE), T0))
    row = launch.node
    assert row.state is S.LAUNCHING and row.instance_id is None and not row.provisioned
    assert row.image_id == NEW and row.since == T0
    assert row.node_id.startswith("hpc-") and row.client_token == client_token(row.node_id)
    assert len(row.client_token) <= 64
    assert dict(launch.tags) == {"project": "climate", POOL_TAG: "hpc", NODE_TAG: row.node_id}


def test_a_retry_reuses_the_row_and_its_token() -> None:
    pending = new("n4", S.LAUNCHING)
    (launch,) = launches(plan(make_spec(), [*THREE, pending], all_seen(THREE), T0))
    assert launch.node == pending
    assert "retry" in launch.reason


def test_a_fallback_launch_says_why() -> None:
    backoffs = {Placement(TYPES[0], z): T0 + MIN for z in ("za", "zb")}
    (launch,) = launches(plan(make_spec(), THREE, all_seen(THREE), T0, backoffs=backoffs))
    assert "backed off" in launch.reason


def test_new_ids_never_reuse_an_id_in_the_table() -> None:
    spec = make_spec()
    first = [a.node.node_id for a in launches(plan(spec, [], [], T0))]
    stale = replace(new("x", S.FAILED, since=T0 - FAILED_LAUNCH_HOLD), node_id=first[0])
    again = [a.node.node_id for a in launches(plan(spec, [stale], [], T0))]
    assert len(again) == 4 and first[0] not in again and set(first[1:]) <= set(again)


def test_an_adopted_instance_becomes_a_provisioned_row() -> None:
    instance = stray("i-x", S.STOPPED)
    (adopt,) = plan(make_spec(), THREE, [*all_seen(THREE), instance], T0).actions
    assert isinstance(adopt, Adopt)
    row = adopt.node
    assert (row.node_id, row.instance_id, row.provisioned) == ("hpc-i-x", "i-x", True)
    assert (row.state, row.zone, row.subnet_id, row.launched_at) == (
        S.STOPPED,
        "zb",
        "subnet-b",
        instance.launch_time,
    )


def test_actions_come_in_groups_that_free_before_they_take() -> None:
    rows = [
        replace(FOUR[0], image_id=OLD, state=S.RUNNING),
        replace(FOUR[1], image_id=OLD, retiring=R.OUTDATED),
        new("n3", S.STOPPED),
        FOUR[3],
        WARM_SPARE,
    ]
    instances = [*all_seen(rows[:3]), seen(FOUR[3], S.TERMINATED), seen(WARM_SPARE)]
    result = plan(make_spec(max_unavailable_percent=25), rows, instances, T0)
    assert [type(a).__name__ for a in result.actions] == [
        "Forget",
        "MarkRetiring",
        "Terminate",
        "Provision",
        "Launch",
        "Launch",
    ]


def test_the_plan_is_a_function_of_its_inputs() -> None:
    rows = [*OLD_STOPPED[:2], new("n3", S.LAUNCHING)]
    instances = [*all_seen(OLD_STOPPED[:2]), stray("i-x", S.RUNNING)]
    assert plan(make_spec(), rows, instances, T0) == plan(make_spec(), rows, instances, T0)


@pytest.mark.parametrize(
    ("size", "percent", "nodes"), [(64, 10, 7), (64, 0, 0), (3, 1, 1), (0, 50, 0), (10, 100, 10)]
)
def test_budgets_are_percentages_rounded_up(size: int, percent: int, nodes: int) -> None:
    spec = make_spec(size=size, max_surge_percent=percent, max_unavailable_percent=percent)
    assert (spec.max_surge, spec.max_unavailable) == (nodes, nodes)


def test_specs_are_validated_for_the_api() -> None:
    assert (
        isinstance(make_spec(), PoolSpec)
        and PoolSpec(name="p", instance_types=("t",), subnets=make_spec().subnets).size == 64
    )
    for bad in (
        {"size": -1},
        {"name": "Bad_Name"},
        {"max_surge_percent": 101},
        {"max_unavailable_percent": -1},
        {"instance_types": ()},
        {"subnets": ()},
        {"tags": {"hpcfleet:pool": "other"}},
        {"max_node_age": timedelta(hours=23)},
        {"boot_timeout": timedelta(seconds=5)},
    ):
        with pytest.raises(ValueError):
            make_spec(**bad)
    assert make_spec(max_surge_percent=0, max_unavailable_percent=0).problems()
    assert make_spec().problems() == ()


def test_a_recorded_state_carries_the_time_ec2_gives_for_billing() -> None:
    started = T0 - timedelta(seconds=40)
    instances = [*all_seen(THREE), seen(FOUR[3], S.RUNNING, state_since=started)]
    (record,) = plan(make_spec(), FOUR, instances, T0).actions
    assert isinstance(record, RecordState) and record.since == started
