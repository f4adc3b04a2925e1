"""RabbitBus under faults: connections closed by the server, and a broker restarted mid-stream.

Both check the promise the services rely on: every message is handled at least once, so a
handler that deduplicates on the message id (the inbox; a set here) has each effect exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import aio_pika
import pytest
from bus_kit import BusKit, eventually, node_retired, take_dead_letters

from shared.bus import Envelope
from shared.bus.rabbit import RabbitBus, Unroutable
from shared.events import Message, PowerOn
from shared.testing.instances import InstanceError, OwnRabbitMQ, free_port

pytestmark = pytest.mark.rabbitmq

STREAM = 2_000


async def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl against the shared broker (needs root or the rabbitmq user)."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def connection_pids(*names: str) -> dict[str, str]:
    """The broker's pid of each of our connections, found by its `connection_name`."""
    pids = {}
    listing = await rabbitmqctl("list_connections", "-s", "pid", "client_properties")
    for line in listing.splitlines():
        pid, _, properties = line.partition("\t")
        for name in names:
            if f'{{"connection_name","{name}"}}' in properties:
                pids[name] = pid
    return pids


async def close_connections(*names: str) -> dict[str, str]:
    """Close our named connections from the server side; return the pids that were closed."""
    pids = await connection_pids(*names)
    assert set(pids) == set(names), f"connections not found: {set(names) - set(pids)}"
    for pid in pids.values():
        await rabbitmqctl("close_connection", pid, "test: closed by the server")
    return pids


class Stream:
    """Messages published at a steady pace by a few publishers while a handler consumes them,
    deduplicating on the message id (the inbox: a second delivery changes nothing)."""

    def __init__(self, count: int, publishers: int = 4) -> None:
        self.messages = [node_retired(f"n{i}") for i in range(count)]
        self.publishers = publishers
        self.published = 0
        self.deliveries = 0
        self.effects: set[uuid.UUID] = set()
        self.flowing = asyncio.Event()  # cleared: handlers wait, their deliveries stay unsettled
        self.flowing.set()
        self.held = 0

    async def handle(self, message: Message) -> None:
        self.deliveries += 1
        self.held += 1
        await self.flowing.wait()
        self.held -= 1
        await asyncio.sleep(0.002)  # some work
        self.effects.add(message.message_id)

    async def publish_all(self, bus: RabbitBus) -> None:
        pending = iter(self.messages)

        async def publisher() -> None:
            for message in pending:
                await bus.publish(Envelope.of(message))
                self.published += 1
                await asyncio.sleep(0.003)  # a stream, not a burst: faults land in the middle

        await asyncio.gather(*(publisher() for _ in range(self.publishers)))

    def complete(self) -> bool:
        return len(self.effects) == len(self.messages)


async def test_an_unroutable_command_raises_and_an_unroutable_event_is_dropped(
    rabbit_kit: BusKit,
) -> None:
    bus = await rabbit_kit.bus()
    power_on = PowerOn(
        node_ids=("n1",),
        reason="jobs wait",
        decision_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
    )
    with pytest.raises(Unroutable, match="no queue is bound to 'PowerOn'"):
        await bus.publish(Envelope.of(power_on))
    await bus.publish(Envelope.of(node_retired()))  # an event nobody listens to: fine


async def test_the_queue_itself_dead_letters_a_message_never_settled(rabbit_kit: BusKit) -> None:
    """The backstop behind `dispatch`: deliveries returned unsettled (as when a consumer crashes
    mid-handler) count too, and past the limit RabbitMQ moves the message to `<consumer>.dead`."""
    crashed = await rabbit_kit.bus(delivery_limit=2)
    consumer = rabbit_kit.consumer("crashing")

    async def handle(message: Message) -> None:
        raise AssertionError("not consumed through the bus in this test")

    await crashed.subscribe(consumer, {"NodeRetired": handle})
    await crashed.stop()  # the queue stays, with nobody consuming it
    bus = await rabbit_kit.bus(delivery_limit=2)
    message = node_retired()
    await bus.publish(Envelope.of(message))

    deliveries = 0
    async with await aio_pika.connect(rabbit_kit.url) as connection:
        queue = await (await connection.channel()).get_queue(f"{rabbit_kit.exchange}.{consumer}")
        while (delivery := await queue.get(fail=False)) is not None:
            deliveries += 1
            await delivery.nack(requeue=True)
    [dead] = await take_dead_letters(bus, consumer, 1)
    assert deliveries == 3  # the first delivery and two more: x-delivery-limit is 2
    assert dead.reason == "dead-lettered by RabbitMQ: delivery_limit"
    assert dead.envelope == Envelope.of(message)


async def test_consumers_resume_after_the_server_closes_their_connection(
    rabbit_kit: BusKit,
) -> None:
    bus = await rabbit_kit.bus()
    assert isinstance(bus, RabbitBus)
    consumer = rabbit_kit.consumer("pool")
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    await bus.subscribe(consumer, {"NodeRetired": handle})
    name = bus.connection_name(consumer)
    before = await close_connections(name)

    # Only a consumer restored on the new connection can take this message off the queue.
    message = node_retired()
    await bus.publish(Envelope.of(message))
    await eventually(lambda: handled == [message])
    after = await connection_pids(name)
    assert after[name] != before[name]
    assert await rabbit_kit.queue_state(consumer) == (0, 1)  # restored once, not twice
    await bus.ping()


