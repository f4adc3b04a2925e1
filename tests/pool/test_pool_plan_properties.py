"""Properties of the pool planner over arbitrary (messy) worlds, and convergence in a simulation."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pool_kit import (
    NEW,
    OLD,
    T0,
    TYPES,
    World,
    check_safety,
    launches,
    make_spec,
    node,
    seen,
    stray,
)

from services.pool.plan import (
    NodeRecord,
    NodeState,
    ObservedInstance,
    Placement,
    client_token,
    plan,
)
from services.pool.spec import PoolSpec
from shared.events import RetireReason

S = NodeState
EC2_STATES = [s for s in NodeState if s not in (S.LAUNCHING, S.FAILED)]
ALIVE = [S.PENDING, S.RUNNING, S.STOPPING, S.STOPPED]

Snapshot = tuple[PoolSpec, list[NodeRecord], list[ObservedInstance], dict[Placement, datetime]]


@st.composite
def specs(draw: st.DrawFn) -> PoolSpec:
    surge = draw(st.integers(0, 100))
    return make_spec(
        size=draw(st.integers(0, 10)),
        max_surge_percent=surge,
        max_unavailable_percent=draw(st.integers(0 if surge else 1, 100)),
        max_node_age=draw(st.sampled_from([None, timedelta(days=7), timedelta(days=30)])),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    """Any node table and EC2 listing the pool may meet, including ones after faults."""
    rows: list[NodeRecord] = []
    instances: list[ObservedInstance] = []
    for i in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["launching", "failed", "alive", "terminating"]))
        age = timedelta(minutes=draw(st.sampled_from([0, 1, 3, 20, 45, 60 * 24, 60 * 24 * 40])))
        common: dict[str, Any] = {
            "image": draw(st.sampled_from([OLD, NEW])),
            "zone": draw(st.sampled_from(["za", "zb"])),
            "age": age,
            "instance_type": draw(st.sampled_from(TYPES)),
        }
        if kind in ("launching", "failed"):
            state = S.LAUNCHING if kind == "launching" else S.FAILED
            row = node(f"n{i}", state, provisioned=False, **common)
            if draw(st.booleans()):
                state = draw(st.sampled_from(EC2_STATES))
                instances.append(seen(row, state, booted=draw(st.booleans())))
        else:
            provisioned = draw(st.booleans())
            row = node(
                f"n{i}",
                draw(st.sampled_from(ALIVE)) if kind == "alive" else S.SHUTTING_DOWN,
                provisioned=provisioned,
                retiring=draw(st.none() | st.sampled_from(RetireReason)) if provisioned else None,
                **common,
            )
            shown = draw(st.sampled_from(["absent", "same", "other"]))
            if shown != "absent":
                state = row.state if shown == "same" else draw(st.sampled_from(EC2_STATES))
                instances.append(seen(row, state, booted=draw(st.booleans())))
        rows.append(row)
    for j in range(draw(st.integers(0, 4))):
        owner = draw(st.none() | st.sampled_from([r.node_id for r in rows] or ["nobody"]))
        by_token = draw(st.booleans())
        instances.append(
            stray(
                f"i-x{j}",
                draw(st.sampled_from(EC2_STATES)),
                image=draw(st.sampled_from([OLD, NEW])),
                client_token=client_token(owner) if owner and by_token else None,
                node_tag=owner if owner and not by_token else None,
            )
        )
    backoffs = {
        Placement(t, z): T0 + timedelta(minutes=draw(st.integers(-5, 10)))
        for t in TYPES
        for z in ("za", "zb")
        if draw(st.booleans())
    }
    return draw(specs()), rows, instances, backoffs


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(snapshots())
def test_every_plan_is_safe(snapshot: Snapshot) -> None:
    """Never stops or terminates a node in use; never launches past size + surge; never takes
    more than max unavailable out; never reuses a client token; every action says why."""
    spec, rows, instances, backoffs = snapshot
    check_safety(spec, rows, instances, plan(spec, rows, instances, T0, backoffs=backoffs), T0)


@FAST
@given(snapshots())
def test_a_second_plan_with_the_intents_recorded_launches_nothing_new(snapshot: Snapshot) -> None:
    spec, rows, instances, backoffs = snapshot
    first = plan(spec, rows, instances, T0, backoffs=backoffs)
    recorded = {r.node_id: r for r in rows}
    for launch in launches(first):
        recorded.setdefault(launch.node.node_id, launch.node)
    second = plan(spec, list(recorded.values()), instances, T0, backoffs=backoffs)
    assert {a.node.node_id for a in launches(second)} <= set(recorded)
    assert second == plan(spec, list(recorded.values()), instances, T0, backoffs=backoffs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    spec=specs(),
    chaos=st.integers(0, 40),
    resize=st.none() | st.integers(0, 10),
    strays=st.lists(st.tuples(st.sampled_from(ALIVE), st.sampled_from([OLD, NEW])), max_size=3),
)
def test_the_pool_converges_to_size_warm_nodes_on_the_newest_image(
    seed: int,
    spec: PoolSpec,
    chaos: int,
    resize: int | None,
    strays: list[tuple[NodeState, str]],
) -> None:
    """A cold start on the old image, leftovers from another life, crashes after RunInstances,
    capacity outages, lost instances and autogrow powering nodes at random; then a new image
    and maybe a new size. Once the faults stop and the queue empties, the pool settles."""
    rng = random.Random(seed)
    world = World(spec.model_copy(update={"image_id": OLD}), rng, crash_rate=0.3, power_rate=0.2)
    for j, (state, image) in enumerate(strays):
        world.ec2[f"i-s{j}"] = stray(f"i-s{j}", state, image=image)
    outage = {Placement(t, z) for t in TYPES for z in ("za", "zb") if rng.random() < 0.5}
    for tick in range(chaos):
        world.no_capacity = outage if tick % 10 < 5 else set()
        if rng.random() < 0.05:
            world.lose_instance()
        if tick == chaos // 2:
            world.spec = world.spec.model_copy(update={"image_id": NEW})
        world.step()
    world.spec = world.spec.model_copy(
        update={"image_id": NEW, "size": spec.size if resize is None else resize}
    )
    world.no_capacity, world.crash_rate, world.power_rate, world.idle = set(), 0.0, 0.0, True
    for _ in range(400):
        if world.settled():
            break
        world.step()
    assert world.settled(), (world.spec, sorted(world.rows.values(), key=lambda r: r.node_id))
    assert plan(world.spec, list(world.rows.values()), world.observed(), world.now).actions == ()
    tokens = [i.client_token for i in world.observed() if i.client_token]
    assert len(tokens) == len(set(tokens)), "an intent was launched twice"


def test_a_crash_between_run_instances_and_its_commit_leaves_no_duplicate() -> None:
    """With every RunInstances result lost, the plan still finds each instance by its token."""
    world = World(make_spec(), random.Random(1), crash_rate=1.0)
    world.step()
    launched = dict(world.ec2)
    assert len(launched) == 4 and all(r.instance_id is None for r in world.rows.values())
    world.crash_rate = 0.0
    for _ in range(20):
        world.step()
    assert world.settled() and set(world.ec2) == set(launched)


def test_capacity_everywhere_out_keeps_the_nodes_and_recovers() -> None:
    spec = make_spec()
    world = World(spec, random.Random(2))
    for _ in range(10):
        world.step()
    assert world.settled()
    world.spec = spec.model_copy(update={"size": 6})
    world.no_capacity = {Placement(t, z) for t in TYPES for z in ("za", "zb")}
    for _ in range(10):
        result = world.step()
    assert any("insufficient capacity" in p for p in result.problems)
    assert sum(r.provisioned for r in world.rows.values()) == 4
    world.no_capacity = set()
    for _ in range(40):
        world.step()
    assert world.settled() and len(world.rows) == 6


def test_a_rollout_never_interrupts_a_busy_node() -> None:
    """A node running throughout the rollout keeps running on the old image until it stops."""
    world = World(make_spec(image_id=OLD, size=8), random.Random(3))
    for _ in range(10):
        world.step()
    busy = next(iter(world.rows.values()))
    world.ec2[busy.instance_id or ""] = replace(
        world.ec2[busy.instance_id or ""], state=S.RUNNING, booted=True
    )
    world.spec = world.spec.model_copy(update={"image_id": NEW})
    for _ in range(100):
        world.step()
        assert world.ec2[busy.instance_id or ""].state is S.RUNNING
    assert world.rows[busy.node_id].retiring is RetireReason.OUTDATED
    others = [r for r in world.rows.values() if r.node_id != busy.node_id]
    assert sum(r.image_id == NEW and r.provisioned for r in others) == 8
    world.idle = True
    for _ in range(10):
        world.step()
    assert world.settled() and busy.node_id not in world.rows
