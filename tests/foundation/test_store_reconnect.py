"""The PostgreSQL engine survives connections the server closes, without pinging every checkout
(see `shared.store`): a closed connection is never handed out, a long-idle one is pinged first,
and after a restart of the server the next transaction runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import store
from shared.store import create_engine
from shared.testing.instances import OwnPostgres

pytestmark = pytest.mark.postgres


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")))


async def terminate(engine: AsyncEngine, pid: int) -> None:
    async with engine.connect() as conn:
        assert await conn.scalar(text(f"SELECT pg_terminate_backend({pid})"))


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url, pool_size=1)
    yield engine
    await engine.dispose()


async def test_a_pooled_connection_the_server_closed_is_replaced_at_checkout(
    db: AsyncEngine, postgres_url: str
) -> None:
    pid = await backend_pid(db)
    other = create_engine(postgres_url)
    try:
        await terminate(other, pid)
    finally:
        await other.dispose()
    await asyncio.sleep(0.2)  # the event loop reads the server's close
    assert await backend_pid(db) != pid  # the first use after the close works


async def test_checking_out_a_live_connection_sends_nothing(db: AsyncEngine) -> None:
    pid = await backend_pid(db)
    async with db.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        await conn.rollback()
    sent: list[str] = []

    def logger(record: asyncpg.connection.LoggedQuery) -> None:
        sent.append(record.query)

    driver.add_query_logger(logger)
    try:
        async with db.connect() as conn:
            assert await conn.scalar(text("SELECT pg_backend_pid()")) == pid
    finally:
        driver.remove_query_logger(logger)
    # The statement's own transaction (its query goes as a prepared statement, not logged); a
    # pre-ping would have sent BEGIN, a query and ROLLBACK before it.
    assert sent == ["BEGIN;", "ROLLBACK;"]


async def test_a_long_idle_connection_is_pinged_and_replaced_if_dead(
    db: AsyncEngine, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = await backend_pid(db)
    # A link that died without a word: the client has not seen it close.
    monkeypatch.setattr(asyncpg.Connection, "is_closed", lambda _self: False)
    other = create_engine(postgres_url)
    try:
        await terminate(other, pid)
    finally:
        await other.dispose()
    monkeypatch.setattr(store, "IDLE_PING_AFTER", 0.0)
    assert await backend_pid(db) != pid


@pytest.mark.slow
async def test_the_engine_carries_on_after_a_postgresql_restart() -> None:
    server = OwnPostgres()
    try:
        await asyncio.to_thread(server.start)
        engine = create_engine(server.url, pool_size=2)
        try:
            before = await backend_pid(engine)
            await asyncio.to_thread(server.restart)
            await asyncio.sleep(0.2)
            async with engine.begin() as conn:  # first try, no error
                assert await conn.scalar(text("SELECT pg_backend_pid()")) != before
        finally:
            await engine.dispose()
    finally:
        await asyncio.to_thread(server.close)


async def test_asyncpg_reports_a_connection_the_server_closed(postgres_url: str) -> None:
    """What the checkout relies on: asyncpg notices the close without a query."""
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    killer = await asyncpg.connect(dsn)
    try:
        await killer.execute(f"SELECT pg_terminate_backend({conn.get_server_pid()})")
        for _ in range(50):
            if conn.is_closed():
                break
            await asyncio.sleep(0.02)
        assert conn.is_closed()
    finally:
        await killer.close()
        await conn.close()
