"""Bus throughput: messages/s published with confirms, and consumed, for RabbitBus and MemoryBus.

    .venv/bin/python tests/benchmarks/bench_bus.py [--messages 2000] [--runs 5] [--only rabbit]

Publishing is measured one message at a time (each waits for its confirm: the latency-bound rate
an outbox relay gets when it publishes row by row) and with `--in-flight` publishes outstanding.
Consuming is the time to drain a backlog through a no-op handler (decode, dispatch, ack). Each
figure is the median of `--runs` runs. RabbitBus uses a uuid-named exchange and queue, deleted at
the end, on the broker at HPCFLEET_TEST_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
from rich.console import Console
from rich.table import Table

from shared.bus import Bus, Envelope
from shared.bus.memory import MemoryBus
from shared.bus.rabbit import RabbitBus
from shared.events import Message, NodeRetired, RetireReason

RABBITMQ_URL = os.environ.get("HPCFLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
PREFETCH = 64


def envelopes(count: int) -> list[Envelope]:
    now = datetime.now(UTC)
    return [
        Envelope.of(
            NodeRetired(
                occurred_at=now, node_id=f"n{i}", instance_id=None, reason=RetireReason.SHRINK
            )
        )
        for i in range(count)
    ]


class Bench:
    """One bus under test, with a consumer whose handler can be held to build a backlog."""

    def __init__(self, kind: str) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.kind = kind
        self.exchange = f"hpcfleet-bench-{suffix}"
        self.consumer = f"hpcfleet-bench-{suffix}"
        self.handled = 0
        self.flowing = asyncio.Event()
        self.bus: Bus = (
            MemoryBus(prefetch=PREFETCH, delivery_limit=5)
            if kind == "memory"
            else RabbitBus(
                RABBITMQ_URL, exchange=self.exchange, prefetch=PREFETCH, delivery_limit=5
            )
        )

    async def handle(self, message: Message) -> None:
        await self.flowing.wait()
        self.handled += 1

    async def __aenter__(self) -> Bench:
        await self.bus.start()
        await self.bus.subscribe(self.consumer, {"NodeRetired": self.handle})
        return self

    async def __aexit__(self, *_: object) -> None:
        self.flowing.set()
        await self.bus.stop()
        if self.kind == "rabbit":
            async with await aio_pika.connect(RABBITMQ_URL) as connection:
                channel = await connection.channel()
                for queue in (self.consumer, f"{self.consumer}.dead"):
                    await channel.queue_delete(queue)
                for exchange in (self.exchange, f"{self.exchange}.dead"):
                    await channel.exchange_delete(exchange)

    async def drain(self, target: int) -> None:
        self.flowing.set()
        while True:
            if self.handled >= target:
                return
            await asyncio.sleep(0.001)


async def timed(action: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def one_run(kind: str, count: int, in_flight: int) -> dict[str, float]:
    """Rates of one run, in messages per second."""
    async with Bench(kind) as bench:
        sequential, concurrent = envelopes(count), envelopes(count)

        async def one_at_a_time() -> None:
            for envelope in sequential:
                await bench.bus.publish(envelope)

        async def several_at_a_time() -> None:
            pending = iter(concurrent)

            async def publisher() -> None:
                for envelope in pending:
                    await bench.bus.publish(envelope)

            await asyncio.gather(*(publisher() for _ in range(in_flight)))

        # The handler is held while publishing, so consuming does not compete with it and the
        # whole 2 x count backlog is waiting when the drain is timed.
        rates = {
            "publish, 1 in flight": count / await timed(one_at_a_time),
            f"publish, {in_flight} in flight": count / await timed(several_at_a_time),
        }
        # The first `prefetch` deliveries are already in the handler; a small head start.
        rates["consume"] = 2 * count / await timed(lambda: bench.drain(2 * count))
        return rates


async def main(kinds: list[str], count: int, runs: int, in_flight: int) -> None:
    table = Table(title=f"bus throughput, messages/s (median of {runs} runs of {count} messages)")
    table.add_column("bus")
    rows: dict[str, dict[str, float]] = {}
    for kind in kinds:
        results = [await one_run(kind, count, in_flight) for _ in range(runs)]
        rows[kind] = {name: statistics.median(r[name] for r in results) for name in results[0]}
    for name in next(iter(rows.values())):
        table.add_column(name, justify="right")
    for kind, rates in rows.items():
        label = "RabbitBus" if kind == "rabbit" else "MemoryBus"
        table.add_row(label, *(f"{rate:,.0f}" for rate in rates.values()))
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--only", choices=["rabbit", "memory"])
    args = parser.parse_args()
    chosen = [args.only] if args.only else ["rabbit", "memory"]
    asyncio.run(main(chosen, args.messages, args.runs, args.in_flight))
