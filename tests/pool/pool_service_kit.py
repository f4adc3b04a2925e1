"""Shared pieces of pool's service tests: the pool service on SQLite (migrated to its revision),
the in-memory bus and a FakeCloud under a manual clock, passes driven one at a time, a recorder of
what the pool announced, and clouds that run out of capacity or crash on cue."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.migrations import upgrade
from services.pool.plan import NodeState
from services.pool.service import Pool, assemble
from services.pool.settings import PoolSettings
from services.pool.spec import POOL_TAG, PoolSpec, Subnet
from services.pool.tables import nodes
from shared.api import create_app
from shared.bus import Envelope
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.cloud import Cloud, Instance, InstanceState, InsufficientCapacity, LaunchSpec
from shared.cloud.fake import FakeCloud
from shared.events import (
    BillingModel,
    ImageReady,
    Message,
    NodePowerChanged,
    NodeProvisioned,
    NodeRetired,
    NodeRetiring,
    PowerOff,
    PowerOn,
    PowerRefused,
    QueueDepthChanged,
)
from shared.scheduler import NodeActivity, QueueSnapshot, SchedulerNode
from shared.service import Runtime
from shared.settings import Settings
from shared.store import create_engine

PG_ADMIN_DSN = os.environ.get("HPCFLEET_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/postgres")
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
REVISION = "0002_pool"
REGION = "us-east-1"
TYPES = ("c7i.large", "c6i.large")
SUBNETS = (
    Subnet(subnet_id="subnet-a", zone="us-east-1a"),
    Subnet(subnet_id="subnet-b", zone="us-east-1b"),
)
ANNOUNCED = (NodeProvisioned, NodeRetired, NodeRetiring, NodePowerChanged, PowerRefused)
ALIVE = frozenset(
    {InstanceState.PENDING, InstanceState.RUNNING, InstanceState.STOPPING, InstanceState.STOPPED}
)


def pool_spec(**changes: Any) -> PoolSpec:
    fields: dict[str, Any] = {
        "name": "hpc",
        "size": 4,
        "instance_types": TYPES,
        "subnets": SUBNETS,
        "max_surge_percent": 25,
        "max_unavailable_percent": 0,
    }
    fields.update(changes)
    return PoolSpec.model_validate(fields)


def fast_settings(**changes: Any) -> PoolSettings:
    """Retries without real waiting, so a throttle test takes milliseconds."""
    values: dict[str, Any] = {"retry_seconds": 0.001, "cloud_attempts": 3, "lock_wait_seconds": 2}
    values.update(changes)
    return PoolSettings(**values)


async def pool_engine(path: Path) -> AsyncEngine:
    """A SQLite store migrated up to pool's revision (whatever other heads exist)."""
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await upgrade(engine, REVISION)
    return engine


