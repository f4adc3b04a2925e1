"""A new node's provisioning boot (the pool launches it, it boots once, the pool stops it): EC2
bills that run, so autogrow records it for the cost, but the node is not one jobs can run on
until its NodeProvisioned, so the policy neither counts it nor powers it off (chaos seed 7 found
10.9 node-hours of such boots missing from the cost)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from autogrow_kit import START, Harness, harness, node_ids, swf_job
from sqlalchemy import select

from services.autogrow.policy import PolicySettings
from services.autogrow.settings import AutogrowSettings
from services.autogrow.tables import nodes, power_intervals
from shared.bus import Envelope
from shared.clock import ManualClock
from shared.events import NodePowerChanged, PowerOff, PowerOn, PowerState


def settings() -> AutogrowSettings:
    return AutogrowSettings(
        scheduler="simulated",
        poll_interval=2.0,
        policy=PolicySettings.model_validate({"idle_seconds": 120.0}),
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


async def boot(h: Harness, node_id: str, state: PowerState, since_seconds: float) -> None:
    """The pool's event for a provisioning boot, as `services.pool.reconcile` sends it."""
    message = NodePowerChanged(
        occurred_at=h.clock.now(),
        node_id=node_id,
        state=state,
        since=START + timedelta(seconds=since_seconds),
        scheduler_node_name=f"node-{node_id}",
        provisioning=True,
    )
    await h.bus.publish(Envelope.of(message))
    await h.settle()


async def rows(h: Harness) -> tuple[dict[str, dict[str, object]], list[tuple[object, ...]]]:
    async with h.engine.connect() as conn:
        found = (await conn.execute(select(nodes))).mappings().all()
        intervals = await conn.execute(
            select(
                power_intervals.c.node_id, power_intervals.c.started_at, power_intervals.c.ended_at
            ).order_by(power_intervals.c.node_id, power_intervals.c.started_at)
        )
        return {r["node_id"]: dict(r) for r in found}, [tuple(i) for i in intervals]


async def test_a_provisioning_boot_is_billed_but_is_no_node_for_jobs(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 600, 1)]  # one job waiting: it needs one node
    async with harness(
        tmp_path, settings(), clock=clock, jobs=jobs, nodes=["node001", "node-new"]
    ) as h:
        await h.pool.provision("n1", "node001")
        await h.settle()
        await boot(h, "new", PowerState.RUNNING, 0)  # launched; first seen running

        await h.tick()
        for _ in range(4):  # it boots for two minutes, idle as far as anyone could tell
            await h.tick(30)
        known, open_boot = await rows(h)
        commands = await h.commands()
        async with h.api() as api:
            during = (await api.get("/autogrow/cost")).json()

        await boot(h, "new", PowerState.STOPPED, 150)  # the pool stopped it: the boot ended
        clock.advance(10)
        await h.pool.provision("new", "node-new")
        await h.settle()
        after, intervals = await rows(h)
        async with h.api() as api:
            cost = (await api.get("/autogrow/cost")).json()

    # the booting node is not the policy's: the job got a provisioned node, and the booting one
    # was neither counted as capacity nor drained nor powered off
    assert "new" not in known
    assert node_ids(commands, PowerOn) == ["n1"]
    assert "new" not in node_ids(commands, PowerOff)
    assert not any(c for c in commands if isinstance(c, PowerOff))
    # ... but its run is billed, from its start until the pool stopped it
    assert ("new", START, None) in open_boot
    assert during["running_now"] == 2  # the boot and n1, both paid for
    assert ("new", START, START + timedelta(seconds=150)) in intervals
    assert cost["running_now"] == 1  # n1 still runs its job
    assert cost["starts"] == 2
    # and its NodeProvisioned makes it a stopped node, whatever the boot's events said
    assert after["new"]["power_state"] == PowerState.STOPPED.value
    assert after["new"]["scheduler_node_name"] == "node-new"


async def test_a_boot_event_after_the_node_was_provisioned_changes_only_the_cost(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Events may arrive out of order: a boot's late "running" must not make the provisioned
    (stopped) node look running, nor its late "stopped" settle a command."""
    async with harness(tmp_path, settings(), clock=clock, nodes=["node001"]) as h:
        clock.advance(200)
        await h.pool.provision("n1", "node001")
        await h.settle()
        before, _ = await rows(h)
        await boot(h, "n1", PowerState.RUNNING, 0)
        await boot(h, "n1", PowerState.STOPPED, 120)
        after, intervals = await rows(h)

    assert after["n1"] == before["n1"]
    assert intervals == [("n1", START, START + timedelta(seconds=120))]
