"""Shared pieces of autogrow's service tests: an assembled autogrow on SQLite and the in-memory bus
under a manual clock, a stand-in for the pool that answers PowerOn/PowerOff at once, and ways to
drive the loops one pass at a time so that every step is deterministic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.migrations import upgrade
from services.autogrow.billing import BillingRules
from services.autogrow.cluster import SimulatedCluster
from services.autogrow.policy import PolicySettings
from services.autogrow.service import Autogrow, assemble
from services.autogrow.settings import AutogrowSettings
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.swf import SwfJob
from services.autogrow.tables import MAILBOX
from shared.api import create_app
from shared.bus import Envelope
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.events import (
    Message,
    NodePowerChanged,
    NodeProvisioned,
    PowerOff,
    PowerOn,
    PowerRefused,
    PowerState,
    decode,
)
from shared.scheduler import Scheduler
from shared.service import Runtime, Service
from shared.settings import Settings
from shared.store import create_engine

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
NAMES = [f"node{i:03d}" for i in range(1, 5)]


def settings(**policy: object) -> AutogrowSettings:
    """The simulated scheduler polled every 2 s, nodes idle 120 s go; `policy` overrides knobs."""
    return AutogrowSettings(
        scheduler="simulated",
        poll_interval=2.0,
        policy=PolicySettings.model_validate({"idle_seconds": 120.0, **policy}),
    )


REVISION = "head"


async def autogrow_engine(path: Path) -> AsyncEngine:
    """A SQLite store migrated up to autogrow's revision (whatever other heads exist)."""
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await upgrade(engine, REVISION)
    return engine


@dataclass
class PoolStandIn:
    """Answers PowerOn / PowerOff as the pool would once EC2 has acted: the node is running (or
    stopped) from the moment the command arrives. `silent` ignores commands (a lost command);
    `refusal` refuses them with that reason."""

    bus: MemoryBus
    clock: ManualClock
    names: dict[str, str] = field(default_factory=dict)  # node id -> scheduler name
    received: list[Message] = field(default_factory=list)
    silent: bool = False
    refusal: str | None = None

    async def start(self) -> None:
        await self.bus.subscribe(
            "pool-stand-in", {PowerOn.name(): self._handle, PowerOff.name(): self._handle}
        )

    async def _handle(self, message: Message) -> None:
        assert isinstance(message, PowerOn | PowerOff)
        self.received.append(message)
        if self.silent:
            return
        if self.refusal is not None:
            for node_id in message.node_ids:
                refused = PowerRefused(
                    occurred_at=self.clock.now(),
                    node_id=node_id,
                    command="PowerOn" if isinstance(message, PowerOn) else "PowerOff",
                    reason=self.refusal,
                    decision_id=message.decision_id,
                )
                await self.bus.publish(Envelope.of(refused))
            return
        state = PowerState.RUNNING if isinstance(message, PowerOn) else PowerState.STOPPED
        for node_id in message.node_ids:
            await self.report(node_id, state)

    async def report(self, node_id: str, state: PowerState) -> None:
        await self.bus.publish(
            Envelope.of(
                NodePowerChanged(
                    occurred_at=self.clock.now(),
                    node_id=node_id,
                    state=state,
                    since=self.clock.now(),
                    scheduler_node_name=self.names.get(node_id),
                )
            )
        )

    async def provision(self, node_id: str, name: str, *, at: datetime | None = None) -> None:
        self.names[node_id] = name
        await self.bus.publish(
            Envelope.of(
                NodeProvisioned(
                    occurred_at=at or self.clock.now(),
                    node_id=node_id,
                    instance_id=f"i-{node_id}",
                    image_id="ami-1",
                    instance_type="c6i.large",
                    zone="us-east-1a",
                    scheduler_node_name=name,
                )
            )
        )


