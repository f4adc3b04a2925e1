"""Exactly-once effects over an at-least-once bus: the inbox, the outbox and the relay.

A handler's state change, the messages it emits (outbox rows) and the record that the incoming
message was handled (an inbox row keyed by consumer and message id) commit in one transaction.
The relay publishes outbox rows in id order with publisher confirms and marks them published; it
locks the rows it takes with `FOR UPDATE SKIP LOCKED`, so two relays never publish the same batch
at once. A crash between publish and commit re-publishes the batch: consumers' inboxes absorb it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    delete,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.bus import Bus, Envelope
from shared.clock import Clock
from shared.events import Message
from shared.store import UtcDateTime, metadata


@dataclass(frozen=True)
class MailboxTables:
    """A service's own inbox and outbox tables."""

    service: str
    inbox: Table
    outbox: Table


def mailbox_tables(service: str) -> MailboxTables:
    outbox = Table(
        f"{service}_outbox",
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("message_id", String(36), nullable=False, unique=True),
        Column("name", String(100), nullable=False),
        Column("correlation_id", String(36), nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        Column("published_at", UtcDateTime, nullable=True),
    )
    Index(
        f"ix_{service}_outbox_unpublished",
        outbox.c.id,
        postgresql_where=outbox.c.published_at.is_(None),
        sqlite_where=outbox.c.published_at.is_(None),
    )
    inbox = Table(
        f"{service}_inbox",
        metadata,
        Column("consumer", String(100), primary_key=True),
        Column("message_id", String(36), primary_key=True),
        Column("name", String(100), nullable=False),
        Column("handled_at", UtcDateTime, nullable=False),
    )
    return MailboxTables(service, inbox, outbox)


@dataclass
class Transaction:
    """One database transaction of a service: its connection, the time, and messages to emit."""

    conn: AsyncConnection
    now: datetime
    emitted: list[Message] = field(default_factory=list)

    def emit(self, message: Message) -> None:
        """Publish `message` if and only if this transaction commits."""
        self.emitted.append(message)


class Mailbox:
    """Opens a service's transactions and records what they handled and emitted."""

    def __init__(self, tables: MailboxTables, engine: AsyncEngine, clock: Clock) -> None:
        self.tables = tables
        self.engine = engine
        self.clock = clock
        self.on_emit: Callable[[], None] = lambda: None  # the relay's kick
        insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
        # built once: this runs for every message a service handles
        self._inbox_insert = insert(tables.inbox).on_conflict_do_nothing()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.engine.begin() as conn:
            tx = Transaction(conn, self.clock.now())
            yield tx
            await self._write_outbox(tx)
        if tx.emitted:
            self.on_emit()

    @asynccontextmanager
    async def handle_once(
        self, consumer: str, message: Message
    ) -> AsyncIterator[Transaction | None]:
        """A transaction for handling `message`, or None if `consumer` already handled it."""
        async with self.transaction() as tx:
            first = await self._record_in_inbox(tx, consumer, message)
            yield tx if first else None

    async def _record_in_inbox(self, tx: Transaction, consumer: str, message: Message) -> bool:
        row = {
            "consumer": consumer,
            "message_id": str(message.message_id),
            "name": message.name(),
            "handled_at": tx.now,
        }
        result = await tx.conn.execute(self._inbox_insert, row)
        return bool(result.rowcount)

    async def _write_outbox(self, tx: Transaction) -> None:
        if not tx.emitted:
            return
        rows: list[dict[str, Any]] = []
        for message in tx.emitted:
            envelope = Envelope.of(message)
            rows.append(
                {
                    "message_id": envelope.message_id,
                    "name": envelope.name,
                    "correlation_id": envelope.correlation_id,
                    "body": envelope.body,
                    "created_at": tx.now,
                }
            )
        await tx.conn.execute(self.tables.outbox.insert(), rows)


class OutboxRelay:
    """Publishes a service's outbox, oldest first, with confirms; safe in several processes."""

    def __init__(
        self,
        tables: MailboxTables,
        engine: AsyncEngine,
        bus: Bus,
        clock: Clock,
        *,
        batch: int = 200,
        keep_published: timedelta = timedelta(days=1),
    ) -> None:
        self.tables = tables
        self.engine = engine
        self.bus = bus
        self.clock = clock
        self.batch = batch
        self.keep_published = keep_published
        self.published = 0

    async def relay(self) -> int:
        """Publish until the outbox is empty (or another relay holds the rest); return the count."""
        total = 0
        while True:
            count = await self._relay_batch()
            total += count
            if count < self.batch:
                return total

    async def _relay_batch(self) -> int:
        outbox = self.tables.outbox
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    select(outbox.c.id, outbox.c.name, outbox.c.body, outbox.c.message_id)
                    .add_columns(outbox.c.correlation_id)
                    .where(outbox.c.published_at.is_(None))
                    .order_by(outbox.c.id)
                    .limit(self.batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            await asyncio.gather(
                *(
                    self.bus.publish(
                        Envelope(row.name, row.body, row.message_id, row.correlation_id)
                    )
                    for row in rows
                )
            )
            await conn.execute(
                update(outbox)
                .where(outbox.c.id.in_([row.id for row in rows]))
                .values(published_at=self.clock.now())
            )
        self.published += len(rows)
        return len(rows)

    async def prune(self) -> int:
        """Delete rows published longer ago than `keep_published`."""
        outbox = self.tables.outbox
        cutoff = self.clock.now() - self.keep_published
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(outbox).where(
                    outbox.c.published_at.is_not(None), outbox.c.published_at < cutoff
                )
            )
        return int(result.rowcount or 0)
