"""Builders for the pool planner's tests, and a small simulated world that applies plans.

The world plays the node table, EC2 and autogrow the way the service will: it writes the launch
intent before "calling" EC2, honours client tokens, runs out of capacity where told to, and can lose
the commit after RunInstances (the crash the issue names). Its invariant checks are the planner's
safety properties, so every simulated tick tests them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from services.pool.plan import (
    VISIBILITY_GRACE,
    Action,
    Adopt,
    Bind,
    Forget,
    Launch,
    MarkRetiring,
    NodeRecord,
    NodeState,
    ObservedInstance,
    Placement,
    Plan,
    Provision,
    RecordState,
    Stop,
    Terminate,
    TerminateUntracked,
    client_token,
    plan,
)
from services.pool.spec import NODE_TAG, POOL_TAG, PoolSpec, Subnet
from shared.events import RetireReason

T0 = datetime(2026, 3, 1, tzinfo=UTC)
OLD = "ami-old"
NEW = "ami-new"
TYPES = ("c7i.large", "c6i.large")
SUBNETS = (Subnet(subnet_id="subnet-a", zone="za"), Subnet(subnet_id="subnet-b", zone="zb"))
ZONE_SUBNET = {s.zone: s.subnet_id for s in SUBNETS}
ALIVE = frozenset({NodeState.PENDING, NodeState.RUNNING, NodeState.STOPPING, NodeState.STOPPED})
IN_USE = frozenset({NodeState.PENDING, NodeState.RUNNING, NodeState.STOPPING})
TERMINATING = frozenset({NodeState.SHUTTING_DOWN, NodeState.TERMINATED})


def make_spec(**changes: object) -> PoolSpec:
    fields: dict[str, object] = {
        "name": "hpc",
        "size": 4,
        "instance_types": TYPES,
        "subnets": SUBNETS,
        "image_id": NEW,
        "max_surge_percent": 25,
        "max_unavailable_percent": 0,
    }
    fields.update(changes)
    return PoolSpec.model_validate(fields)


def node(
    node_id: str,
    state: NodeState = NodeState.STOPPED,
    *,
    image: str = NEW,
    provisioned: bool = True,
    age: timedelta = timedelta(days=1),
    zone: str = "za",
    instance_type: str = TYPES[0],
    retiring: RetireReason | None = None,
    last_error: str | None = None,
    since: datetime | None = None,
    now: datetime = T0,
) -> NodeRecord:
    """A node row; launched `age` before `now` unless it has no instance yet."""
    unlaunched = state in (NodeState.LAUNCHING, NodeState.FAILED)
    return NodeRecord(
        node_id=node_id,
        client_token=client_token(node_id),
        image_id=image,
        instance_type=instance_type,
        subnet_id=ZONE_SUBNET[zone],
        zone=zone,
        state=state,
        since=since or (now - age),
        instance_id=None if unlaunched else f"i-{node_id}",
        launched_at=None if unlaunched else now - age,
        provisioned=provisioned,
        retiring=retiring,
        last_error=last_error,
    )


def seen(
    row: NodeRecord, state: NodeState | None = None, *, booted: bool = True, **changes: Any
) -> ObservedInstance:
    """What EC2 shows for a row's instance (by default: agreeing with the row)."""
    instance = ObservedInstance(
        instance_id=row.instance_id or f"i-{row.node_id}",
        state=state or row.state,
        image_id=row.image_id,
        instance_type=row.instance_type,
        zone=row.zone,
        launch_time=row.launched_at or row.since,
        booted=booted,
        tags={POOL_TAG: "hpc", NODE_TAG: row.node_id},
        client_token=row.client_token,
        subnet_id=row.subnet_id,
    )
    return replace(instance, **changes)


