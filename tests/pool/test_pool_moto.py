"""pool against a moto server over HTTP (AwsCloud, the AWS code path), with capacity errors and
throttling injected by the fault-injecting middleware, which also honours ClientToken."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aioboto3
import pytest
from pool_service_kit import REGION, Crash, Crashing, fast_settings, pool_engine, pool_spec
from sqlalchemy import select

from services.pool.service import Pool, assemble
from services.pool.spec import POOL_TAG, PoolSpec, Subnet
from services.pool.tables import backoffs, nodes, pools
from shared.bus.memory import MemoryBus
from shared.clock import SystemClock
from shared.cloud import Cloud, Instance, InstanceState
from shared.cloud.aws import AwsCloud
from shared.cloud.moto_server import MotoServer
from shared.service import Runtime
from shared.settings import Settings


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    moto_server.reset()
    return moto_server


@pytest.fixture(scope="module")
def session() -> aioboto3.Session:
    return aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )


@dataclass
class World:
    moto: MotoServer
    aws: AwsCloud
    runtime: Runtime
    pool: Pool
    subnets: tuple[Subnet, ...]

    def restart(self, cloud: Cloud | None = None) -> None:
        self.pool = assemble(self.runtime, fast_settings(), cloud or self.aws)

    async def instances(self) -> list[Instance]:
        return await self.aws.describe_instances(tags={POOL_TAG: "hpc"})

    async def warm(self, size: int, image_id: str) -> bool:
        alive = [i for i in await self.instances() if i.state is not InstanceState.TERMINATED]
        async with self.runtime.engine.connect() as conn:
            rows = (await conn.execute(select(nodes))).all()
        return (
            len(alive) == size == len(rows)
            and all(i.state is InstanceState.STOPPED and i.image_id == image_id for i in alive)
            and all(r.provisioned and r.state == "stopped" for r in rows)
        )

    async def converge(self, size: int, image_id: str, passes: int = 20) -> int:
        for n in range(passes):
            await self.pool.reconciler.reconcile()
            if await self.warm(size, image_id):
                return n + 1
        raise AssertionError(f"not warm after {passes} passes")

    async def create(self, spec: PoolSpec) -> None:
        async with self.runtime.engine.begin() as conn:
            now = self.runtime.clock.now()
            await conn.execute(
                pools.insert().values(
                    name=spec.name,
                    spec=spec.model_dump(mode="json"),
                    created_at=now,
                    updated_at=now,
                )
            )


@pytest.fixture
async def world(
    moto: MotoServer, session: aioboto3.Session, tmp_path: Path
) -> AsyncIterator[World]:
    async with session.client("ec2", endpoint_url=moto.endpoint) as ec2:
        found = await ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    subnets = tuple(
        Subnet(subnet_id=s["SubnetId"], zone=s["AvailabilityZone"])
        for s in sorted(found["Subnets"], key=lambda s: s["AvailabilityZone"])[:2]
    )
    engine = await pool_engine(tmp_path / "pool.db")
    runtime = Runtime(Settings(aws_region=REGION), engine, MemoryBus(), SystemClock())
    aws = AwsCloud(REGION, endpoint_url=moto.endpoint, session=session, max_attempts=1)
    await aws.start()  # the pool starts an AwsCloud itself, but not one wrapped by Crashing
    w = World(moto, aws, runtime, assemble(runtime, fast_settings(), aws), subnets)
    try:
        yield w
    finally:
        await w.pool.service.stop()
        await aws.close()
        await engine.dispose()


async def test_a_pool_of_64_comes_up_warm_through_capacity_errors_and_throttling(
    world: World,
) -> None:
    spec = pool_spec(size=64, subnets=world.subnets, image_id="ami-12345678")
    await world.create(spec)
    world.moto.inject_fault("RunInstances", "InsufficientInstanceCapacity", status=500, count=3)
    world.moto.inject_fault("DescribeInstances", "RequestLimitExceeded", status=503, count=2)

    started = time.perf_counter()
    passes = await world.converge(64, "ami-12345678")
    seconds = time.perf_counter() - started

    instances = await world.instances()
    assert len(instances) == 64  # nothing launched twice, nothing left over
    assert len({i.client_token for i in instances}) == 64
    async with world.runtime.engine.connect() as conn:
        held = (await conn.execute(select(backoffs))).all()
        names = sorted((await conn.execute(select(nodes.c.scheduler_node_name))).scalars())
    assert held, "the capacity errors backed their type and zone off"
    assert names == [f"node{n:03d}" for n in range(1, 65)]
    print(f"64 nodes warm on moto in {passes} passes, {seconds:.1f} s")


async def test_a_worker_killed_after_run_instances_converges_on_restart(world: World) -> None:
    await world.create(pool_spec(size=6, subnets=world.subnets, image_id="ami-12345678"))
    world.restart(Crashing(world.aws, "run_instances", 3, after=True))
    with pytest.raises(Crash):
        await world.pool.reconciler.reconcile()

    world.restart()
    await world.converge(6, "ami-12345678")
    instances = await world.instances()
    assert len(instances) == 6
    assert len({i.client_token for i in instances}) == 6


async def test_image_ready_rolls_the_pool_on_moto(world: World) -> None:
    await world.create(pool_spec(size=6, subnets=world.subnets, image_id="ami-11111111"))
    await world.converge(6, "ami-11111111")
    async with world.runtime.engine.begin() as conn:
        spec = pool_spec(size=6, subnets=world.subnets, image_id="ami-22222222")
        await conn.execute(pools.update().values(spec=spec.model_dump(mode="json")))

    await world.converge(6, "ami-22222222", passes=40)
    old = [i for i in await world.instances() if i.image_id == "ami-11111111"]
    assert {i.state for i in old} == {InstanceState.TERMINATED}
