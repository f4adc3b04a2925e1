"""Migration 0002_audit makes exactly the audit_ tables that services/audit/tables.py declares."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import services.audit.tables  # noqa: F401  (audit's tables join the metadata)
from shared.store import metadata


def _audit_differences(connection: Connection) -> list[Any]:
    def audit_only(obj: Any, name: str | None, kind: str, _reflected: bool, _other: Any) -> bool:
        table = name if kind == "table" else getattr(getattr(obj, "table", None), "name", "")
        return str(table).startswith("audit_")

    context = MigrationContext.configure(
        connection, opts={"include_object": audit_only, "compare_type": True}
    )
    return list(compare_metadata(context, metadata))


async def test_the_migrated_schema_matches_the_tables(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await conn.run_sync(_audit_differences) == []
