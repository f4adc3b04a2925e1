"""The simulated scheduler's nodes following the pool's power, where no real machine boots.

In the single-process mode and the simulator a "node" is a name in `SimulatedScheduler`; something
has to play the machine that boots once EC2 runs it and vanishes when EC2 stops it.
`SimulatedCluster` does: before each read of the queue it looks at the pool's power as autogrow
recorded it (its own `autogrow_nodes` table) and brings each node up `boot_seconds` after the pool
reported it running, and down as soon as the pool reports it stopping or stopped. Level-triggered
like everything else: it derives the wanted state from the table on every read, so a lost event or
a restart cannot leave a node up that the pool stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.tables import nodes as nodes_table
from shared.clock import Clock
from shared.events import PowerState
from shared.scheduler import QueueSnapshot, SchedulerNode


@dataclass(frozen=True, slots=True)
class NodePower:
    """A pool node's power as the pool last reported it."""

    name: str  # the scheduler's name for it
    power: PowerState
    since: datetime


def registered(node: NodePower, now: datetime, boot: timedelta) -> bool:
    """Whether the node's machine has booted and registered with the scheduler by `now`."""
    return node.power is PowerState.RUNNING and node.since + boot <= now


class SimulatedCluster:
    """A `Scheduler`: the simulated scheduler, with its nodes up exactly while the pool's are."""

    def __init__(
        self,
        scheduler: SimulatedScheduler,
        engine: AsyncEngine,
        clock: Clock,
        *,
        boot_seconds: float = 60.0,
    ) -> None:
        self.scheduler = scheduler
        self._engine = engine
        self._clock = clock
        self._boot = timedelta(seconds=boot_seconds)
        self._up: set[str] = set()

    def follow(self, power: Iterable[NodePower], now: datetime) -> None:
        """Bring the simulated nodes in line with the pool's power at `now`, in the given order
        (which decides which node a waiting job lands on when several come up at once)."""
        for node in power:
            up = registered(node, now, self._boot)
            if up and node.name not in self._up:
                self.scheduler.node_up(node.name)
                self._up.add(node.name)
            elif not up and node.name in self._up:
                self.scheduler.node_down(node.name)
                self._up.discard(node.name)

    async def _follow_pool(self) -> None:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(
                    nodes_table.c.scheduler_node_name,
                    nodes_table.c.power_state,
                    nodes_table.c.since,
                    nodes_table.c.retired_at,
                )
                .where(nodes_table.c.scheduler_node_name.is_not(None))
                .order_by(nodes_table.c.scheduler_node_name)  # nodes up at once: a stable order
            )
            power = [
                NodePower(
                    row.scheduler_node_name,
                    PowerState.STOPPED if row.retired_at else PowerState(row.power_state),
                    row.since,
                )
                for row in rows
            ]
        self.follow(power, self._clock.now())

    async def snapshot(self) -> QueueSnapshot:
        await self._follow_pool()
        return self.scheduler.listed_snapshot()

    async def nodes(self) -> Sequence[SchedulerNode]:
        await self._follow_pool()
        return await self.scheduler.nodes()

    async def drain(self, node_names: Sequence[str], reason: str) -> None:
        self.scheduler.drain_nodes(node_names)

    async def resume(self, node_names: Sequence[str]) -> None:
        self.scheduler.resume_nodes(node_names)
