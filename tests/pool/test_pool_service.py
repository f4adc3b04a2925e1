"""pool's reconcile loop on SQLite, the in-memory bus and FakeCloud under a manual clock: a pool
comes up warm, rolls onto a new image within its budgets, and never interrupts a running node."""

from __future__ import annotations

import uuid
from pathlib import Path

from pool_service_kit import Harness, harness, pool_instances, pool_spec

from services.pool.plan import NodeState
from services.pool.spec import POOL_TAG
from shared.cloud import InstanceState, LaunchSpec
from shared.events import (
    BillingModel,
    NodePowerChanged,
    NodeProvisioned,
    NodeRetired,
    NodeRetiring,
    PowerOff,
    PowerOn,
    PowerRefused,
    PowerState,
    RetireReason,
)


async def test_a_pool_waits_for_its_image_then_comes_up_warm(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec()) as h:
        await h.tick()
        async with h.api() as client:
            view = (await client.get("/pool/pools/hpc")).json()
        assert view["problems"] == ["no image yet: waiting for the first ImageReady"]
        assert h.launches() == []

        await h.image_ready("ami-1", billing=BillingModel.HOURLY)
        await h.run(12, lambda: h.warm("ami-1"))

        assert len(h.launches()) == 4  # one RunInstances per node, none repeated
        provisioned = h.heard_of(NodeProvisioned)
        assert sorted(p.scheduler_node_name for p in provisioned) == [
            "node001",
            "node002",
            "node003",
            "node004",
        ]
        assert {p.billing for p in provisioned} == {BillingModel.HOURLY}
        assert {p.pool for p in provisioned} == {"hpc"}
        async with h.api() as client:
            view = (await client.get("/pool/pools/hpc")).json()
        assert view["problems"] == []
        assert view["available"] == 4
        assert view["by_state"] == {"stopped": 4}
        assert view["replacement"]["complete"] is True


async def test_image_ready_rolls_every_node_within_the_budgets(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=4, max_surge_percent=25)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        old = {i.instance_id for i in h.alive()}

        await h.image_ready("ami-2")
        worst_available, most_alive = 4, 0
        for _ in range(60):
            await h.tick()
            rows = {r.instance_id: r for r in await h.rows()}
            alive = h.alive()
            most_alive = max(most_alive, len(alive))
            available = sum(
                1
                for i in alive
                if i.state is InstanceState.STOPPED
                and rows.get(i.instance_id) is not None
                and rows[i.instance_id].provisioned
            )
            worst_available = min(worst_available, available)
            if await h.warm("ami-2"):
                break
        else:
            raise AssertionError(f"the roll did not finish: {await h.rows()}")

        assert most_alive <= 5  # size + 25 % surge (one node)
        assert worst_available >= 4  # max unavailable 0 %: create before destroy
        assert old.isdisjoint(i.instance_id for i in h.alive())
        retired = h.heard_of(NodeRetired)
        assert sorted(r.instance_id for r in retired) == sorted(old)
        assert {r.reason for r in retired} == {RetireReason.OUTDATED}
        assert len(h.heard_of(NodeProvisioned)) == 8
        assert len({a["client_token"] for a in h.launches()}) == len(h.launches()) == 8


