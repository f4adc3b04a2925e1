"""A job waits on PowerOn, so the power path asks EC2 as little as it can and never queues behind a
reconcile pass's describe, without the pass or the command acting on a stale view."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from pool_service_kit import START, Harness, Placements, harness, pool_spec

from services.pool.plan import NodeState
from shared.clock import ManualClock
from shared.cloud import Instance, InstanceState
from shared.events import NodePowerChanged, PowerOff, PowerOn, PowerRefused, PowerState


class SlowDescribe(Placements):
    """A FakeCloud whose next pool-wide describe (the pass's) waits until `release` is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.armed = False
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def describe_instances(
        self,
        ids: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        states: Collection[InstanceState] | None = None,
    ) -> list[Instance]:
        if self.armed and ids is None:
            self.armed = False
            self.waiting.set()
            await self.release.wait()
        return await super().describe_instances(ids, tags, states)


def powered(h: Harness, node_id: str) -> list[PowerState]:
    """The power states autogrow heard for a provisioned node (not its first boot's)."""
    return [
        e.state
        for e in h.heard_of(NodePowerChanged)
        if e.node_id == node_id and not getattr(e, "provisioning", False)
    ]


def ops(h: Harness, since: int) -> list[str]:
    return [op for op, _ in h.cloud.calls[since:]]


def power_on(h: Harness, node_id: str) -> PowerOn:
    return PowerOn(
        occurred_at=h.clock.now(), node_ids=(node_id,), reason="t", decision_id=uuid.uuid4()
    )


async def test_a_power_on_of_a_stopped_node_asks_ec2_only_to_start_it(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        node = (await h.rows())[0]
        mark = len(h.cloud.calls)

        await h.power(PowerOn, node.node_id)

        assert ops(h, mark) == ["start_instances"]  # no describe first
        (started,) = h.heard_of(NodePowerChanged)[-1:]
        assert (started.node_id, started.state) == (node.node_id, PowerState.STARTING)


async def test_a_row_that_says_stopped_wrongly_is_checked_with_ec2_and_refused(
    tmp_path: Path,
) -> None:
    """EC2 refuses to start what is gone or still stopping; the command then looks, and says why
    as the describe-first path would."""
    async with harness(tmp_path, spec=pool_spec(size=3)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        gone, stopping, _ = await h.rows()
        await h.cloud.terminate_instances([gone.instance_id])  # behind the pool's back
        await h.cloud.start_instances([stopping.instance_id])
        h.clock.advance(20)
        await h.cloud.stop_instances([stopping.instance_id])  # stopping for 20 s
        mark = len(h.cloud.calls)

        await h.power(PowerOn, gone.node_id, stopping.node_id)

        refusals = {r.node_id: r.reason for r in h.heard_of(PowerRefused)}
        assert "gone" in refusals[gone.node_id]
        assert "still stopping" in refusals[stopping.node_id]
        assert "describe_instances" in ops(h, mark)
        powered = [e for e in h.heard_of(NodePowerChanged) if e.state is PowerState.STARTING]
        assert powered == []
        rows = {r.node_id: r.state for r in await h.rows()}
        assert rows[gone.node_id] == rows[stopping.node_id] == NodeState.STOPPED.value

        await h.run(6, lambda: h.warm("ami-1"))  # the pass replaces the one and records the other


async def test_a_power_command_does_not_wait_for_a_passs_describe(tmp_path: Path) -> None:
    clock = ManualClock(START)
    cloud = SlowDescribe(clock=clock, transition_seconds=20, boot_seconds=40)
    async with harness(tmp_path, spec=pool_spec(size=2), cloud=cloud, clock=clock) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        node = (await h.rows())[0]

        cloud.armed = True
        passing = asyncio.create_task(h.pool.reconciler.reconcile())
        await asyncio.wait_for(cloud.waiting.wait(), 5)
        # the pass is in its describe; the command neither waits for it (PoolBusy after the
        # harness's 2 s lock wait) nor is undone by it
        await asyncio.wait_for(h.pool.desk.handle(power_on(h, node.node_id)), 1)
        assert h.instance_ids_called("start_instances") == [node.instance_id]
        cloud.release.set()
        await passing
        await h.settle()

        (row,) = [r for r in await h.rows() if r.node_id == node.node_id]
        assert row.state == NodeState.PENDING.value  # not set back by the pass's early view
        assert powered(h, node.node_id) == [PowerState.STARTING]

        await h.tick(20)
        assert powered(h, node.node_id) == [PowerState.STARTING, PowerState.RUNNING]


async def test_a_pass_that_acts_in_ec2_looks_again_under_the_lock(tmp_path: Path) -> None:
    """Book-keeping may use the view read before the lock; asking EC2 to do anything may not."""
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))

        def pool_describes(since: int) -> int:
            return sum(
                1
                for op, args in h.cloud.calls[since:]
                if op == "describe_instances" and args.get("ids") is None
            )

        mark = len(h.cloud.calls)
        await h.tick()  # nothing to do
        assert pool_describes(mark) == 1

        await h.image_ready("ami-2")
        mark = len(h.cloud.calls)
        await h.tick()  # the roll starts: a launch
        assert "run_instances" in ops(h, mark)
        assert pool_describes(mark) == 2


async def test_only_a_command_that_leaves_the_pass_work_kicks_it(tmp_path: Path) -> None:
    """A start leaves the pass nothing until EC2 says running; its periodic pass reports that.
    A stop, a termination or a refusal may leave it work: those kick it at once."""
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        first = (await h.rows())[0]
        kicks: list[str] = []
        h.pool.desk.kick = lambda: kicks.append("kick")

        await h.power(PowerOn, first.node_id)
        await h.power(PowerOn, first.node_id)  # again: only reported
        assert kicks == []
        await h.power(PowerOn, "hpc-nonexistent")
        assert kicks == ["kick"]

        await h.tick(20)  # the periodic pass: running
        assert powered(h, first.node_id)[-1] is PowerState.RUNNING
        await h.power(PowerOff, first.node_id)
        assert kicks == ["kick", "kick"]
