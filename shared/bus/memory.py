"""An in-process bus with RabbitMQ's semantics, for the single-process mode and service tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Mapping, Sequence

from shared.bus import DeadLetter, Envelope, Handler, Outcome, dispatch


class _Queue:
    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.items: asyncio.Queue[tuple[Envelope, int]] = asyncio.Queue()
        self.handlers: dict[str, Handler] = {}
        self.dead: list[DeadLetter] = []
        self.task: asyncio.Task[None] | None = None
        self.in_flight: set[asyncio.Task[None]] = set()


class MemoryBus:
    def __init__(self, *, prefetch: int = 64, delivery_limit: int = 5) -> None:
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, set[str]] = defaultdict(set)
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def ping(self) -> None:
        if not self._started:
            raise ConnectionError("memory bus is not started")

    async def publish(self, envelope: Envelope) -> None:
        await self.ping()
        for consumer in self._bindings.get(envelope.name, ()):
            self._queues[consumer].items.put_nowait((envelope, 1))

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            await self.publish(envelope)

    async def subscribe(self, consumer: str, handlers: Mapping[str, Handler]) -> None:
        await self.ping()
        queue = self._queues.setdefault(consumer, _Queue(consumer))
        queue.handlers.update(handlers)
        for name in handlers:
            self._bindings[name].add(consumer)
        if queue.task is None:
            queue.task = asyncio.create_task(self._consume(queue), name=f"bus:{consumer}")

    async def _consume(self, queue: _Queue) -> None:
        slots = asyncio.Semaphore(self.prefetch)
        while True:
            await slots.acquire()
            envelope, attempt = await queue.items.get()
            task = asyncio.create_task(self._deliver(queue, envelope, attempt))
            queue.in_flight.add(task)
            task.add_done_callback(queue.in_flight.discard)
            task.add_done_callback(lambda _task: slots.release())

    async def _deliver(self, queue: _Queue, envelope: Envelope, attempt: int) -> None:
        outcome, reason = await dispatch(queue.handlers, envelope, attempt, self.delivery_limit)
        if outcome is Outcome.RETRY:
            queue.items.put_nowait((envelope, attempt + 1))
        elif outcome is Outcome.DEAD:
            queue.dead.append(DeadLetter(queue.consumer, envelope, reason))

    async def take_dead_letters(self, consumer: str, limit: int = 100) -> list[DeadLetter]:
        queue = self._queues.get(consumer)
        if queue is None:
            return []
        taken, queue.dead = queue.dead[:limit], queue.dead[limit:]
        return taken

    async def stop(self) -> None:
        for queue in self._queues.values():
            if queue.task is not None:
                queue.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await queue.task
                queue.task = None
            if queue.in_flight:
                await asyncio.gather(*queue.in_flight, return_exceptions=True)
        self._started = False

    def pending(self, consumer: str) -> int:
        """Messages waiting in a consumer's queue (for tests and the status page)."""
        queue = self._queues.get(consumer)
        return queue.items.qsize() if queue else 0