class Placements(FakeCloud):
    """A FakeCloud where chosen instance types have no capacity in chosen zones."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.no_capacity: set[tuple[str, str]] = set()

    async def run_instances(
        self, spec: LaunchSpec, count: int, client_token: str
    ) -> list[Instance]:
        if (spec.instance_type, spec.zone or "") in self.no_capacity:
            self.calls.append(("run_instances", {"spec": spec, "refused": True}))
            raise InsufficientCapacity("InsufficientInstanceCapacity", "no capacity")
        return await super().run_instances(spec, count, client_token)


class Crash(BaseException):
    """The worker dies: nothing after this point of the pass runs (not an error it handles)."""


class Crashing:
    """A Cloud that records every call and kills the worker at the `nth` call of `operation`
    (none: never), before or after the call took effect; every call goes to `cloud`, and none at
    all once the worker is dead (the calls a dead worker still had in flight never happen)."""

    def __init__(
        self, cloud: Cloud, operation: str | None = None, nth: int = 1, *, after: bool = True
    ) -> None:
        self._cloud = cloud
        self.operation = operation
        self.nth = nth
        self.after = after
        self.seen = 0
        self.dead = False
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._cloud, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise Crash("the worker is dead")
            self.calls.append((name, args))
            if name == self.operation:
                self.seen += 1
                if self.seen == self.nth:
                    self.dead = True
                    if self.after:
                        await target(*args, **kwargs)
                    raise Crash(f"killed at {name} #{self.nth}")
            return await target(*args, **kwargs)

        return call


@asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database migrated to pool's revision; dropped afterwards."""
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        raise AssertionError("PostgreSQL is not reachable on 127.0.0.1:5432; start it") from None
    name = f"hpcfleet_pool_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
    url = f"{base}/{name}"
    engine = create_engine(url)
    try:
        await upgrade(engine, REVISION)
    finally:
        await engine.dispose()
    try:
        yield url
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Harness:
    runtime: Runtime
    bus: MemoryBus
    clock: ManualClock
    cloud: FakeCloud
    settings: PoolSettings
    pool: Pool
    heard: list[Message] = field(default_factory=list)

    @property
    def engine(self) -> AsyncEngine:
        return self.runtime.engine

    async def settle(self) -> None:
        """Publish pool's outbox and wait until every consumer handled everything."""
        for _ in range(50):
            await drain(self.bus)
            if not await self.pool.service.relay.relay():
                return
        raise AssertionError("the bus never settled")

    async def tick(self, seconds: float = 30.0) -> None:
        """Move the clock, run one reconcile pass, then settle the bus."""
        if seconds:
            self.clock.advance(seconds)
        await self.pool.reconciler.reconcile()
        await self.settle()

    async def run(
        self, ticks: int, until: Callable[[], Awaitable[bool]], *, seconds: float = 30.0
    ) -> int:
        """Tick until `until()` holds; returns the ticks it took."""
        for n in range(ticks):
            await self.tick(seconds)
            if await until():
                return n + 1
        raise AssertionError(f"not converged after {ticks} ticks: {await self.rows()}")

    async def publish(self, message: Message) -> None:
        await self.bus.publish(Envelope.of(message))
        await self.settle()

    async def put(self, spec: PoolSpec) -> httpx.Response:
        async with self.api() as client:
            return await client.put(f"/pool/pools/{spec.name}", json=spec.model_dump(mode="json"))

    async def image_ready(
        self,
        image_id: str,
        *,
        built_at: datetime | None = None,
        recipe: str = "linux",
        billing: BillingModel = BillingModel.PER_SECOND,
    ) -> None:
        await self.publish(
            ImageReady(
                occurred_at=self.clock.now(),
                recipe=recipe,
                images={REGION: image_id},
                version=image_id,
                base_image="ami-base",
                built_at=built_at or self.clock.now(),
                billing=billing,
            )
        )

    async def power(self, kind: type[PowerOn | PowerOff], *node_ids: str) -> Message:
        command = kind(
            occurred_at=self.clock.now(),
            node_ids=node_ids,
            reason="test",
            decision_id=uuid.uuid4(),
        )
        await self.publish(command)
        return command

    async def queue(self, busy: Sequence[str] = (), idle: Sequence[str] = ()) -> None:
        """A scheduler snapshot with these nodes busy (a job each) and these idle."""
        snapshot = QueueSnapshot(
            taken_at=self.clock.now(),
            nodes=tuple(
                [
                    SchedulerNode(name=n, activity=NodeActivity.BUSY, cpus=2, cpus_allocated=2)
                    for n in busy
                ]
                + [SchedulerNode(name=n, activity=NodeActivity.IDLE, cpus=2) for n in idle]
            ),
        )
        await self.publish(QueueDepthChanged(occurred_at=self.clock.now(), snapshot=snapshot))

    async def rows(self) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(select(nodes).order_by(nodes.c.node_id)))

    def alive(self) -> list[Instance]:
        return [i for i in self.cloud.instances() if i.state in ALIVE]

    async def warm(self, image_id: str) -> bool:
        """`size` provisioned stopped nodes on `image_id`, and no other instance alive."""
        spec = await self.spec()
        rows = await self.rows()
        alive = self.alive()
        return (
            len(rows) == spec.size
            and all(
                r.provisioned
                and r.state == NodeState.STOPPED.value
                and r.image_id == image_id
                and r.retiring is None
                for r in rows
            )
            and len(alive) == spec.size
            and all(i.state is InstanceState.STOPPED and i.image_id == image_id for i in alive)
            and {i.instance_id for i in alive} == {r.instance_id for r in rows}
        )

    async def spec(self, name: str = "hpc") -> PoolSpec:
        async with self.api() as client:
            response = await client.get(f"/pool/pools/{name}")
        assert response.status_code == 200, response.text
        return PoolSpec.model_validate(response.json()["spec"])

    def launches(self) -> list[dict[str, Any]]:
        return [args for op, args in self.cloud.calls if op == "run_instances"]

    def instance_ids_called(self, operation: str, since: int = 0) -> list[str]:
        """Instance ids passed to `operation`, in calls from the `since`-th on."""
        calls = self.cloud.calls[since:]
        return [i for op, args in calls if op == operation for i in args["ids"]]

    def heard_of(self, kind: type[Message]) -> list[Any]:
        return [m for m in self.heard if isinstance(m, kind)]

    def restart(self, cloud: Cloud | None = None) -> Pool:
        """A new pool service on the same store, bus and EC2: a worker started again."""
        self.pool = assemble(self.runtime, self.settings, cloud or self.cloud)
        return self.pool

    @asynccontextmanager
    async def api(self) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(title="pool", routers=[self.pool.service.router])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pool") as client:
            yield client


