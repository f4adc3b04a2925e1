"""The state store: one async SQLAlchemy engine a process, on PostgreSQL or SQLite.

Tables are SQLAlchemy Core tables on the one `metadata` below, each named with its owning service's
prefix (`pool_nodes`, `bakery_builds`, ...): no service reads another's tables. The schema is made
by alembic migrations (`deploy/migrations`), never by `create_all` outside tests.

A PostgreSQL restart closes every pooled connection. SQLAlchemy's `pool_pre_ping` would find that
out with three round trips (BEGIN, a query, ROLLBACK) at every checkout, more than a small
transaction's own work; instead a checkout asks asyncpg whether the server has closed the
connection (no round trip: the event loop has already read the close), and pings only a
connection that sat idle in the pool for longer than `IDLE_PING_AFTER` (a link that died without
a word, behind a firewall). A connection the server drops while it is in use fails that one
statement; SQLAlchemy then invalidates it and every other connection the pool held at the time,
so the caller's retry (a redelivery, the next pass of a loop) runs on a new one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Dialect, MetaData, Table, TypeDecorator, event, text
from sqlalchemy import exc as sa_exc
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
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
    _check_connections_at_checkout(engine)
    return engine


IDLE_PING_AFTER = 30.0  # seconds a pooled PostgreSQL connection may idle before a checkout pings it


def _check_connections_at_checkout(engine: AsyncEngine) -> None:
    """Hand out no connection the server has closed (see the module docstring)."""
    pool = engine.sync_engine.pool
    dialect = engine.dialect

    @event.listens_for(pool, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["hpcfleet_idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            # The pool discards it and tries a new connection.
            raise sa_exc.DisconnectionError("the server closed the connection")
        idle_since = record.info.pop("hpcfleet_idle_since", None)
        if idle_since is not None and time.monotonic() - idle_since > IDLE_PING_AFTER:
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise sa_exc.DisconnectionError(f"a ping failed: {exc!r}") from exc


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