def stray(
    instance_id: str,
    state: NodeState = NodeState.STOPPED,
    *,
    image: str = NEW,
    age: timedelta = timedelta(hours=1),
    client_token: str | None = None,
    node_tag: str | None = None,
) -> ObservedInstance:
    """An instance with the pool's tag and no row."""
    tags = {POOL_TAG: "hpc"} | ({NODE_TAG: node_tag} if node_tag else {})
    return ObservedInstance(
        instance_id=instance_id,
        state=state,
        image_id=image,
        instance_type=TYPES[0],
        zone="zb",
        launch_time=T0 - age,
        booted=True,
        tags=tags,
        client_token=client_token,
        subnet_id="subnet-b",
    )


def brief(action: Action) -> str:
    """A one-line summary to compare plans by (launch ids are hashes, so by placement)."""
    match action:
        case Launch(node=row):
            return f"Launch {row.instance_type}@{row.zone}"
        case Adopt(node=row):
            return f"Adopt {row.instance_id} {row.state} {row.retiring or 'fresh'}"
        case Forget(node_id=node_id, retire=retire):
            return f"Forget {node_id}" + (f" {retire}" if retire else "")
        case Terminate(node_id=node_id, retire=retire):
            return f"Terminate {node_id}" + (f" {retire}" if retire else "")
        case MarkRetiring(node_id=node_id, retire=retire):
            return f"MarkRetiring {node_id} {retire}"
        case Bind(node_id=node_id, instance_id=instance_id):
            return f"Bind {node_id} {instance_id}"
        case RecordState(node_id=node_id, state=state):
            return f"RecordState {node_id} {state}"
        case TerminateUntracked(instance_id=instance_id):
            return f"TerminateUntracked {instance_id}"
        case Stop(node_id=node_id) | Provision(node_id=node_id):
            return f"{type(action).__name__} {node_id}"
    raise AssertionError(f"unknown action {action!r}")


def briefs(result: Plan) -> list[str]:
    return [brief(a) for a in result.actions]


def launches(result: Plan) -> list[Launch]:
    return [a for a in result.actions if isinstance(a, Launch)]


# -- the simulated world ----------------------------------------------------------------------


def held(rows: Iterable[NodeRecord]) -> int:
    """Rows that hold (or may be launching) an instance: the pool's size as the planner caps it."""
    return sum(1 for r in rows if r.state not in TERMINATING)


def available(
    rows: Iterable[NodeRecord], instances: Sequence[ObservedInstance], now: datetime
) -> int:
    """Provisioned nodes the scheduler can use, counted the way the planner must count them."""
    by_id = {i.instance_id: i for i in instances}
    count = 0
    for r in rows:
        if not r.provisioned or r.state in TERMINATING or r.instance_id is None:
            continue
        seen_now = by_id.get(r.instance_id)
        if seen_now is None:
            launched = r.launched_at or r.since
            count += now - launched < VISIBILITY_GRACE
        else:
            count += seen_now.state in ALIVE
    return count


def apply_rows(rows: dict[str, NodeRecord], result: Plan, now: datetime) -> None:
    """Apply a plan to the node table alone, as if every cloud call after it failed."""
    for action in result.actions:
        match action:
            case Launch(node=row):
                rows.setdefault(row.node_id, row)
            case Bind(node_id=node_id, instance_id=instance_id, state=state, launched_at=at):
                rows[node_id] = replace(
                    rows[node_id], instance_id=instance_id, state=state, since=now, launched_at=at
                )
            case RecordState(node_id=node_id, state=state, since=since):
                rows[node_id] = replace(rows[node_id], state=state, since=since)
            case Adopt(node=row):
                rows[row.node_id] = row
            case Forget(node_id=node_id):
                del rows[node_id]
            case MarkRetiring(node_id=node_id, retire=retire):
                rows[node_id] = replace(rows[node_id], retiring=retire)
            case Terminate(node_id=node_id, retire=retire):
                row = rows[node_id]
                rows[node_id] = replace(
                    row, state=NodeState.SHUTTING_DOWN, since=now, retiring=row.retiring or retire
                )
            case Stop(node_id=node_id):
                rows[node_id] = replace(rows[node_id], state=NodeState.STOPPING, since=now)
            case Provision(node_id=node_id):
                rows[node_id] = replace(rows[node_id], provisioned=True)
            case TerminateUntracked():
                pass