@dataclass
class Harness:
    autogrow: Autogrow
    runtime: Runtime
    bus: MemoryBus
    clock: ManualClock
    pool: PoolStandIn

    @property
    def engine(self) -> AsyncEngine:
        return self.runtime.engine

    async def settle(self) -> None:
        """Publish the outbox and wait until every consumer has handled everything, repeatedly,
        until nothing moves (handlers may publish more)."""
        for _ in range(50):
            published = await self.autogrow.service.relay.relay()
            await _drain(self.bus)
            if not published and not any(self.bus.pending(c) for c in ("autogrow",)):
                return
        raise AssertionError("the bus never settled")

    async def tick(self, seconds: float = 0.0) -> None:
        """Move the clock, then one watcher pass and one decision pass, then settle."""
        if seconds:
            self.clock.advance(seconds)
        await self.autogrow.watcher.poll()
        await self.autogrow.decider.step()
        await self.settle()

    async def outbox(self) -> list[Message]:
        """Every message autogrow emitted so far, oldest first."""
        table = MAILBOX.outbox
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(table.c.name, table.c.body).order_by(table.c.id))
            return [decode(row.name, row.body) for row in rows]

    async def commands(self) -> list[PowerOn | PowerOff]:
        return [m for m in await self.outbox() if isinstance(m, PowerOn | PowerOff)]

    @asynccontextmanager
    async def api(self) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(title="autogrow", routers=[self.autogrow.service.router])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://autogrow") as client:
            yield client


async def _drain(bus: MemoryBus) -> None:
    """Wait until the in-memory bus has no message queued or in a handler."""
    for _ in range(10_000):
        queues = bus._queues.values()
        if not any(q.items.qsize() or q.in_flight for q in queues):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the in-memory bus did not drain")


@asynccontextmanager
async def harness(
    tmp_path: Path,
    settings: AutogrowSettings,
    *,
    clock: ManualClock,
    jobs: Sequence[SwfJob] = (),
    nodes: Sequence[str] = (),
    boot_seconds: float = 60.0,
    scheduler: Scheduler | None = None,
    billing: BillingRules | None = None,
) -> AsyncIterator[Harness]:
    """autogrow on SQLite and a started in-memory bus, its handlers subscribed but its loops not
    running (tests drive them with `tick`), with a pool stand-in. The scheduler defaults to the
    simulated one replaying `jobs` on `nodes`, following the pool's power."""
    engine = await autogrow_engine(tmp_path / "autogrow.db")
    if scheduler is None:
        simulated = SimulatedScheduler(
            jobs, clock, nodes=nodes, cores_per_node=settings.policy.cores_per_node
        )
        scheduler = SimulatedCluster(simulated, engine, clock, boot_seconds=boot_seconds)
    bus = MemoryBus()
    runtime = Runtime(settings=Settings(), engine=engine, bus=bus, clock=clock)
    autogrow = assemble(runtime, settings, scheduler, billing=billing or BillingRules())
    await bus.start()
    await bus.subscribe("autogrow", autogrow.service.handlers)
    pool = PoolStandIn(bus, clock)
    await pool.start()
    try:
        yield Harness(autogrow, runtime, bus, clock, pool)
    finally:
        await bus.stop()
        await stop_service(autogrow.service)
        await engine.dispose()


async def stop_service(service: Service) -> None:
    """`Service.stop`, made safe against a lost cancel: `ReconcileLoop._wait` suppresses a
    CancelledError that lands while it awaits its own cancelled waiters, and the loop then runs
    on while `stop()` waits for it forever. Cancel each loop until its task has ended."""
    for loop in [*service.loops, service.relay_loop]:
        task = loop._task
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.2)
    await service.stop()


def simulated(h: Harness) -> SimulatedScheduler:
    assert isinstance(h.autogrow.scheduler, SimulatedCluster)
    return h.autogrow.scheduler.scheduler


def swf_job(job_id: int, submit: int, run_time: int, procs: int) -> SwfJob:
    return SwfJob(
        job_id=job_id,
        submit=submit,
        wait=None,
        run_time=run_time,
        procs=procs,
        allocated_procs=procs,
        requested_procs=procs,
        requested_time=run_time,
        status=1,
        queue=None,
        partition=None,
    )


def node_ids(commands: Sequence[PowerOn | PowerOff], kind: type[PowerOn | PowerOff]) -> list[str]:
    return [n for c in commands if isinstance(c, kind) for n in c.node_ids]


async def provision_all(h: Harness) -> None:
    """Every node of NAMES provisioned by the pool stand-in, and the service caught up."""
    for i, name in enumerate(NAMES, start=1):
        await h.pool.provision(f"n{i}", name)
    await h.settle()