async def test_a_stream_survives_the_server_closing_both_connections(
    rabbit_kit: BusKit, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await rabbit_kit.bus(prefetch=32, delivery_limit=5)
    assert isinstance(bus, RabbitBus)
    consumer = rabbit_kit.consumer("stream")
    stream = Stream(STREAM)
    await bus.subscribe(consumer, {"NodeRetired": stream.handle})
    consumer_name, publisher_name = bus.connection_name(consumer), bus.connection_name("publisher")
    before: dict[str, str] = {}
    closed_at: dict[str, int] = {}

    async def close_when(name: str, reached: Callable[[], bool], hold: bool = False) -> None:
        pids = await connection_pids(name)  # while the stream starts: rabbitmqctl is slow
        assert name in pids, f"no connection named {name}"
        before.update(pids)
        await eventually(reached)
        if hold:  # make sure handlers are running, with deliveries unsettled, when the link goes
            stream.flowing.clear()
            await eventually(lambda: stream.held > 0)
        await rabbitmqctl("close_connection", before[name], "test: closed by the server")
        stream.flowing.set()
        closed_at[name] = stream.published

    faults = [
        close_when(consumer_name, lambda: len(stream.effects) >= STREAM // 10, hold=True),
        close_when(publisher_name, lambda: stream.published >= STREAM // 4),
    ]
    with caplog.at_level(logging.WARNING, logger="shared.bus.rabbit"):
        await asyncio.wait_for(asyncio.gather(stream.publish_all(bus), *faults), 60)
        await eventually(stream.complete, within=30)

    assert all(count < STREAM for count in closed_at.values()), f"too late: {closed_at}"
    after = await connection_pids(consumer_name, publisher_name)
    assert after[consumer_name] != before[consumer_name]
    assert after[publisher_name] != before[publisher_name]
    assert stream.effects == {m.message_id for m in stream.messages}
    assert stream.deliveries > STREAM  # the held deliveries came again, and changed nothing
    assert await bus.take_dead_letters(consumer) == []
    # (r.msg, not r.getMessage(): some of aio-pika's records no longer format once logged)
    ours = [r for r in caplog.records if r.name == "shared.bus.rabbit"]
    retried = sum("retrying" in r.msg for r in ours)
    unsettled = Counter(
        type(r.args[2]).__name__
        for r in ours
        if "could not settle" in r.msg and isinstance(r.args, tuple)
    )
    print(
        f"{stream.deliveries} deliveries for {STREAM} messages; {retried} publishes retried; "
        f"acks lost: {dict(unsettled)}"
    )


@pytest.fixture
def own_broker() -> Iterator[OwnRabbitMQ]:
    """A RabbitMQ node of this test's own, since the test stops it: never the shared one."""
    try:
        broker = OwnRabbitMQ()
    except InstanceError:
        if os.environ.get("HPCFLEET_SKIP_RABBITMQ") == "1":
            pytest.skip("rabbitmq-server is not installed")
        raise
    with broker:
        yield broker


@pytest.mark.slow
async def test_nothing_is_lost_when_the_broker_restarts_mid_stream(
    own_broker: OwnRabbitMQ,
) -> None:
    kit = BusKit("rabbit", f"{own_broker.url}?reconnect_interval=0.5")
    bus = await kit.bus(prefetch=32, delivery_limit=5)
    assert isinstance(bus, RabbitBus)
    consumer = kit.consumer("stream")
    stream = Stream(STREAM // 2)
    await bus.subscribe(consumer, {"NodeRetired": stream.handle})
    try:
        publishing = asyncio.create_task(stream.publish_all(bus))
        await eventually(lambda: len(stream.effects) >= len(stream.messages) // 3)
        await asyncio.to_thread(own_broker.stop)
        await asyncio.to_thread(own_broker.start)
        await asyncio.wait_for(publishing, 60)  # publishes retry until the broker is back
        await eventually(stream.complete, within=30)

        assert stream.effects == {m.message_id for m in stream.messages}
        assert await bus.take_dead_letters(consumer) == []
        assert await kit.queue_state(consumer) == (0, 1)

        await asyncio.to_thread(own_broker.stop)
        bus.publish_timeout = 0.5
        with pytest.raises(ConnectionError, match="could not publish NodeRetired"):
            await bus.publish(Envelope.of(node_retired()))
        async with asyncio.timeout(5):
            await bus.stop()  # does not wait for a broker that is gone
    finally:
        await bus.stop()
    print(f"{stream.deliveries} deliveries for {len(stream.messages)} messages")


async def test_start_fails_fast_when_the_broker_is_unreachable() -> None:
    bus = RabbitBus(
        f"amqp://guest:guest@127.0.0.1:{free_port()}/", exchange="x", prefetch=1, delivery_limit=1
    )
    async with asyncio.timeout(10):
        with pytest.raises(ConnectionError):
            await bus.start()
