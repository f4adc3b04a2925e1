"""The migrations create exactly the tables the code declares, on both stores."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.migrations import upgrade
from shared.store import metadata


async def test_migrations_match_the_models(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True}), metadata
            )
        )
    assert diff == [], f"models and migrations differ; add a migration: {diff}"


async def test_every_table_belongs_to_one_service(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    owners = {"auth", "bakery", "pool", "autogrow", "audit"}
    for table in tables:
        if table == "alembic_version":
            continue
        assert table.split("_", 1)[0] in owners, f"{table} has no owning service prefix"


async def test_upgrading_twice_is_harmless(engine: AsyncEngine) -> None:
    await upgrade(engine)
