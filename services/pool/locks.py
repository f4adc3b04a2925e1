"""One actor per pool at a time: the reconcile pass and the power commands take the same lock.

Within a service an asyncio lock per pool; on PostgreSQL also a session advisory lock held on its
own connection for as long as the holder acts, so workers exclude each other (a killed worker's
lock goes with its connection). SQLite serves the single-process mode only: there the asyncio
locks are shared by every pool service on the same database file, and they are the whole story.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

_POLL_SECONDS = 0.05
_SQLITE: dict[str, dict[str, asyncio.Lock]] = {}  # by database URL, then pool


class PoolBusy(Exception):
    """Another worker holds the pool's lock (and kept it longer than we would wait)."""


def advisory_key(pool: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks."""
    digest = hashlib.sha256(f"hpcfleet.pool:{pool}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PoolLocks:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        url = engine.url.render_as_string(hide_password=True)
        self._locks: dict[str, asyncio.Lock] = {} if self._postgres else _SQLITE.setdefault(url, {})

    def _local(self, pool: str) -> asyncio.Lock:
        return self._locks.setdefault(pool, asyncio.Lock())

    @asynccontextmanager
    async def hold(self, pool: str, *, wait: float = 0.0) -> AsyncIterator[None]:
        """Hold `pool`'s lock, waiting at most `wait` seconds for it, else raise PoolBusy."""
        deadline = time.monotonic() + wait
        local = self._local(pool)
        if wait <= 0 and local.locked():
            raise PoolBusy(f"pool {pool} is busy in this process")
        try:
            await asyncio.wait_for(local.acquire(), timeout=wait if wait > 0 else None)
        except TimeoutError:
            raise PoolBusy(f"pool {pool} is busy in this process") from None
        try:
            if not self._postgres:
                yield
                return
            async with self.engine.connect() as conn:
                key = advisory_key(pool)
                while not await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}):
                    await conn.commit()
                    if time.monotonic() >= deadline:
                        raise PoolBusy(f"pool {pool} is held by another worker")
                    await asyncio.sleep(_POLL_SECONDS)
                await conn.commit()  # a session lock: no transaction stays open while we act
                try:
                    yield
                finally:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()
        finally:
            local.release()