def check_safety(
    spec: PoolSpec,
    rows: Sequence[NodeRecord],
    instances: Sequence[ObservedInstance],
    result: Plan,
    now: datetime,
) -> None:
    """The properties every plan must have, whatever the world looks like."""
    by_node = {r.node_id: r for r in rows}
    by_id = {i.instance_id: i for i in instances}
    tokens = {r.client_token for r in rows}
    ids = {r.node_id for r in rows}
    for action in result.actions:
        assert action.reason, f"{action!r} has no reason"
        if isinstance(action, Stop):
            assert not by_node[action.node_id].provisioned, "stopped a node autogrow owns"
        if isinstance(action, Terminate):
            row = by_node[action.node_id]
            if row.provisioned and row.state not in TERMINATING:
                shown = by_id.get(action.instance_id)
                state = shown.state if shown else row.state
                assert state is NodeState.STOPPED, f"terminated a provisioned {state} node"
        if isinstance(action, TerminateUntracked):
            shown = by_id[action.instance_id]
            if shown.state in IN_USE:
                duplicate = shown.client_token in tokens or shown.tags.get(NODE_TAG) in ids
                assert duplicate, "terminated an untracked instance that may be in use"

    after = dict(by_node)
    apply_rows(after, result, now)
    new = [a for a in launches(result) if a.node.node_id not in by_node]
    cap = spec.size + spec.max_surge
    assert len({a.node.client_token for a in new} | tokens) == len(new) + len(tokens)
    if new:
        assert held(after.values()) <= cap, "launched beyond size + surge"
    adopted = sum(1 for a in result.actions if isinstance(a, Adopt))
    assert held(after.values()) <= max(held(rows), cap) + adopted

    floor = spec.size - spec.max_unavailable
    before = available(rows, instances, now)
    assert available(after.values(), instances, now) >= min(before, floor), "budget broken"


