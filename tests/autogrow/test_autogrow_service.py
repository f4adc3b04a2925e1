"""autogrow as a service: the watcher, the decision loop, the outbox and the pool's events, on
SQLite and the in-memory bus under a manual clock, with the simulated scheduler."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from autogrow_kit import (
    NAMES,
    START,
    autogrow_engine,
    harness,
    node_ids,
    provision_all,
    settings,
    simulated,
    swf_job,
)
from sqlalchemy import select

from services.autogrow.service import assemble, make_scheduler
from services.autogrow.settings import AutogrowSettings
from services.autogrow.tables import decisions, nodes
from shared.bus import Envelope
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.events import (
    NodePowerChanged,
    NodeProvisioned,
    NodeRetired,
    NodeRetiring,
    PowerOff,
    PowerOn,
    PowerState,
    QueueDepthChanged,
    RetireReason,
)
from shared.scheduler import QueueSnapshot
from shared.service import Runtime
from shared.settings import Settings


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


async def test_the_watcher_publishes_the_queue_only_when_it_changed(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 10, 300, 1)]
    async with harness(tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES) as h:
        await h.autogrow.watcher.poll()
        clock.advance(2)
        await h.autogrow.watcher.poll()  # nothing happened
        clock.advance(10)
        await h.autogrow.watcher.poll()  # job 1 arrived
        published = [m for m in await h.outbox() if isinstance(m, QueueDepthChanged)]

    assert [m.snapshot.pending_jobs for m in published] == [0, 1]
    assert published[1].snapshot.taken_at == START.replace(second=12)


async def test_waiting_jobs_power_nodes_on_once_with_the_decision_recorded(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 600, 2)]
    async with harness(tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES) as h:
        await provision_all(h)
        h.pool.silent = True  # the command is lost: the pool never reports the nodes starting
        await h.tick()
        await h.tick(2)  # the command is under way: not asked again
        first = await h.commands()
        await h.tick(120)  # ... until it timed out
        again = (await h.commands())[len(first) :]
        async with h.api() as api:
            listed = (await api.get("/autogrow/decisions")).json()

    (power_on,) = first
    assert isinstance(power_on, PowerOn)
    assert power_on.node_ids == ("n1", "n2")
    assert "2 nodes wanted by waiting jobs, 0 idle or booting" in power_on.reason
    assert [c.node_ids for c in again] == [("n1", "n2")]
    _, oldest = listed
    assert oldest["decision_id"] == str(power_on.decision_id) == str(power_on.correlation_id)
    assert oldest["trigger"] == "policy"
    assert oldest["inputs"]["demand_nodes"] == 2
    assert [a["action"] for a in oldest["actions"]] == ["power_on", "power_on"]
    assert oldest["actions"][0]["reason"] == power_on.reason


async def test_nodes_boot_run_the_jobs_then_are_drained_and_powered_off(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 300, 2)]
    async with harness(
        tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES, boot_seconds=30
    ) as h:
        await provision_all(h)
        await h.tick()  # PowerOn n1, n2; the pool reports them running
        for _ in range(15):  # boot (30 s), run (300 s)
            await h.tick(30)
        sched = simulated(h)
        assert sched.jobs[0].end is not None, "the job did not run"
        for _ in range(10):  # idle 120 s, then drain, then off
            await h.tick(30)
        commands = await h.commands()
        async with h.engine.connect() as conn:
            rows = (await conn.execute(select(nodes).order_by(nodes.c.node_id))).mappings().all()
            actions = [
                a["action"]
                for row in await conn.execute(select(decisions.c.actions).order_by(decisions.c.id))
                for a in row.actions
            ]

    assert node_ids(commands, PowerOn) == ["n1", "n2"]
    assert sorted(node_ids(commands, PowerOff)) == ["n1", "n2"]
    assert actions.count("drain") == 2 and actions.count("power_off") == 2
    assert "resume" not in actions
    by_id = {row["node_id"]: row for row in rows}
    assert by_id["n1"]["power_state"] == PowerState.STOPPED.value
    assert by_id["n1"]["drain_requested"], "a drain outlives the power cycle"
    assert by_id["n1"]["requested_power"] is None, "the pool's report settled the command"


async def test_a_node_that_never_registers_is_powered_off_without_a_drain(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 300, 1)]
    async with harness(
        tmp_path,
        settings(boot_timeout_seconds=300),
        clock=clock,
        jobs=jobs,
        nodes=NAMES,
        boot_seconds=10_000,  # never, as far as this test goes
    ) as h:
        await provision_all(h)
        await h.tick()
        for _ in range(11):
            await h.tick(30)
        commands = await h.commands()
        async with h.api() as api:
            listed = (await api.get("/autogrow/decisions")).json()

    assert node_ids(commands, PowerOff) == ["n1"]
    actions = [a for d in reversed(listed) for a in d["actions"]]
    assert [(a["action"], a["node_id"]) for a in actions] == [
        ("power_on", "n1"),
        ("power_on", "n2"),  # the job is not stranded: another node is powered on for it
        ("power_off", "n1"),  # in the same decision, and without a drain
    ]
    assert actions[2]["reason"] == "not registered with the scheduler 300 s after power-on"


async def test_older_news_from_the_pool_does_not_overwrite_newer(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with harness(tmp_path, settings(), clock=clock, nodes=NAMES) as h:
        await provision_all(h)
        clock.advance(60)
        await h.pool.report("n1", PowerState.RUNNING)
        await h.settle()
        await h.pool.provision("n1", "node001", at=START)  # redelivered late, with a new id
        await h.settle()
        async with h.engine.connect() as conn:
            (row,) = (await conn.execute(select(nodes).where(nodes.c.node_id == "n1"))).mappings()

    assert row["power_state"] == PowerState.RUNNING.value


async def test_retired_nodes_are_never_powered_on(tmp_path: Path, clock: ManualClock) -> None:
    jobs = [swf_job(1, 0, 600, 4)]
    async with harness(tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES) as h:
        await provision_all(h)
        retired = NodeRetired(
            occurred_at=clock.now(), node_id="n3", instance_id="i-n3", reason=RetireReason.OUTDATED
        )
        await h.bus.publish(Envelope.of(retired))
        await h.settle()
        await h.tick()
        commands = await h.commands()

    assert node_ids(commands, PowerOn) == ["n1", "n2", "n4"]


async def test_a_queue_published_by_another_watcher_is_decided_on_at_once(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The loops run in the background: the event kicks the decision loop, no tick needed."""
    async with harness(tmp_path, settings(), clock=clock, nodes=NAMES) as h:
        await provision_all(h)
        await h.autogrow.service.start_worker(h.bus)
        await eventually(lambda: h.autogrow.decide_loop.passes > 0, "the loops' first passes")
        clock.advance(1)  # newer than the local read, and short of the next one
        base = await h.autogrow.scheduler.snapshot()
        demand = base.partitions[0].model_copy(update={"pending_jobs": 1, "pending_nodes": 3})
        snapshot = QueueSnapshot(taken_at=clock.now(), partitions=(demand,), nodes=base.nodes)
        await h.bus.publish(
            Envelope.of(QueueDepthChanged(occurred_at=clock.now(), snapshot=snapshot))
        )
        await eventually(h.commands, "a PowerOn in the outbox")
        commands = await h.commands()

    assert node_ids(commands, PowerOn) == ["n1", "n2", "n3"]


