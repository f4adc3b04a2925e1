"""The issue's "done when", for real: pool's worker (handlers, reconcile loop, outbox relay) over
RabbitMQ and PostgreSQL against a moto server. A pool comes up warm; ImageReady rolls every node
without stopping the one the scheduler reports busy; the worker is killed mid-roll and a new one
finishes the job with no duplicate and no orphan."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aioboto3
import httpx
import pytest
from pool_service_kit import (
    REGION,
    Crash,
    Crashing,
    fast_settings,
    pg_database,
    pool_spec,
)
from sqlalchemy import select
from tests_support import delete_rabbit_namespace, wait_until

from services.pool.service import Pool, assemble
from services.pool.spec import POOL_TAG, Subnet
from services.pool.tables import nodes
from shared.api import create_app
from shared.bus import Envelope
from shared.bus.rabbit import RabbitBus
from shared.clock import SystemClock
from shared.cloud import Cloud, InstanceState
from shared.cloud.aws import AwsCloud
from shared.cloud.moto_server import MotoServer
from shared.events import (
    ImageReady,
    Message,
    NodePowerChanged,
    NodeProvisioned,
    NodeRetired,
    NodeRetiring,
    PowerOff,
    PowerOn,
    PowerRefused,
    PowerState,
    QueueDepthChanged,
)
from shared.scheduler import NodeActivity, QueueSnapshot, SchedulerNode
from shared.service import Runtime
from shared.settings import Settings
from shared.store import create_engine

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]
SIZE = 16  # 64 takes 30 s here, mostly moto rendering instances; 64 warm: test_pool_moto
HEARD = (NodeProvisioned, NodeRetired, NodeRetiring, NodePowerChanged, PowerRefused)


@dataclass
class Deployment:
    """One pool worker at a time, on a shared exchange, database and moto server."""

    rabbitmq_url: str
    exchange: str
    database_url: str
    aws: AwsCloud
    subnets: tuple[Subnet, ...]
    listener: RabbitBus
    heard: list[Message] = field(default_factory=list)
    runtime: Runtime | None = None
    pool: Pool | None = None

    async def start_worker(self, cloud: Cloud) -> Pool:
        bus = RabbitBus(self.rabbitmq_url, exchange=self.exchange, prefetch=16, delivery_limit=5)
        settings = Settings(aws_region=REGION, relay_interval=0.05)
        self.runtime = Runtime(settings, create_engine(self.database_url), bus, SystemClock())
        await self.runtime.start()
        self.pool = assemble(self.runtime, fast_settings(reconcile_interval=0.2), cloud)
        await self.pool.service.start_worker(bus)
        return self.pool

    async def kill_worker(self) -> None:
        """Gone as a killed process is: no more deliveries, loops, relay or connections."""
        assert self.runtime is not None and self.pool is not None
        await self.runtime.bus.stop()
        with contextlib.suppress(Crash):
            await self.pool.loop.stop()
        await self.pool.service.relay_loop.stop()
        await self.runtime.engine.dispose()

    async def send(self, message: Message) -> None:
        await self.listener.publish(Envelope.of(message))

    async def rows(self) -> list[Any]:
        assert self.runtime is not None
        async with self.runtime.engine.connect() as conn:
            return list(await conn.execute(select(nodes).order_by(nodes.c.node_id)))

    async def powered(self, node_id: str) -> bool:
        return any(
            isinstance(m, NodePowerChanged)
            and m.node_id == node_id
            and m.state is PowerState.RUNNING
            for m in self.heard
        )

    async def warm(self, image_id: str, *, besides: str | None = None) -> bool:
        """`SIZE` nodes stopped, provisioned and on `image_id`, and nothing else alive but the
        node `besides` (whose replacement is among them, warm ahead)."""
        instances = await self.aws.describe_instances(tags={POOL_TAG: "hpc"})
        alive = [i for i in instances if i.state is not InstanceState.TERMINATED]
        rows = [r for r in await self.rows() if r.node_id != besides]
        return (
            len(rows) == SIZE
            and all(r.provisioned and r.state == "stopped" and r.image_id == image_id for r in rows)
            and len([i for i in alive if i.state is InstanceState.STOPPED]) == SIZE
            and len(alive) == SIZE + (besides is not None)
        )

    def image_ready(self, image_id: str) -> ImageReady:
        return ImageReady(
            occurred_at=SystemClock().now(),
            recipe="linux",
            images={REGION: image_id},
            version=image_id,
            base_image="ami-base",
            built_at=SystemClock().now(),
        )

    def queue(self, name: str, activity: NodeActivity) -> QueueDepthChanged:
        allocated = 2 if activity is NodeActivity.BUSY else 0
        node = SchedulerNode(name=name, activity=activity, cpus=2, cpus_allocated=allocated)
        snapshot = QueueSnapshot(taken_at=SystemClock().now(), nodes=(node,))
        return QueueDepthChanged(occurred_at=SystemClock().now(), snapshot=snapshot)


@pytest.fixture
async def deployment(rabbitmq_url: str, exchange_name: str) -> AsyncIterator[Deployment]:
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    with MotoServer() as moto:
        moto.reset()
        async with session.client("ec2", endpoint_url=moto.endpoint) as ec2:
            found = await ec2.describe_subnets(
                Filters=[{"Name": "default-for-az", "Values": ["true"]}]
            )
        subnets = tuple(
            Subnet(subnet_id=s["SubnetId"], zone=s["AvailabilityZone"])
            for s in sorted(found["Subnets"], key=lambda s: s["AvailabilityZone"])[:2]
        )
        async with (
            pg_database() as url,
            AwsCloud(REGION, endpoint_url=moto.endpoint, session=session, max_attempts=1) as aws,
        ):
            listener = RabbitBus(
                rabbitmq_url, exchange=exchange_name, prefetch=64, delivery_limit=5
            )
            await listener.start()
            d = Deployment(rabbitmq_url, exchange_name, url, aws, subnets, listener)

            async def hear(message: Message) -> None:
                d.heard.append(message)

            await listener.subscribe("listener", {kind.name(): hear for kind in HEARD})
            try:
                yield d
            finally:
                if d.runtime is not None:
                    await d.kill_worker()
                await listener.stop()
                await delete_rabbit_namespace(rabbitmq_url, exchange_name, ["pool", "listener"])


async def test_warm_pool_rolls_around_a_busy_node_and_survives_a_killed_worker(
    deployment: Deployment,
) -> None:
    d = deployment
    first = Crashing(d.aws, "terminate_instances", 1, after=True)  # dies at its first termination
    pool = await d.start_worker(first)
    spec = pool_spec(size=SIZE, subnets=d.subnets, max_surge_percent=25)
    app = create_app(title="pool", routers=[pool.service.router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pool") as client:
        response = await client.put("/pool/pools/hpc", json=spec.model_dump(mode="json"))
    assert response.status_code == 200, response.text
    await d.send(d.image_ready("ami-11111111"))
    await wait_until(lambda: d.warm("ami-11111111"), timeout=30, what="a warm pool")

    busy = (await d.rows())[0]
    await d.send(_command(PowerOn, busy.node_id))
    await wait_until(lambda: d.powered(busy.node_id), timeout=15, what="the busy node running")
    started = len(first.calls)
    await d.send(d.queue(busy.scheduler_node_name, NodeActivity.BUSY))
    await d.send(d.image_ready("ami-22222222"))

    async def killed() -> bool:
        return first.dead

    await wait_until(killed, timeout=30, what="the worker killed mid-roll")
    await d.kill_worker()
    second = Crashing(d.aws)  # the worker started again (recording its calls only)
    await d.start_worker(second)
    await wait_until(
        lambda: d.warm("ami-22222222", besides=busy.node_id),
        timeout=60,
        what="every node but the busy one rolled",
    )
    touched = [
        instance_id
        for op, args in first.calls[started:] + second.calls
        if op in ("stop_instances", "terminate_instances")
        for instance_id in args[0]
    ]
    assert busy.instance_id not in touched
    assert any(m.node_id == busy.node_id for m in d.heard if isinstance(m, NodeRetiring))

    await d.send(d.queue(busy.scheduler_node_name, NodeActivity.IDLE))
    await d.send(_command(PowerOff, busy.node_id))
    await wait_until(lambda: d.warm("ami-22222222"), timeout=30, what="the busy node replaced")

    instances = await d.aws.describe_instances(tags={POOL_TAG: "hpc"})
    assert len({i.client_token for i in instances}) == len(instances)  # no duplicate launch
    alive = {i.instance_id for i in instances if i.state is not InstanceState.TERMINATED}
    assert alive == {r.instance_id for r in await d.rows()}  # no orphan


def _command(kind: type[PowerOn | PowerOff], node_id: str) -> PowerOn | PowerOff:
    return kind(
        occurred_at=SystemClock().now(),
        node_ids=(node_id,),
        reason="test",
        decision_id=uuid.uuid4(),
    )
