"""The issue's "done when", over the real bus and store: the schedule fires under a manual clock,
each back-end builds against moto and validates, and the pool service receives `ImageReady` over
RabbitMQ into PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest
from bakery_kit import REGION, BakeryMoto, ClockDriver, write_recipe_tree
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from tests_support import delete_rabbit_namespace

from services.bakery.aws import BakeryAws
from services.bakery.recipes import load_recipes
from services.bakery.service import assemble
from services.bakery.settings import BakerySettings
from services.bakery.tables import builds
from services.pool.service import build as build_pool
from services.pool.tables import images as pool_images
from shared.bus import create_bus
from shared.clock import ManualClock
from shared.service import Runtime
from shared.settings import Settings

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]


async def test_scheduled_builds_with_each_backend_reach_pool_over_rabbitmq(
    pg_engine: AsyncEngine,
    rabbitmq_url: str,
    exchange_name: str,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    tmp_path: Path,
) -> None:
    path = write_recipe_tree(tmp_path / "r")
    document = json.loads(path.read_text())
    packer_recipe = {**document["recipes"]["linux"], "backend": "packer"}
    packer_recipe["validation"] = {**packer_recipe["validation"], "smoke_check": "echo-ok.sh"}
    (path.parent / "echo-ok.sh").write_text("#!/bin/bash\necho ok\n")
    document["recipes"]["linux-packer"] = packer_recipe
    path.write_text(json.dumps(document))
    runtime_settings = Settings(bus_url=rabbitmq_url, exchange=exchange_name)
    bus = create_bus(rabbitmq_url, exchange=exchange_name, prefetch=16, delivery_limit=3)
    runtime = Runtime(runtime_settings, pg_engine, bus, clock)
    bakery = assemble(runtime, settings, load_recipes(path), aws)
    pool = build_pool(runtime)
    await runtime.start()
    try:
        await pool.start_worker(bus)
        await bakery.service.start_worker(bus)
        await bakery.keeper.reconcile()  # anchors both recipes at 2026-02-01 12:00
        clock.set(datetime(2026, 2, 11, 4, 0, 30, tzinfo=UTC))

        async def pool_images_known() -> list[tuple[str, str]]:
            async with pg_engine.connect() as conn:
                rows = await conn.execute(select(pool_images.c.image_id, pool_images.c.recipe))
                return sorted((r.recipe, r.image_id) for r in rows)

        async with ClockDriver(clock):
            for _ in range(3000):
                if len(await pool_images_known()) == 2:
                    break
                await asyncio.sleep(0.01)
        async with pg_engine.connect() as conn:
            done = {r.recipe: r for r in (await conn.execute(select(builds))).all()}
        assert {name: row.status for name, row in done.items()} == {
            "linux": "succeeded",
            "linux-packer": "succeeded",
        }, {name: row.error for name, row in done.items()}
        assert await pool_images_known() == [
            ("linux", done["linux"].image_id),
            ("linux-packer", done["linux-packer"].image_id),
        ]
        assert {row.backend for row in done.values()} == {"ec2", "packer"}
        assert all(row.images == {REGION: row.image_id} for row in done.values())
    finally:
        await bus.stop()
        await bakery.service.stop()
        await pool.stop()
        await delete_rabbit_namespace(rabbitmq_url, exchange_name, ["pool", "bakery"])
        await delete_queues(rabbitmq_url, ["pool", "pool.dead", "bakery", "bakery.dead"])


async def delete_queues(url: str, names: list[str]) -> None:
    """The queues this test declared, whichever naming the bus uses (`<consumer>` today; the
    shared helper removes `<exchange>.<consumer>`)."""
    connection = await aio_pika.connect(url)
    try:
        for name in names:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
    finally:
        await connection.close()