async def test_a_refused_power_on_is_logged_and_another_node_is_powered_on(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 600, 1)]
    async with harness(tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES) as h:
        await provision_all(h)
        h.pool.refusal = "EC2 refused to start it: InsufficientInstanceCapacity"
        await h.tick()  # n1 asked, refused
        await h.tick(2)  # n2 asked instead, refused
        h.pool.refusal = None
        await h.tick(2)  # n3 starts
        await h.pool.report("n1", PowerState.STOPPED)  # news from the pool ends n1's back-off
        await h.settle()
        async with h.api() as api:
            listed = (await api.get("/autogrow/decisions")).json()
            held = {n["node_id"]: n["refusal"] for n in (await api.get("/autogrow/nodes")).json()}

    assert [a["node_id"] for d in reversed(listed) for a in d["actions"]] == ["n1", "n2", "n3"]
    first = listed[-1]["actions"][0]
    assert (
        first["error"] == "the pool refused: EC2 refused to start it: InsufficientInstanceCapacity"
    )
    assert listed[0]["actions"][0]["error"] is None
    assert held == {
        "n1": None,
        "n2": "EC2 refused to start it: InsufficientInstanceCapacity",
        "n3": None,
        "n4": None,
    }


async def test_retiring_nodes_are_powered_on_last_and_off_first(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 60, 2)]
    async with harness(
        tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES[:3], boot_seconds=0
    ) as h:
        for i, name in enumerate(NAMES[:3], start=1):
            await h.pool.provision(f"n{i}", name)
        await h.settle()
        retiring = NodeRetiring(
            occurred_at=clock.now(), node_id="n1", instance_id="i-n1", reason=RetireReason.EXPIRED
        )
        await h.bus.publish(Envelope.of(retiring))
        await h.settle()
        await h.tick()  # n2, n3 for the job, not the retiring n1
        await h.pool.report("n1", PowerState.RUNNING)  # an operator started it anyway
        await h.settle()
        for _ in range(5):  # the job ends after 60 s; idle nodes go after 120 s, n1 at once
            await h.tick(30)
        commands = await h.commands()

    assert node_ids(commands, PowerOn) == ["n2", "n3"]
    assert node_ids(commands, PowerOff)[0] == "n1"


