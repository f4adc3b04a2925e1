"""RabbitBus.publish_many, the relay's way to publish: a batch's frames go out in one write and
its confirms are awaited together; a return or a dropped connection is still answered per
message, and the channel stays usable."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from bus_kit import BusKit, eventually, node_retired
from test_rabbit_faults import close_connections

from shared.bus import Envelope
from shared.bus.rabbit import RabbitBus, Unroutable
from shared.events import Message, PowerOn

pytestmark = pytest.mark.rabbitmq


def power_on() -> PowerOn:
    return PowerOn(
        node_ids=("n1",),
        reason="jobs wait",
        decision_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
    )


async def test_a_batch_arrives_in_order_and_an_unroutable_command_in_it_raises(
    rabbit_kit: BusKit,
) -> None:
    bus = await rabbit_kit.bus(prefetch=64)
    assert isinstance(bus, RabbitBus)
    consumer = rabbit_kit.consumer("batch")
    received: list[uuid.UUID] = []

    async def handle(message: Message) -> None:
        received.append(message.message_id)

    await bus.subscribe(consumer, {"NodeRetired": handle})
    first = [node_retired(f"n{i}") for i in range(300)]
    await bus.publish_many([Envelope.of(m) for m in first])
    await eventually(lambda: len(received) == 300)
    assert received == [m.message_id for m in first]

    second = [node_retired(f"m{i}") for i in range(3)]
    with pytest.raises(Unroutable, match="no queue is bound to 'PowerOn'"):
        await bus.publish_many(
            [Envelope.of(second[0]), Envelope.of(power_on()), *map(Envelope.of, second[1:])]
        )
    await eventually(lambda: len(received) == 303)
    # The channel's delivery tags still match the broker's: the next batches are confirmed.
    third = [node_retired(f"k{i}") for i in range(50)]
    await bus.publish_many([Envelope.of(m) for m in third[:25]])
    await bus.publish(Envelope.of(third[25]))
    await bus.publish_many([Envelope.of(m) for m in third[26:]])
    await eventually(lambda: len(received) == 353)
    assert received[303:] == [m.message_id for m in third]


async def test_batches_survive_the_server_closing_the_publisher_connection(
    rabbit_kit: BusKit,
) -> None:
    bus = await rabbit_kit.bus(prefetch=64)
    assert isinstance(bus, RabbitBus)
    consumer = rabbit_kit.consumer("batch")
    received: set[uuid.UUID] = set()

    async def handle(message: Message) -> None:
        received.add(message.message_id)

    await bus.subscribe(consumer, {"NodeRetired": handle})
    messages = [node_retired(f"n{i}") for i in range(4_000)]
    published = 0

    async def relay() -> None:
        nonlocal published
        for start in range(0, len(messages), 200):
            await bus.publish_many([Envelope.of(m) for m in messages[start : start + 200]])
            published = start + 200
            await asyncio.sleep(0.01)

    async def fault() -> None:
        await eventually(lambda: published >= 600)
        await close_connections(bus.connection_name("publisher"))

    await asyncio.wait_for(asyncio.gather(relay(), fault()), 60)
    await eventually(lambda: len(received) == len(messages), within=30)
    assert received == {m.message_id for m in messages}
