"""RabbitBus with grouped inbox transactions on PostgreSQL: what a batch of prefetched deliveries
does when one handler fails, when a message comes twice, and when the connection drops between
the group's commit and its acks."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from bus_kit import BusKit, eventually, node_retired, take_dead_letters
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine
from test_rabbit_faults import close_connections, connection_pids

from services.pool.tables import MAILBOX as POOL
from shared.bus import Envelope
from shared.bus.rabbit import RabbitBus
from shared.clock import SystemClock
from shared.events import Message
from shared.outbox import Mailbox

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

effects_metadata = MetaData()
effects = Table(
    "bus_group_effects",
    effects_metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(36), nullable=False),
)


@pytest.fixture
async def db(pg_engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    async with pg_engine.begin() as conn:
        await conn.run_sync(effects_metadata.drop_all)
        await conn.run_sync(effects_metadata.create_all)
    yield pg_engine
    async with pg_engine.begin() as conn:  # the session database's tables are the services'
        await conn.run_sync(effects_metadata.drop_all)


async def committed_effects(engine: AsyncEngine) -> Counter[str]:
    async with engine.connect() as conn:
        return Counter(row.message_id for row in await conn.execute(select(effects.c.message_id)))


class Consumer:
    """A service's handler: inbox + one effect per message, in `handle_once`; deliveries wait
    at `gate` (so that a batch builds up and its handlers run as one group) until it opens."""

    def __init__(self, mailbox: Mailbox, consumer: str, poison: set[uuid.UUID] = frozenset()):
        self.mailbox = mailbox
        self.consumer = consumer
        self.poison = poison
        self.gate = asyncio.Event()
        self.attempts: Counter[uuid.UUID] = Counter()
        self.duplicates = 0
        self.after_commit: asyncio.Event | None = None  # when set up: wait there before the ack

    async def handle(self, message: Message) -> None:
        self.attempts[message.message_id] += 1
        await self.gate.wait()
        async with self.mailbox.handle_once(self.consumer, message) as tx:
            if tx is None:
                self.duplicates += 1
                return
            await tx.conn.execute(effects.insert(), {"message_id": str(message.message_id)})
            if message.message_id in self.poison:
                raise RuntimeError(f"poison {message.message_id}")
        if self.after_commit is not None:
            await self.after_commit.wait()


async def publish(bus: RabbitBus, messages: list[Message]) -> None:
    await bus.publish_many([Envelope.of(m) for m in messages])


async def test_a_failing_handler_in_a_batch_is_retried_then_dead_lettered_the_rest_commit(
    rabbit_kit: BusKit, db: AsyncEngine
) -> None:
    bus = await rabbit_kit.bus(prefetch=64, delivery_limit=3)
    assert isinstance(bus, RabbitBus)
    consumer = rabbit_kit.consumer("pool")
    messages = [node_retired(f"n{i}") for i in range(30)]
    poison = messages[7]
    handler = Consumer(Mailbox(POOL, db, SystemClock()), consumer, {poison.message_id})
    await bus.subscribe(consumer, {"NodeRetired": handler.handle})
    await publish(bus, messages)
    await eventually(lambda: sum(handler.attempts.values()) == 30)
    handler.gate.set()  # the 30 prefetched deliveries run as one group

    [dead] = await take_dead_letters(bus, consumer, 1)
    assert dead.envelope == Envelope.of(poison)
    assert dead.reason.startswith("failed 3 times, last: RuntimeError: poison")
    assert handler.attempts[poison.message_id] == 3
    good = {str(m.message_id) for m in messages if m is not poison}
    assert await committed_effects(db) == dict.fromkeys(good, 1)
    assert all(handler.attempts[m.message_id] == 1 for m in messages if m is not poison)
    assert handler.mailbox.groups < 10
    assert await rabbit_kit.queue_state(consumer) == (0, 1)


async def test_a_duplicate_within_one_batch_has_one_effect(
    rabbit_kit: BusKit, db: AsyncEngine
) -> None:
    bus = await rabbit_kit.bus(prefetch=64)
    assert isinstance(bus, RabbitBus)
    consumer = rabbit_kit.consumer("pool")
    messages = [node_retired(f"n{i}") for i in range(10)]
    twice = messages[3]
    handler = Consumer(Mailbox(POOL, db, SystemClock()), consumer)
    await bus.subscribe(consumer, {"NodeRetired": handler.handle})
    await publish(bus, [*messages[:5], twice, *messages[5:], twice])  # as a relay may republish
    await eventually(lambda: sum(handler.attempts.values()) == 12)
    handler.gate.set()

    await eventually(lambda: handler.mailbox.grouped == 12)
    assert handler.mailbox.groups <= 2
    assert handler.duplicates == 2
    assert await committed_effects(db) == {str(m.message_id): 1 for m in messages}
    await eventually(lambda: not bus._consumers[consumer].acks.unsettled)


async def test_a_connection_lost_after_the_commit_before_the_acks_has_no_second_effect(
    rabbit_kit: BusKit, db: AsyncEngine
) -> None:
    """The acks of a committed group never reach the broker: it delivers the whole batch again,
    on the new connection, and the inbox rows the group committed turn every one away."""
    bus = await rabbit_kit.bus(prefetch=64, delivery_limit=5)
    assert isinstance(bus, RabbitBus)
    consumer = rabbit_kit.consumer("pool")
    messages = [node_retired(f"n{i}") for i in range(20)]
    handler = Consumer(Mailbox(POOL, db, SystemClock()), consumer)
    handler.after_commit = asyncio.Event()
    await bus.subscribe(consumer, {"NodeRetired": handler.handle})
    await publish(bus, messages)
    await eventually(lambda: sum(handler.attempts.values()) == 20)
    handler.gate.set()
    await eventually(lambda: handler.mailbox.grouped == 20)  # committed, none acked yet
    assert await committed_effects(db) == {str(m.message_id): 1 for m in messages}

    name = bus.connection_name(consumer)
    before = await close_connections(name)
    handler.after_commit.set()  # their acks now go to a closed channel
    await eventually(lambda: handler.duplicates == 20, within=30)

    assert all(handler.attempts[m.message_id] == 2 for m in messages)
    assert await committed_effects(db) == {str(m.message_id): 1 for m in messages}
    assert (await connection_pids(name))[name] != before[name]
    await eventually(lambda: not bus._consumers[consumer].acks.unsettled)
    assert await rabbit_kit.queue_state(consumer) == (0, 1)


class FakeDelivery:
    """What `_Acks` uses of an aio-pika delivery: its channel, its tag and `ack`."""

    def __init__(self, channel: object, tag: int, sent: list[tuple[int, bool]]) -> None:
        self.channel = channel
        self.delivery_tag = tag
        self.sent = sent

    async def ack(self, multiple: bool = False) -> None:
        await asyncio.sleep(0)  # the frame's write
        self.sent.append((self.delivery_tag, multiple))


async def test_acks_are_coalesced_but_never_cover_an_unsettled_delivery() -> None:
    from shared.bus.rabbit import _Acks

    acks, channel, sent = _Acks(), object(), []
    deliveries = [FakeDelivery(channel, tag, sent) for tag in range(1, 9)]
    for delivery in deliveries:
        acks.delivered(delivery)
    # 3 is still in its handler, 6 and 7 are being nacked; 8 arrived while stopping
    ready = [deliveries[n] for n in (0, 1, 3, 4)]
    await asyncio.gather(*(acks.ack(d) for d in ready))
    assert sent == [(2, True), (4, False), (5, False)]
    sent.clear()
    acks.forget(deliveries[5])
    acks.forget(deliveries[6])
    await acks.ack(deliveries[2])
    assert sent == [(3, False)]
    assert acks.unsettled == {channel: {8}}