async def eventually(check: Callable[[], object], what: str) -> None:
    """Wait (in real time: the loops run in the background) until `check` gives something true."""
    for _ in range(500):
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_after_a_drain_the_next_pass_sees_it_even_at_the_same_instant(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The queue changes (the job ends), the node is drained, and the next pass happens at that
    same instant: it must decide on the scheduler as the drain left it."""
    jobs = [swf_job(1, 0, 200, 1)]
    async with harness(
        tmp_path, settings(idle_seconds=0), clock=clock, jobs=jobs, nodes=NAMES, boot_seconds=0
    ) as h:
        await provision_all(h)
        await h.pool.report("n1", PowerState.RUNNING)
        await h.settle()
        await h.tick()  # up, running the job
        await h.tick(200)  # the job ended just now: drained at once (no idle grace)
        await h.autogrow.decider.step()  # no time passed: re-reads the scheduler first
        await h.settle()
        async with h.api() as api:
            listed = (await api.get("/autogrow/decisions")).json()

    assert [a["action"] for d in reversed(listed) for a in d["actions"]] == ["drain", "power_off"]


async def test_the_simulated_scheduler_from_settings_replays_the_bundled_trace_from_now(
    tmp_path: Path, clock: ManualClock
) -> None:
    """What the single-process mode gets from HPCFLEET_AUTOGROW_SCHEDULER=simulated."""
    engine = await autogrow_engine(tmp_path / "settings.db")
    runtime = Runtime(Settings(), engine, MemoryBus(), clock)
    chosen = AutogrowSettings(scheduler="simulated", simulated_nodes="sim[001-128]")
    try:
        autogrow = assemble(runtime, chosen, make_scheduler(chosen, runtime))
        first = await autogrow.watcher.poll()
        clock.advance(3600)
        later = await autogrow.watcher.poll()
    finally:
        await engine.dispose()

    assert [n.name for n in first.nodes][:2] == ["sim001", "sim002"] and len(first.nodes) == 128
    assert first.pending_jobs == 1, "the trace's first job arrives at once"
    assert later.pending_jobs > 1, "and the next ones as the clock moves"


@pytest.mark.parametrize("power_first", [False, True])
async def test_an_adopted_running_node_is_recorded_running_in_either_order(
    tmp_path: Path, clock: ManualClock, power_first: bool
) -> None:
    """The pool announces an adopted node and its power in one transaction (the same time), the
    power's `since` long before; the bus may deliver them in either order."""
    provisioned = NodeProvisioned(
        occurred_at=clock.now(),
        node_id="n1",
        instance_id="i-n1",
        image_id="ami-1",
        instance_type="c6i.large",
        zone="us-east-1a",
        scheduler_node_name="node001",
    )
    running = NodePowerChanged(
        occurred_at=clock.now(),
        node_id="n1",
        state=PowerState.RUNNING,
        since=clock.now() - timedelta(hours=3),
        scheduler_node_name="node001",
    )
    async with harness(tmp_path, settings(), clock=clock, nodes=NAMES) as h:
        for message in (running, provisioned) if power_first else (provisioned, running):
            await h.autogrow.service.handlers[message.name()](message)
        async with h.engine.connect() as conn:
            row = (await conn.execute(select(nodes))).mappings().one()

    assert (row["power_state"], row["since"]) == ("running", running.since)
