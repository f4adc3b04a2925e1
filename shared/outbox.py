"""Exactly-once effects over an at-least-once bus: the inbox, the outbox and the relay.

A handler's state change, the messages it emits (outbox rows) and the record that the incoming
message was handled (an inbox row keyed by consumer and message id) commit in one transaction.
The relay publishes outbox rows in id order with publisher confirms and marks them published; it
locks the rows it takes with `FOR UPDATE SKIP LOCKED`, so two relays never publish the same batch
at once. A crash between publish and commit re-publishes the batch: consumers' inboxes absorb it.

On PostgreSQL, `handle_once` commits in groups: a commit (and its WAL flush), a pooled connection
checkout and its ping cost more than a small handler's own statements, and they were what capped a
consumer at about 500 messages/s. Handlers that reach `handle_once` while another one's
transaction is running queue up and take the same connection in turn, each inside a savepoint of
its own, and the group commits once nobody is queued. A handler that raises rolls back to its
savepoint, so only its own effects and inbox row go; `handle_once` returns only after the group
has committed, so a handler acknowledges (and kicks its loops) after its effects are durable, as
before; if the commit fails, every member raises and its message is delivered again. Members run
one at a time, in the order they arrived, and see the effects of earlier members of their group.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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

log = logging.getLogger(__name__)


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


class GroupCommitFailed(Exception):
    """The commit of a group of handlers' transactions failed: none of them took effect."""


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Group:
    """Handlers' transactions that commit as one (see the module docstring)."""

    members: int = 0  # members that ran
    conn: AsyncConnection | None = None
    driver: Any = None  # the asyncpg connection under `conn`
    started: bool = False  # a transaction is open on `conn`
    savepoint: str | None = None  # the latest member's; the next member releases it
    closed: bool = False  # takes no more members: committing
    committed: asyncio.Future[None] = field(default_factory=_new_future)


@dataclass
class _Member:
    """One handler's part of a group."""

    savepoint: str | None  # None: it opens the group's transaction
    begun: bool = False  # its savepoint (or the transaction) was asked of the database


# The mailboxes whose group the current task is a member of: a handle_once nested in another
# of the same mailbox runs on its own (the outer one holds the turn).
_member_of: ContextVar[frozenset[int]] = ContextVar("hpcfleet_group_member", default=frozenset())


def _literal(value: str) -> str:
    """A SQL string literal for the inbox row of a grouped member, which is sent as a simple query
    (several statements, one round trip). Backslashes and NULs are refused so that the quoting
    does not depend on `standard_conforming_strings`; inbox values are ids and names."""
    if "\\" in value or "\x00" in value:
        raise ValueError(f"unexpected character in inbox value {value!r}")
    return "'" + value.replace("'", "''") + "'"


