"""The watcher loop: read the scheduler, keep the latest snapshot, publish it when it changed.

The snapshot is stored (one row) for the API and the decision loop, which may run in another
process, and published as `QueueDepthChanged` only when something but its time changed: events
carry the whole state, so a consumer that missed one is fixed by the next. A failed read is stored
too, so that nothing is decided on a view that may be partial and the API can say why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.autogrow.tables import queue
from shared.events import QueueDepthChanged
from shared.outbox import Mailbox
from shared.scheduler import QueueSnapshot, Scheduler
from shared.store import upsert

log = logging.getLogger(__name__)

ROW = 1  # the one row of autogrow_queue


@dataclass(frozen=True)
class QueueState:
    """The stored queue row; `snapshot` stays raw JSON (and unread, if not asked for) until
    someone needs it parsed."""

    snapshot: dict[str, Any] | None
    taken_at: datetime | None
    changed_at: datetime | None
    read_at: datetime | None
    error: str | None
    error_at: datetime | None

    def unusable(self, now: datetime, stale_seconds: float) -> str | None:
        """Why no decision may be made on this view now, or None if it is sound."""
        if self.error is not None:
            return f"the last read of the scheduler failed: {self.error}"
        if self.taken_at is None or self.read_at is None:
            return "the scheduler has not been read yet"
        if (now - self.read_at).total_seconds() > stale_seconds:
            return (
                f"no good read of the scheduler for over {stale_seconds:.0f} s "
                f"(the last at {self.read_at:%Y-%m-%d %H:%M:%S} UTC)"
            )
        return None


def queue_problem(state: QueueState | None, now: datetime, stale_seconds: float) -> str | None:
    """Why no decision may be made on the stored queue now, or None if it is sound."""
    if state is None:
        return "the scheduler has not been read yet"
    return state.unusable(now, stale_seconds)


async def load_queue(conn: AsyncConnection, *, with_snapshot: bool = True) -> QueueState | None:
    columns = [c for c in queue.c if with_snapshot or c.name != "snapshot"]
    row = (await conn.execute(select(*columns).where(queue.c.id == ROW))).mappings().first()
    if row is None:
        return None
    return QueueState(
        snapshot=row.get("snapshot"),
        taken_at=row["taken_at"],
        changed_at=row["changed_at"],
        read_at=row["read_at"],
        error=row["error"],
        error_at=row["error_at"],
    )


async def store_snapshot(
    conn: AsyncConnection, snapshot: QueueSnapshot | None, now: datetime, *, read_at: datetime
) -> None:
    """Record a successful read; `snapshot` None means it did not change since the stored one."""
    values: dict[str, Any] = {"id": ROW, "read_at": read_at, "error": None, "error_at": None}
    if snapshot is not None:
        values |= {
            "snapshot": snapshot.model_dump(mode="json"),
            "taken_at": snapshot.taken_at,
            "changed_at": now,
        }
    await upsert(conn, queue, values, keys=["id"])


def same_queue(a: QueueSnapshot, b: QueueSnapshot) -> bool:
    """Equal but for the time they were taken."""
    return a.model_copy(update={"taken_at": b.taken_at}) == b


class QueueWatcher:
    """One read of the scheduler per `poll`; polls never overlap, so the newest is stored last."""

    def __init__(
        self, scheduler: Scheduler, mailbox: Mailbox, *, on_change: Callable[[], None]
    ) -> None:
        self.scheduler = scheduler
        self.mailbox = mailbox
        self.on_change = on_change
        self._last: QueueSnapshot | None = None
        self._lock = asyncio.Lock()

    async def poll(self) -> QueueSnapshot:
        async with self._lock:
            try:
                snapshot = await self.scheduler.snapshot()
            except Exception as exc:
                await self._record_failure(f"{type(exc).__name__}: {exc}")
                raise
            changed = self._last is None or not same_queue(snapshot, self._last)
            async with self.mailbox.transaction() as tx:
                await store_snapshot(
                    tx.conn, snapshot if changed else None, tx.now, read_at=snapshot.taken_at
                )
                if changed:
                    tx.emit(QueueDepthChanged(occurred_at=tx.now, snapshot=snapshot))
            self._last = snapshot
        if changed:
            self.on_change()
        return snapshot

    async def _record_failure(self, error: str) -> None:
        async with self.mailbox.transaction() as tx:
            await upsert(tx.conn, queue, {"id": ROW, "error": error, "error_at": tx.now}, ["id"])
