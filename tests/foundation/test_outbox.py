"""Exactly-once effects: inbox, outbox and relay, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.bakery.tables import MAILBOX as BAKERY
from services.pool.tables import MAILBOX as POOL
from shared.bus import Envelope
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.events import BuildImage, Message
from shared.outbox import Mailbox, OutboxRelay

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
effects_metadata = MetaData()
effects = Table(
    "test_effects",
    effects_metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(36), nullable=False),
)


class RecordingBus(MemoryBus):
    """A memory bus that remembers every publish and can fail after a number of them."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.published: list[Envelope] = []
        self.fail_after = fail_after

    async def publish(self, envelope: Envelope) -> None:
        await asyncio.sleep(0)  # let concurrent relays interleave
        if self.fail_after is not None and len(self.published) >= self.fail_after:
            raise ConnectionError("broker went away")
        self.published.append(envelope)
        await super().publish(envelope)


def command(n: int) -> BuildImage:
    return BuildImage(recipe=f"recipe-{n}", reason="test", occurred_at=NOW)


async def emit(mailbox: Mailbox, messages: list[BuildImage]) -> None:
    async with mailbox.transaction() as tx:
        for message in messages:
            tx.emit(message)


async def count_effects(engine: AsyncEngine) -> Counter[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(effects.c.message_id))
        return Counter(row.message_id for row in rows)


@pytest.fixture
async def effects_table(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as conn:
        await conn.run_sync(effects_metadata.drop_all)
        await conn.run_sync(effects_metadata.create_all)
    return engine


async def handle_with_effect(mailbox: Mailbox, message: Message) -> bool:
    async with mailbox.handle_once("test-consumer", message) as tx:
        if tx is None:
            return False
        await tx.conn.execute(effects.insert().values(message_id=str(message.message_id)))
        return True


async def test_messages_are_emitted_only_when_the_transaction_commits(engine: AsyncEngine) -> None:
    mailbox = Mailbox(BAKERY, engine, ManualClock(NOW))
    with pytest.raises(RuntimeError):
        async with mailbox.transaction() as tx:
            tx.emit(command(1))
            raise RuntimeError("handler failed")
    await emit(mailbox, [command(2)])
    bus = RecordingBus()
    await bus.start()
    relay = OutboxRelay(BAKERY, engine, bus, ManualClock(NOW))
    assert await relay.relay() == 1
    assert [e.name for e in bus.published] == ["BuildImage"]
    assert b"recipe-2" in bus.published[0].body


async def test_relay_publishes_in_order_and_only_once(engine: AsyncEngine) -> None:
    mailbox = Mailbox(BAKERY, engine, ManualClock(NOW))
    messages = [command(n) for n in range(25)]
    await emit(mailbox, messages[:10])
    await emit(mailbox, messages[10:])
    bus = RecordingBus()
    await bus.start()
    relay = OutboxRelay(BAKERY, engine, bus, ManualClock(NOW), batch=7)
    assert await relay.relay() == 25
    assert await relay.relay() == 0
    assert [e.message_id for e in bus.published] == [str(m.message_id) for m in messages]


async def test_a_redelivered_message_has_no_second_effect(effects_table: AsyncEngine) -> None:
    mailbox = Mailbox(POOL, effects_table, ManualClock(NOW))
    message = command(1)
    assert await handle_with_effect(mailbox, message) is True
    assert await handle_with_effect(mailbox, message) is False
    assert await count_effects(effects_table) == {str(message.message_id): 1}


async def test_a_failed_handler_leaves_no_inbox_row_so_the_retry_takes_effect(
    effects_table: AsyncEngine,
) -> None:
    mailbox = Mailbox(POOL, effects_table, ManualClock(NOW))
    message = command(1)
    with pytest.raises(RuntimeError):
        async with mailbox.handle_once("test-consumer", message) as tx:
            assert tx is not None
            await tx.conn.execute(effects.insert().values(message_id=str(message.message_id)))
            raise RuntimeError("crash mid-handler")
    assert await handle_with_effect(mailbox, message) is True
    assert await count_effects(effects_table) == {str(message.message_id): 1}


async def test_crash_between_publish_and_commit_republishes_and_effects_stay_once(
    effects_table: AsyncEngine,
) -> None:
    producer = Mailbox(BAKERY, effects_table, ManualClock(NOW))
    consumer = Mailbox(POOL, effects_table, ManualClock(NOW))
    messages = [command(n) for n in range(10)]
    await emit(producer, messages)

    crashing = RecordingBus(fail_after=6)
    await crashing.start()
    with pytest.raises(ConnectionError):
        await OutboxRelay(BAKERY, effects_table, crashing, ManualClock(NOW)).relay()
    assert len(crashing.published) == 6  # published, but the batch never committed

    healthy = RecordingBus()
    await healthy.start()
    assert await OutboxRelay(BAKERY, effects_table, healthy, ManualClock(NOW)).relay() == 10

    deliveries = [*crashing.published, *healthy.published]  # at least once: 16 deliveries
    from shared.events import decode

    for envelope in deliveries:
        await handle_with_effect(consumer, decode(envelope.name, envelope.body))
    assert await count_effects(effects_table) == {str(m.message_id): 1 for m in messages}


async def test_two_relays_at_once_publish_every_row_exactly_once(pg_engine: AsyncEngine) -> None:
    mailbox = Mailbox(BAKERY, pg_engine, ManualClock(NOW))
    messages = [command(n) for n in range(400)]
    for start in range(0, 400, 50):
        await emit(mailbox, messages[start : start + 50])
    bus = RecordingBus()
    await bus.start()
    relays = [OutboxRelay(BAKERY, pg_engine, bus, ManualClock(NOW), batch=20) for _ in range(2)]
    counts = await asyncio.gather(*(relay.relay() for relay in relays))
    assert sum(counts) == 400
    assert all(count > 0 for count in counts), f"one relay did all the work: {counts}"
    published = Counter(e.message_id for e in bus.published)
    assert len(published) == 400
    assert max(published.values()) == 1
    async with pg_engine.connect() as conn:
        unpublished = await conn.scalar(
            select(func.count()).where(BAKERY.outbox.c.published_at.is_(None))
        )
    assert unpublished == 0


async def test_prune_deletes_only_old_published_rows(engine: AsyncEngine) -> None:
    clock = ManualClock(NOW)
    mailbox = Mailbox(BAKERY, engine, clock)
    await emit(mailbox, [command(1)])
    bus = RecordingBus()
    await bus.start()
    relay = OutboxRelay(BAKERY, engine, bus, clock)
    await relay.relay()
    await emit(mailbox, [command(2)])  # not yet published
    assert await relay.prune() == 0
    clock.advance(2 * 86400)
    assert await relay.prune() == 1
    assert await relay.relay() == 1