class Mailbox:
    """Opens a service's transactions and records what they handled and emitted.

    `group_commit` (default: on for PostgreSQL) groups `handle_once` transactions, at most
    `max_group` to a commit (see the module docstring); SQLite keeps one transaction a message.
    """

    def __init__(
        self,
        tables: MailboxTables,
        engine: AsyncEngine,
        clock: Clock,
        *,
        group_commit: bool | None = None,
        max_group: int = 128,
    ) -> None:
        self.tables = tables
        self.engine = engine
        self.clock = clock
        self.on_emit: Callable[[], None] = lambda: None  # the relay's kick
        postgres = engine.dialect.name == "postgresql"
        insert = pg_insert if postgres else sqlite_insert
        # built once: this runs for every message a service handles
        self._inbox_insert = insert(tables.inbox).on_conflict_do_nothing()
        self.group_commit = postgres if group_commit is None else group_commit
        if self.group_commit and not postgres:
            raise ValueError("group commit needs PostgreSQL")
        self.max_group = max_group
        self._group: _Group | None = None  # the open group, if any
        self._turn: asyncio.Lock | None = None  # members take turns on the group's connection
        self._turn_loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0  # members queued for their turn
        self._committing: set[asyncio.Task[None]] = set()
        self._savepoints = itertools.count(1)
        inbox = engine.dialect.identifier_preparer.format_table(tables.inbox)
        self._grouped_inbox_insert = (
            f"INSERT INTO {inbox} (consumer, message_id, name, handled_at)"
            " VALUES ({}, {}, {}, {}) ON CONFLICT DO NOTHING"
        )
        self.groups = 0  # commits of groups, and the members they held (for benchmarks)
        self.grouped = 0

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
        """A transaction for handling `message`, or None if `consumer` already handled it.

        Use only `tx.conn` inside: with group commit, another connection that writes what an
        earlier member of the group wrote would wait for a commit that waits for it."""
        if not self.group_commit or id(self) in _member_of.get():
            async with self.transaction() as tx:
                first = await self._record_in_inbox(tx, consumer, message)
                yield tx if first else None
            return
        turn = self._take_turn()
        self._waiting += 1
        try:
            await turn.acquire()
        except BaseException:
            self._waiting -= 1
            if self._waiting == 0 and not turn.locked() and self._group is not None:
                self._close(self._group)  # the member before us left it to us to close
            raise
        self._waiting -= 1
        group = self._group
        if group is None:
            group = self._group = _Group()
        member = _Member(None if not group.started else f"hpcfleet_{next(self._savepoints)}")
        nested = _member_of.set(_member_of.get() | {id(self)})
        try:
            try:
                tx, first = await self._enter(group, member, consumer, message)
                yield tx if first else None
                await self._write_outbox(tx)
            except BaseException:
                await self._undo(group, member)
                raise
            finally:
                group.members += 1
                if self._waiting == 0 or group.members >= self.max_group:
                    self._close(group)
                turn.release()
        finally:
            _member_of.reset(nested)
        try:
            await asyncio.shield(group.committed)
        except Exception as exc:
            raise GroupCommitFailed(
                f"the commit of {group.members} handlers' transactions failed: {exc!r}"
            ) from exc
        if tx.emitted:
            self.on_emit()

    def _take_turn(self) -> asyncio.Lock:
        """The members' queue (FIFO, so they run in the order they arrived), for this loop."""
        loop = asyncio.get_running_loop()
        if self._turn is None or self._turn_loop is not loop:
            self._turn, self._turn_loop, self._group, self._waiting = asyncio.Lock(), loop, None, 0
        return self._turn

    async def _enter(
        self, group: _Group, member: _Member, consumer: str, message: Message
    ) -> tuple[Transaction, bool]:
        """Open the member's savepoint and record its inbox row: is it the first delivery?"""
        if group.conn is None:
            group.conn = await self.engine.connect()
            group.driver = (await group.conn.get_raw_connection()).driver_connection
        tx = Transaction(group.conn, self.clock.now())
        if member.savepoint is None:
            # The member that opens the transaction needs no savepoint (on failure the whole
            # transaction is rolled back), and its insert through SQLAlchemy sends the BEGIN.
            group.started = member.begun = True
            return tx, await self._record_in_inbox(tx, consumer, message)
        release = f"RELEASE SAVEPOINT {group.savepoint}; " if group.savepoint else ""
        insert = self._grouped_inbox_insert.format(
            _literal(consumer),
            _literal(str(message.message_id)),
            _literal(message.name()),
            _literal(tx.now.astimezone(UTC).isoformat()),
        )
        group.savepoint, member.begun = member.savepoint, True
        status = await group.driver.execute(f"{release}SAVEPOINT {member.savepoint}; {insert}")
        return tx, status == "INSERT 0 1"

    async def _undo(self, group: _Group, member: _Member) -> None:
        """Roll back the failed member's work: to its savepoint, or the whole transaction if it
        opened it; if that fails too, the group can take no more and its commit fails."""
        if not member.begun:
            return  # it failed before asking the database for anything
        try:
            if member.savepoint is None:
                group.started = False
                assert group.conn is not None  # begun: it was connected
                await group.conn.rollback()
            else:
                await group.driver.execute(f"ROLLBACK TO SAVEPOINT {member.savepoint}")
        except Exception as exc:
            log.warning("could not roll back a failed handler's work (%r); the group fails", exc)
            group.started = True  # so that the commit is tried, and fails
            self._close(group)

    def _close(self, group: _Group) -> None:
        """Take no more members and commit (by a task of its own: the members only wait)."""
        if group.closed:
            return
        group.closed = True
        if self._group is group:
            self._group = None
        task = asyncio.create_task(self._commit(group), name=f"{self.tables.service}:commit")
        self._committing.add(task)
        task.add_done_callback(self._committing.discard)

    async def _commit(self, group: _Group) -> None:
        try:
            if group.conn is not None and group.started:
                # COMMIT of a transaction that an error aborted answers ROLLBACK without an
                # error (asyncpg does not look), and the members would be acknowledged with no
                # effect: a statement first raises if a handler swallowed a database error.
                await group.driver.execute("SELECT 1")
                await group.conn.commit()
            self.groups += 1
            self.grouped += group.members
            group.committed.set_result(None)
        except BaseException as exc:
            group.committed.set_exception(exc)
            group.committed.exception()  # retrieved: members that failed themselves never look
            if not isinstance(exc, Exception):
                raise
        finally:
            if group.conn is not None:
                try:
                    await group.conn.close()
                except Exception:
                    log.exception("could not return a group's connection to the pool")

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
            await self.bus.publish_many(
                [Envelope(row.name, row.body, row.message_id, row.correlation_id) for row in rows]
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
