"""The bus contract: every test runs against MemoryBus and RabbitBus (the `kit` fixture)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from bus_kit import BusKit, eventually, node_retired, take_dead_letters

from shared.bus import Envelope, Handler
from shared.events import ImageRetired, Message


def image_retired() -> ImageRetired:
    return ImageRetired(occurred_at=datetime.now(UTC), image_id="ami-0123", reason="superseded")


async def test_a_message_reaches_every_bound_consumer_and_no_unbound_one(kit: BusKit) -> None:
    bus = await kit.bus()
    seen: dict[str, list[Message]] = {"a": [], "b": [], "c": []}

    def recorder(who: str) -> Handler:
        async def handle(message: Message) -> None:
            seen[who].append(message)

        return handle

    await bus.subscribe(kit.consumer("a"), {"NodeRetired": recorder("a")})
    await bus.subscribe(
        kit.consumer("b"), {"NodeRetired": recorder("b"), "ImageRetired": recorder("b")}
    )
    await bus.subscribe(kit.consumer("c"), {"ImageRetired": recorder("c")})
    retired, image = node_retired(), image_retired()
    await bus.publish(Envelope.of(retired))
    await bus.publish(Envelope.of(image))

    await eventually(lambda: len(seen["a"]) == 1 and len(seen["b"]) == 2 and len(seen["c"]) == 1)
    # Queues are FIFO: had NodeRetired been routed to c, c would have had it before ImageRetired.
    assert seen["a"] == [retired]
    assert sorted(m.name() for m in seen["b"]) == ["ImageRetired", "NodeRetired"]
    assert seen["c"] == [image]


async def test_consumers_bound_to_the_same_name_each_get_every_message(kit: BusKit) -> None:
    bus = await kit.bus()
    got: dict[str, list[uuid.UUID]] = {"pool": [], "audit": []}
    for who in got:

        async def handle(message: Message, who: str = who) -> None:
            got[who].append(message.message_id)

        await bus.subscribe(kit.consumer(who), {"NodeRetired": handle})
    sent = [node_retired(f"n{i}") for i in range(3)]
    for message in sent:
        await bus.publish(Envelope.of(message))

    await eventually(lambda: all(len(ids) == 3 for ids in got.values()))
    for ids in got.values():
        assert sorted(ids) == sorted(m.message_id for m in sent)


async def test_an_invalid_message_is_dead_lettered_with_the_reason_and_the_next_is_handled(
    kit: BusKit,
) -> None:
    bus = await kit.bus()
    consumer = kit.consumer("pool")
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    # "NotAMessage" is bound by hand; the catalogue does not know it.
    await bus.subscribe(consumer, {"NodeRetired": handle, "NotAMessage": handle})
    missing_fields = Envelope("NodeRetired", b'{"node_id": "n1"}', "m-fields", "c1")
    not_json = Envelope("NodeRetired", b"not json", "m-json", "c2")
    unknown = Envelope("NotAMessage", b"{}", "m-unknown", "c3")
    for envelope in (missing_fields, not_json, unknown):
        await bus.publish(envelope)
    valid = node_retired()
    await bus.publish(Envelope.of(valid))

    await eventually(lambda: handled == [valid])
    dead = {d.envelope.message_id: d for d in await take_dead_letters(bus, consumer, 3)}
    assert set(dead) == {"m-fields", "m-json", "m-unknown"}
    assert dead["m-fields"].envelope == missing_fields
    assert dead["m-fields"].consumer == consumer
    assert dead["m-fields"].reason.startswith("invalid NodeRetired: ")
    for field in ("occurred_at", "instance_id", "reason"):
        assert f"{field}: Field required" in dead["m-fields"].reason
    assert "Invalid JSON" in dead["m-json"].reason
    assert dead["m-unknown"].reason == "unknown message type 'NotAMessage'"
    assert dead["m-unknown"].envelope == unknown
    assert handled == [valid]


async def test_a_failing_handler_gets_the_delivery_limit_then_the_message_is_dead_lettered(
    kit: BusKit,
) -> None:
    bus = await kit.bus(delivery_limit=3)
    consumer = kit.consumer("pool")
    attempts = 0

    async def handle(message: Message) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError(f"disk on fire at attempt {attempts}")

    await bus.subscribe(consumer, {"NodeRetired": handle})
    message = node_retired()
    await bus.publish(Envelope.of(message))

    [dead] = await take_dead_letters(bus, consumer, 1)
    assert dead.envelope.message_id == str(message.message_id)
    assert dead.reason == "failed 3 times, last: RuntimeError: disk on fire at attempt 3"
    await asyncio.sleep(0.3)  # nothing is delivered after the dead letter
    assert attempts == 3
    assert await bus.take_dead_letters(consumer) == []


async def test_a_handler_that_fails_once_has_its_effect_once(kit: BusKit) -> None:
    bus = await kit.bus(delivery_limit=3)
    consumer = kit.consumer("pool")
    attempts: list[uuid.UUID] = []
    effects: list[uuid.UUID] = []

    async def handle(message: Message) -> None:
        attempts.append(message.message_id)
        if len(attempts) == 1:
            raise ConnectionResetError("database went away")
        effects.append(message.message_id)

    await bus.subscribe(consumer, {"NodeRetired": handle})
    message = node_retired()
    await bus.publish(Envelope.of(message))

    await eventually(lambda: len(effects) == 1)
    await asyncio.sleep(0.3)
    assert attempts == [message.message_id] * 2
    assert effects == [message.message_id]
    assert await bus.take_dead_letters(consumer) == []


async def test_stop_waits_for_the_handler_in_flight_and_settles_its_message(kit: BusKit) -> None:
    bus = await kit.bus()
    consumer = kit.consumer("pool")
    started = asyncio.Event()
    finished: list[uuid.UUID] = []

    async def handle(message: Message) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(message.message_id)

    await bus.subscribe(consumer, {"NodeRetired": handle})
    message = node_retired()
    await bus.publish(Envelope.of(message))
    async with asyncio.timeout(10):
        await started.wait()

    await bus.stop()
    assert finished == [message.message_id]
    assert await kit.ready_messages(consumer) == 0  # acknowledged, not handed back
    with pytest.raises(ConnectionError):
        await bus.ping()


@pytest.mark.parametrize("prefetch", [1, 4])
async def test_prefetch_bounds_the_handlers_running_at_once(kit: BusKit, prefetch: int) -> None:
    bus = await kit.bus(prefetch=prefetch)
    running = peak = done = 0

    async def handle(message: Message) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        done += 1

    await bus.subscribe(kit.consumer("pool"), {"NodeRetired": handle})
    await asyncio.gather(*(bus.publish(Envelope.of(node_retired())) for _ in range(4 * prefetch)))

    await eventually(lambda: done == 4 * prefetch)
    assert peak == prefetch


async def test_ping_says_whether_the_bus_is_usable(kit: BusKit) -> None:
    bus = await kit.bus()
    await bus.ping()
    await bus.stop()
    with pytest.raises(ConnectionError):
        await bus.ping()


async def test_a_consumer_without_dead_letters_has_none(kit: BusKit) -> None:
    bus = await kit.bus()
    assert await bus.take_dead_letters(kit.consumer("never-subscribed")) == []
