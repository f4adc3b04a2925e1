"""Fixtures for the real components on this machine: PostgreSQL, RabbitMQ and SQLite.

Integration tests never skip silently: if a server is down they fail and say how to start it.
Each test session gets its own PostgreSQL database (created here, dropped at the end).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import services.registry  # noqa: F401  (every service's tables join the metadata)
from deploy.migrations import upgrade
from shared.store import create_engine, metadata

# In CI the property tests draw the same examples every run, so a red CI is reproducible and a
# green one is not luck; locally they explore new examples each run.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

PG_ADMIN_DSN = os.environ.get("HPCFLEET_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ_URL = os.environ.get("HPCFLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
HOW_TO_START = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "RabbitMQ": "rabbitmq-server -detached",
}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _require(name: str, host: str, port: int) -> None:
    if not _reachable(host, port):
        pytest.fail(f"{name} is not reachable on {host}:{port}; start it: {HOW_TO_START[name]}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated database for this test session; dropped at the end."""
    _require("PostgreSQL", "127.0.0.1", 5432)
    name = f"hpcfleet_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_DSN.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
    url = f"{url}/{name}"

    async def migrate() -> None:
        engine = create_engine(url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(migrate())
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _truncate(engine: AsyncEngine) -> None:
    names = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
        else:
            for table in metadata.sorted_tables:
                await conn.execute(table.delete())


@pytest.fixture
async def pg_engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """The session database, emptied for this test."""
    engine = create_engine(postgres_url)
    await _truncate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'hpcfleet.db'}")
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(params=["sqlite", "pg"])
def engine(request: pytest.FixtureRequest) -> AsyncEngine:
    """Both stores, for tests that must hold on each."""
    engine: AsyncEngine = request.getfixturevalue(f"{request.param}_engine")
    return engine


@pytest.fixture
def rabbitmq_url() -> str:
    _require("RabbitMQ", "127.0.0.1", 5672)
    return RABBITMQ_URL


@pytest.fixture
def exchange_name() -> str:
    """A throwaway exchange (and so queue namespace) per test on the shared broker."""
    return f"hpcfleet-test-{uuid.uuid4().hex[:8]}"
