"""pool's tables on both stores, and two pool workers on one PostgreSQL database: only one acts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pool_service_kit import REGION, START, fast_settings, pg_database, pool_engine, pool_spec
from sqlalchemy import Connection, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.pool.locks import PoolBusy
from services.pool.service import Pool, assemble
from services.pool.tables import nodes, pools
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.cloud import Instance, InstanceState
from shared.cloud.fake import FakeCloud
from shared.events import PowerOn
from shared.service import Runtime
from shared.settings import Settings
from shared.store import create_engine, metadata


def _pool_differences(connection: Connection) -> list[Any]:
    def pool_only(obj: Any, name: str | None, kind: str, _reflected: bool, _other: Any) -> bool:
        table = name if kind == "table" else getattr(getattr(obj, "table", None), "name", "")
        return str(table).startswith("pool_")

    context = MigrationContext.configure(
        connection, opts={"include_object": pool_only, "compare_type": True}
    )
    return list(compare_metadata(context, metadata))


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with pg_database() as url:
        yield url


async def test_the_migration_makes_exactly_pools_tables(tmp_path: Path, pg_url: str) -> None:
    for engine in (await pool_engine(tmp_path / "pool.db"), create_engine(pg_url)):
        try:
            async with engine.connect() as conn:
                assert await conn.run_sync(_pool_differences) == []
        finally:
            await engine.dispose()


class SlowCloud(FakeCloud):
    """Describing the pool takes a moment of real time, so two passes surely overlap."""

    async def describe_instances(self, *args: Any, **kwargs: Any) -> list[Instance]:
        await asyncio.sleep(0.2)
        return await super().describe_instances(*args, **kwargs)


async def _worker(url: str, cloud: FakeCloud, clock: ManualClock) -> tuple[Pool, AsyncEngine]:
    engine = create_engine(url)
    runtime = Runtime(Settings(aws_region=REGION), engine, MemoryBus(), clock)
    return assemble(runtime, fast_settings(lock_wait_seconds=0.3), cloud), engine


async def test_two_workers_at_once_only_one_acts(pg_url: str) -> None:
    clock = ManualClock(START)
    cloud = SlowCloud(clock=clock, transition_seconds=20, boot_seconds=40)
    (a, engine_a), (b, engine_b) = [await _worker(pg_url, cloud, clock) for _ in range(2)]
    try:
        async with engine_a.begin() as conn:
            spec = pool_spec(size=4, image_id="ami-1")
            await conn.execute(
                insert(pools).values(
                    name="hpc",
                    spec=spec.model_dump(mode="json"),
                    created_at=START,
                    updated_at=START,
                )
            )
        await asyncio.gather(a.reconciler.reconcile(), b.reconciler.reconcile())
        launched = [args for op, args in cloud.calls if op == "run_instances"]
        assert len(launched) == 4  # one worker launched the pool, the other stood aside

        for _ in range(10):  # both keep working, in turn and at once
            clock.advance(30)
            await asyncio.gather(a.reconciler.reconcile(), b.reconciler.reconcile())
        alive = [i for i in cloud.instances() if i.state is not InstanceState.TERMINATED]
        assert len(alive) == 4 and all(i.state is InstanceState.STOPPED for i in alive)
        assert len({i.client_token for i in cloud.instances()}) == len(cloud.instances()) == 4

        # a power command waits for the pool's lock, held here by the other worker
        async with engine_a.connect() as conn:
            node_id = await conn.scalar(select(nodes.c.node_id).limit(1))
        command = PowerOn(
            occurred_at=clock.now(), node_ids=(node_id,), reason="t", decision_id=uuid.uuid4()
        )
        async with a.reconciler.locks.hold("hpc"):
            with pytest.raises(PoolBusy):
                await b.desk.handle(command)
        await b.desk.handle(command)
        await b.desk.handle(command)
        assert [op for op, _ in cloud.calls].count("start_instances") == 1
    finally:
        for pool, engine in ((a, engine_a), (b, engine_b)):
            await pool.service.stop()
            await engine.dispose()
