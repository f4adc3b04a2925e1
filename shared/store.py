"""The state store: one async SQLAlchemy engine a process, on PostgreSQL or SQLite.

Tables are SQLAlchemy Core tables on the one `metadata` below, each named with its owning service's
prefix (`pool_nodes`, `bakery_builds`, ...): no service reads another's tables. The schema is made
by alembic migrations (`deploy/migrations`), never by `create_all` outside tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Dialect, MetaData, Table, TypeDecorator, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on both backends (SQLite would hand back naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine tuned for its backend: a connection pool for PostgreSQL, WAL for SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    """For code that prefers ORM sessions; most of hpcfleet uses Core on connections."""
    return async_sessionmaker(engine, expire_on_commit=False)


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


async def ping(engine: AsyncEngine) -> None:
    """Raise if the database cannot answer (for readiness checks)."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def upsert(
    conn: AsyncConnection,
    table: Table,
    values: dict[str, Any],
    keys: Sequence[str],
    *,
    update: bool = True,
) -> None:
    """Insert a row, or update the existing one with the same `keys` (PostgreSQL and SQLite);
    with `update=False` an existing row is left as it is (safe against a concurrent insert)."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = insert(table).values(**values)
    changes = {name: statement.excluded[name] for name in values if name not in keys and update}
    if changes:
        await conn.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=changes))
    else:
        await conn.execute(statement.on_conflict_do_nothing(index_elements=list(keys)))
