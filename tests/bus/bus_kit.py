"""Helpers for the bus tests: `BusKit` builds started buses of one kind and keeps tests apart.

RabbitBus tests use a uuid-suffixed exchange and uuid-suffixed consumers and delete them at the
end, so they never see another test's leftovers and leave the shared broker clean. If RabbitMQ is
unreachable they fail, saying how to start it, unless HPCFLEET_SKIP_RABBITMQ=1.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import aio_pika
import pytest
from yarl import URL

from shared.bus import Bus, DeadLetter
from shared.bus.memory import MemoryBus
from shared.bus.rabbit import RabbitBus
from shared.events import NodeRetired, RetireReason

RABBITMQ_URL = os.environ.get("HPCFLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def require_rabbitmq(url: str = RABBITMQ_URL) -> None:
    """Fail (or skip, when HPCFLEET_SKIP_RABBITMQ=1) if nothing listens at the broker's address."""
    address = URL(url)
    try:
        socket.create_connection((address.host or "127.0.0.1", address.port or 5672), 2).close()
        return
    except OSError as exc:
        problem = f"RabbitMQ is not reachable at {address.host}:{address.port} ({exc})"
    if os.environ.get("HPCFLEET_SKIP_RABBITMQ") == "1":
        pytest.skip(f"{problem}; skipped as HPCFLEET_SKIP_RABBITMQ=1")
    pytest.fail(
        f"{problem}. Start it with `rabbitmq-server -detached` (as root or the rabbitmq user), "
        "or set HPCFLEET_SKIP_RABBITMQ=1 to skip the RabbitMQ tests.",
        pytrace=False,
    )


def node_retired(node_id: str = "n1") -> NodeRetired:
    return NodeRetired(
        occurred_at=datetime.now(UTC),
        node_id=node_id,
        instance_id=None,
        reason=RetireReason.SHRINK,
    )


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until `check()` holds (deliveries are asynchronous on both buses)."""
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


async def take_dead_letters(
    bus: Bus, consumer: str, count: int, within: float = 10.0
) -> list[DeadLetter]:
    """Wait for `count` dead letters of a consumer (dead-lettering is asynchronous too)."""
    taken: list[DeadLetter] = []
    async with asyncio.timeout(within):
        while True:
            taken += await bus.take_dead_letters(consumer)
            if len(taken) >= count:
                return taken
            await asyncio.sleep(0.02)


class BusKit:
    """Builds started buses of one kind and names consumers so that tests stay apart."""

    def __init__(self, kind: str, url: str = RABBITMQ_URL) -> None:
        self.kind = kind
        self.url = url
        self.suffix = uuid.uuid4().hex[:10]
        self.exchange = f"hpcfleet-bustest-{self.suffix}"
        self.consumers: list[str] = []
        self.buses: list[Bus] = []

    def consumer(self, name: str) -> str:
        """A consumer (queue) name unique to this test."""
        unique = f"hpcfleet-bustest-{name}-{self.suffix}"
        self.consumers.append(unique)
        return unique

    async def bus(self, *, prefetch: int = 16, delivery_limit: int = 3) -> Bus:
        bus: Bus
        if self.kind == "memory":
            bus = MemoryBus(prefetch=prefetch, delivery_limit=delivery_limit)
        else:
            bus = RabbitBus(
                self.url, exchange=self.exchange, prefetch=prefetch, delivery_limit=delivery_limit
            )
        await bus.start()
        self.buses.append(bus)
        return bus

    async def ready_messages(self, consumer: str) -> int:
        """Messages waiting in a consumer's queue (not counting ones delivered but unsettled)."""
        if self.kind == "memory":
            return sum(b.pending(consumer) for b in self.buses if isinstance(b, MemoryBus))
        return (await self.queue_state(consumer))[0]

    async def queue_state(self, consumer: str) -> tuple[int, int]:
        """RabbitMQ's count of ready messages and of consumers on a consumer's queue."""
        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{self.exchange}.{consumer}", passive=True)
            declared = queue.declaration_result
            return declared.message_count or 0, declared.consumer_count or 0

    async def close(self) -> None:
        """Stop the buses, then delete the test's queues and exchanges from the broker."""
        try:
            for bus in self.buses:
                await bus.stop()
        finally:
            if self.kind == "rabbit":
                await self._delete_entities()

    async def _delete_entities(self) -> None:
        queues = [f"{self.exchange}.{c}" for c in self.consumers]
        names = [(True, q) for q in queues + [f"{q}.dead" for q in queues]]
        names += [(False, e) for e in (self.exchange, f"{self.exchange}.dead")]
        async with await aio_pika.connect(self.url) as connection:
            for is_queue, name in names:
                # A fresh channel each: should a delete fail, the broker closes its channel.
                async with await connection.channel() as channel:
                    if is_queue:
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