async def drain(bus: MemoryBus) -> None:
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
    *,
    settings: PoolSettings | None = None,
    cloud: FakeCloud | None = None,
    spec: PoolSpec | None = None,
    clock: ManualClock | None = None,
    acting_cloud: Cloud | None = None,
) -> AsyncIterator[Harness]:
    """pool on SQLite and a started in-memory bus, its handlers subscribed and its loop not
    running (tests drive it with `tick`), with a recorder of every event it announces. EC2
    transitions take 20 s and a boot 40 s of the manual clock; a tick is 30 s."""
    clock = clock or ManualClock(START)
    cloud = cloud or Placements(clock=clock, transition_seconds=20, boot_seconds=40)
    settings = settings or fast_settings()
    engine = await pool_engine(tmp_path / "pool.db")
    bus = MemoryBus()
    runtime = Runtime(settings=Settings(aws_region=REGION), engine=engine, bus=bus, clock=clock)
    pool = assemble(runtime, settings, acting_cloud or cloud)
    h = Harness(runtime, bus, clock, cloud, settings, pool)
    await bus.start()

    async def hear(message: Message) -> None:
        h.heard.append(message)

    await bus.subscribe("pool", _handlers(h))
    await bus.subscribe("listener", {kind.name(): hear for kind in ANNOUNCED})
    try:
        if spec is not None:
            response = await h.put(spec)
            assert response.status_code == 200, response.text
        yield h
    finally:
        await bus.stop()
        await h.pool.service.stop()
        await engine.dispose()


def _handlers(h: Harness) -> dict[str, Any]:
    """The pool's handlers, looked up at each delivery so that a restart takes over the queue."""

    def forward(name: str) -> Any:
        async def handle(message: Message) -> None:
            await h.pool.service.handlers[name](message)

        return handle

    return {name: forward(name) for name in h.pool.service.handlers}


def pool_instances(cloud: FakeCloud, pool: str = "hpc") -> list[Instance]:
    return [i for i in cloud.instances() if i.tags.get(POOL_TAG) == pool and i.state in ALIVE]