@dataclass
class World:
    """The node table, EC2 and autogrow, one 30-second tick at a time."""

    spec: PoolSpec
    rng: random.Random
    now: datetime = T0
    rows: dict[str, NodeRecord] = field(default_factory=dict)
    ec2: dict[str, ObservedInstance] = field(default_factory=dict)
    backoffs: dict[Placement, datetime] = field(default_factory=dict)
    no_capacity: set[Placement] = field(default_factory=set)
    crash_rate: float = 0.0  # chance that a RunInstances result is never recorded
    power_rate: float = 0.0  # chance per tick that autogrow starts or stops a provisioned node
    idle: bool = False  # autogrow powers every provisioned node off (the queue is empty)
    made: int = 0

    def observed(self) -> list[ObservedInstance]:
        return list(self.ec2.values())

    def step(self) -> Plan:
        """Plan, check the plan's safety, apply it, then let EC2 and autogrow move."""
        rows, instances = list(self.rows.values()), self.observed()
        result = plan(self.spec, rows, instances, self.now, backoffs=self.backoffs)
        check_safety(self.spec, rows, instances, result, self.now)
        for action in result.actions:
            self._apply(action)
        self._advance()
        return result

    def _apply(self, action: Action) -> None:
        if isinstance(action, Launch):
            self._launch(action)
        elif isinstance(action, Terminate | TerminateUntracked):
            self._set(action.instance_id, NodeState.SHUTTING_DOWN)
            apply_rows(self.rows, Plan(actions=(action,)), self.now)
        elif isinstance(action, Stop):
            self._set(action.instance_id, NodeState.STOPPING)
            apply_rows(self.rows, Plan(actions=(action,)), self.now)
        else:
            apply_rows(self.rows, Plan(actions=(action,)), self.now)

    def _launch(self, action: Launch) -> None:
        row = self.rows.setdefault(action.node.node_id, action.node)
        where = Placement(row.instance_type, row.zone)
        if where in self.no_capacity:
            self.rows[row.node_id] = replace(
                row, state=NodeState.FAILED, since=self.now, last_error="InsufficientCapacity"
            )
            self.backoffs[where] = self.now + timedelta(minutes=10)
            return
        same = [i for i in self.ec2.values() if i.client_token == row.client_token]
        if same:  # EC2 honours the token: the retry gets the first launch's instance
            instance = same[0]
        else:
            self.made += 1
            instance = ObservedInstance(
                instance_id=f"i-{self.made:05d}",
                state=NodeState.PENDING,
                image_id=row.image_id,
                instance_type=row.instance_type,
                zone=row.zone,
                launch_time=self.now,
                booted=False,
                tags=dict(action.tags),
                client_token=row.client_token,
                subnet_id=row.subnet_id,
            )
            self.ec2[instance.instance_id] = instance
        if self.rng.random() >= self.crash_rate:
            self.rows[row.node_id] = replace(
                row,
                instance_id=instance.instance_id,
                state=instance.state,
                since=self.now,
                launched_at=instance.launch_time,
            )

    def _set(self, instance_id: str, state: NodeState) -> None:
        instance = self.ec2.get(instance_id)
        if instance is not None and instance.state is not NodeState.TERMINATED:
            self.ec2[instance_id] = replace(instance, state=state, booted=False)

    def _advance(self) -> None:
        self.now += timedelta(seconds=30)
        for instance_id, inst in list(self.ec2.items()):
            match inst.state:
                case NodeState.PENDING:
                    self.ec2[instance_id] = replace(inst, state=NodeState.RUNNING)
                case NodeState.RUNNING if not inst.booted:
                    self.ec2[instance_id] = replace(inst, booted=True)
                case NodeState.STOPPING:
                    self.ec2[instance_id] = replace(inst, state=NodeState.STOPPED)
                case NodeState.SHUTTING_DOWN:
                    self.ec2[instance_id] = replace(inst, state=NodeState.TERMINATED)
                case NodeState.TERMINATED:
                    del self.ec2[instance_id]
        self.backoffs = {p: t for p, t in self.backoffs.items() if t > self.now}
        if self.power_rate or self.idle:
            self._autogrow()

    def _autogrow(self) -> None:
        """Start or stop provisioned nodes at random, as the queue would make autogrow do."""
        for row in list(self.rows.values()):
            if not row.provisioned or row.instance_id not in self.ec2:
                continue
            if row.state in TERMINATING or self.rng.random() >= max(self.power_rate, self.idle):
                continue
            inst = self.ec2[row.instance_id]
            if inst.state is NodeState.STOPPED and row.retiring is None and not self.idle:
                self.ec2[inst.instance_id] = replace(inst, state=NodeState.PENDING, booted=False)
            elif inst.state is NodeState.RUNNING:
                self.ec2[inst.instance_id] = replace(inst, state=NodeState.STOPPING, booted=False)

    def lose_instance(self) -> None:
        """An instance terminated behind the pool's back."""
        alive = sorted(i for i, inst in self.ec2.items() if inst.state in ALIVE)
        if alive:
            self._set(self.rng.choice(alive), NodeState.TERMINATED)

    def settled(self) -> bool:
        """`size` provisioned, stopped nodes on the current image, nothing else alive."""
        rows = list(self.rows.values())
        alive = [i for i in self.ec2.values() if i.state in ALIVE]
        return (
            len(rows) == self.spec.size
            and all(i.state is NodeState.STOPPED for i in alive)
            and all(
                r.provisioned
                and r.retiring is None
                and r.state is NodeState.STOPPED
                and r.image_id == self.spec.image_id
                for r in rows
            )
            and sorted(i.instance_id for i in alive) == sorted(r.instance_id or "" for r in rows)
        )