async def test_a_busy_node_is_never_stopped_and_is_replaced_once_powered_off(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, spec=pool_spec(size=4, max_surge_percent=25)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        busy = (await h.rows())[0]
        await h.power(PowerOn, busy.node_id)
        await h.run(4, lambda: _state(h, busy.node_id, NodeState.RUNNING))
        await h.queue(busy=[busy.scheduler_node_name])
        mark = len(h.cloud.calls)

        await h.image_ready("ami-2")
        await h.run(60, lambda: _only_old_is(h, busy.node_id))
        assert busy.instance_id not in h.instance_ids_called("stop_instances", mark)
        assert busy.instance_id not in h.instance_ids_called("terminate_instances", mark)
        (retiring,) = [r for r in h.heard_of(NodeRetiring) if r.node_id == busy.node_id]
        assert retiring.reason is RetireReason.OUTDATED

        await h.power(PowerOff, busy.node_id)  # autogrow asks, but the scheduler says busy
        (refused,) = h.heard_of(PowerRefused)
        assert refused.node_id == busy.node_id and "has jobs" in refused.reason
        assert busy.instance_id not in h.instance_ids_called("stop_instances", mark)

        await h.queue(idle=[busy.scheduler_node_name])
        await h.power(PowerOff, busy.node_id)
        assert busy.instance_id in h.instance_ids_called("terminate_instances", mark)
        assert busy.instance_id not in h.instance_ids_called("stop_instances", mark)
        await h.run(10, lambda: h.warm("ami-2"))
        assert len(pool_instances(h.cloud)) == 4


async def test_one_power_off_that_terminates_one_node_and_stops_another(tmp_path: Path) -> None:
    """Found by the chaos run (seed 2): the rows' updates differed in their columns (a termination
    also sets `retiring`), so the one statement failed and every such command failed once."""
    async with harness(tmp_path, spec=pool_spec(size=2, max_surge_percent=50)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        first, second = await h.rows()
        await h.power(PowerOn, first.node_id, second.node_id)
        await h.run(4, lambda: _state(h, second.node_id, NodeState.RUNNING))
        await h.queue(busy=[first.scheduler_node_name, second.scheduler_node_name])
        await h.image_ready("ami-2")
        await h.run(12, lambda: _fresh_stopped(h))  # the surge node, while both old ones run
        await h.queue(idle=[first.scheduler_node_name, second.scheduler_node_name])

        command = PowerOff(
            occurred_at=h.clock.now(),
            node_ids=(first.node_id, second.node_id),
            reason="idle",
            decision_id=uuid.uuid4(),
        )
        await h.pool.desk.handle(command)  # raised before the fix

        rows = {r.node_id: r for r in await h.rows()}
        assert rows[first.node_id].state == NodeState.SHUTTING_DOWN.value  # within the budget
        assert rows[first.node_id].retiring == RetireReason.OUTDATED.value
        assert rows[second.node_id].state == NodeState.STOPPING.value  # the budget is spent
        assert h.instance_ids_called("terminate_instances") == [first.instance_id]
        assert second.instance_id in h.instance_ids_called("stop_instances")


async def test_power_on_and_off_report_when_billing_starts_and_ends(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        node = (await h.rows())[0]
        asked_at = h.clock.now()

        await h.power(PowerOn, node.node_id)
        await h.tick()
        await h.power(PowerOn, node.node_id)  # again: only reported
        powered = [e for e in h.heard_of(NodePowerChanged) if not e.provisioning]
        started = [e for e in powered if e.node_id == node.node_id]
        assert [(e.state, e.since) for e in started] == [
            (PowerState.STARTING, asked_at),
            (PowerState.RUNNING, asked_at.replace(second=20)),  # EC2's 20 s to running
            (PowerState.RUNNING, asked_at.replace(second=20)),
        ]
        assert h.instance_ids_called("start_instances") == [node.instance_id]
        assert {e.scheduler_node_name for e in started} == {node.scheduler_node_name}

        stop_asked = h.clock.now()
        await h.power(PowerOff, node.node_id)
        await h.tick()
        powered = [e for e in h.heard_of(NodePowerChanged) if not e.provisioning]
        stopped = [e for e in powered if e.node_id == node.node_id][3:]
        assert [(e.state, e.since) for e in stopped] == [
            (PowerState.STOPPING, stop_asked),
            (PowerState.STOPPED, stop_asked.replace(second=stop_asked.second + 20)),
        ]


async def test_power_commands_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2, max_surge_percent=50)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        await h.image_ready("ami-2")
        await h.power(PowerOn, "hpc-nonexistent")
        await h.run(12, lambda: _fresh_stopped(h))
        (old,) = [r for r in await h.rows() if r.image_id == "ami-1" and r.state == "stopped"]
        await h.power(PowerOn, old.node_id)  # outdated while a fresh node is stopped

        refusals = {r.node_id: r.reason for r in h.heard_of(PowerRefused)}
        assert refusals["hpc-nonexistent"] == "unknown node: not in any pool"
        assert "outdated" in refusals[old.node_id] and "fresh" in refusals[old.node_id]
        assert h.instance_ids_called("start_instances") == []


async def test_a_redelivered_power_command_acts_once(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=1)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        (node,) = await h.rows()
        command = await h.power(PowerOn, node.node_id)
        await h.publish(command)  # the bus delivers it again

        assert h.instance_ids_called("start_instances") == [node.instance_id]
        assert len([e for e in h.heard_of(NodePowerChanged) if not e.provisioning]) == 1


async def test_an_instance_terminated_behind_the_pools_back_is_replaced(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=3)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        victim = (await h.rows())[1]
        await h.cloud.terminate_instances([victim.instance_id])

        await h.run(12, lambda: h.warm("ami-1"))
        (retired,) = h.heard_of(NodeRetired)
        assert (retired.node_id, retired.reason) == (victim.node_id, RetireReason.UNHEALTHY)
        assert victim.node_id not in {r.node_id for r in await h.rows()}
        # the replacement takes the freed scheduler name
        assert victim.scheduler_node_name in {r.scheduler_node_name for r in await h.rows()}


async def test_untracked_instances_with_the_pools_tag_are_collected(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        stray = LaunchSpec(
            image_id="ami-1",
            instance_type="c7i.large",
            subnet_id="subnet-a",
            zone="us-east-1a",
            tags={POOL_TAG: "hpc"},
        )
        (stopped,) = await h.cloud.run_instances(stray, 1, "someone-elses-token")
        (running,) = await h.cloud.run_instances(stray, 1, "another-token")
        h.clock.advance(30)
        await h.cloud.stop_instances([stopped.instance_id])

        await h.tick()
        await h.tick()
        # a stopped one is nobody's: terminated; a running one may run jobs: adopted, retiring
        assert stopped.instance_id in h.instance_ids_called("terminate_instances")
        (adopted,) = [
            p for p in h.heard_of(NodeProvisioned) if p.instance_id == running.instance_id
        ]
        (retiring,) = h.heard_of(NodeRetiring)
        assert (retiring.node_id, retiring.reason) == (adopted.node_id, RetireReason.SHRINK)
        powered = [e for e in h.heard_of(NodePowerChanged) if e.node_id == adopted.node_id]
        assert [e.state for e in powered] == [PowerState.RUNNING]

        await h.power(PowerOff, adopted.node_id)  # autogrow lets it go: terminated at once
        await h.run(6, lambda: h.warm("ami-1"))
        assert running.instance_id in h.instance_ids_called("terminate_instances")


async def _state(h: Harness, node_id: str, state: NodeState) -> bool:
    rows = {r.node_id: r for r in await h.rows()}
    return rows[node_id].state == state.value


async def _only_old_is(h: Harness, node_id: str) -> bool:
    """Every node is fresh and warm but the busy one, which is marked and still running."""
    rows = await h.rows()
    spec = await h.spec()
    others = [r for r in rows if r.node_id != node_id]
    (busy,) = [r for r in rows if r.node_id == node_id]
    return (
        busy.retiring == RetireReason.OUTDATED.value
        and busy.state == NodeState.RUNNING.value
        and len([r for r in others if r.provisioned and r.image_id == spec.image_id]) >= 4
        and all(r.state == NodeState.STOPPED.value for r in others)
        and all(r.image_id == spec.image_id for r in others)
    )


async def _fresh_stopped(h: Harness) -> bool:
    rows = await h.rows()
    return any(
        r.provisioned and r.image_id == "ami-2" and r.state == NodeState.STOPPED.value for r in rows
    )
