"""End-to-end throughput with exactly-once effects: outbox -> RabbitMQ -> inbox -> PostgreSQL.

This process plays a service that emits: it writes commands into an outbox, 50 per transaction,
while its `OutboxRelay` publishes them to RabbitMQ with confirms. A consumer process (this script
with `--consume`) takes them off its quorum queue and, per message, records the inbox row and a
state change in one PostgreSQL transaction; `--consumers` of them compete for the queue, as a
service's workers scale out. The clock runs from the first write to the last
effect; then every message must have exactly one inbox row and one effect.
Run: `.venv/bin/python tests/benchmarks/bench_outbox_e2e.py [--messages N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from tests_support import delete_rabbit_namespace

import services.registry  # noqa: F401
from deploy.migrations import upgrade
from services.bakery.tables import MAILBOX as PRODUCER
from services.pool.tables import MAILBOX as CONSUMER
from shared.bus.rabbit import RabbitBus
from shared.clock import SystemClock
from shared.events import BuildImage, Message
from shared.outbox import Mailbox, OutboxRelay
from shared.store import create_engine

ADMIN = os.environ.get("HPCFLEET_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ = os.environ.get("HPCFLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")

effects_metadata = MetaData()
effects = Table(
    "bench_effects",
    effects_metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(36), nullable=False),
)


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def consume(url: str, exchange: str) -> None:
    """The consumer process: inbox + effect per message, until SIGTERM."""
    engine = create_engine(url)
    mailbox = Mailbox(CONSUMER, engine, SystemClock())
    bus = RabbitBus(RABBITMQ, exchange=exchange, prefetch=256, delivery_limit=5)

    async def handle(message: Message) -> None:
        async with mailbox.handle_once("bench", message) as tx:
            if tx is not None:
                await tx.conn.execute(effects.insert().values(message_id=str(message.message_id)))

    await bus.start()
    await bus.subscribe("bench", {BuildImage.name(): handle})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await bus.stop()
    await engine.dispose()


async def run(messages: int, per_transaction: int, consumers: int) -> dict[str, float]:
    name = f"hpcfleet_bench_{uuid.uuid4().hex[:8]}"
    exchange = f"hpcfleet-bench-{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    engine = create_engine(url)
    workers: list[asyncio.subprocess.Process] = []
    bus = RabbitBus(RABBITMQ, exchange=exchange, prefetch=256, delivery_limit=5)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(effects_metadata.create_all)
        for _ in range(consumers):  # competing consumers of one queue, as scaled-out workers
            worker = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--consume", url, exchange, stdout=asyncio.subprocess.PIPE
            )
            workers.append(worker)
            assert worker.stdout is not None
            await worker.stdout.readline()  # its queue exists: nothing published is lost
        await bus.start()
        clock = SystemClock()
        mailbox = Mailbox(PRODUCER, engine, clock)
        relay = OutboxRelay(PRODUCER, engine, bus, clock, batch=500)
        written = asyncio.Event()

        async def relay_until_done() -> None:
            while not (written.is_set() and await relay.relay() == 0):
                if await relay.relay() == 0:
                    await asyncio.sleep(0.005)

        now = datetime.now(UTC)
        started = time.perf_counter()
        relaying = asyncio.create_task(relay_until_done())
        for first in range(0, messages, per_transaction):
            async with mailbox.transaction() as tx:
                for n in range(first, min(messages, first + per_transaction)):
                    tx.emit(BuildImage(recipe=f"r{n}", reason="bench", occurred_at=now))
        write_seconds = time.perf_counter() - started
        written.set()
        done = 0
        while done < messages:
            await asyncio.sleep(0.05)
            async with engine.connect() as conn:
                done = int(await conn.scalar(select(func.count()).select_from(effects)) or 0)
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {done} of {messages} handled after 600 s")
        elapsed = time.perf_counter() - started
        await relaying
        async with engine.connect() as conn:
            inbox = await conn.scalar(select(func.count()).select_from(CONSUMER.inbox))
            distinct = await conn.scalar(
                select(func.count(func.distinct(effects.c.message_id))).select_from(effects)
            )
            latency = (
                await conn.execute(
                    text(
                        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d),"
                        " percentile_cont(0.99) WITHIN GROUP (ORDER BY d) FROM ("
                        " SELECT extract(epoch FROM i.handled_at - o.created_at) AS d"
                        " FROM pool_inbox i JOIN bakery_outbox o USING (message_id)) s"
                    )
                )
            ).one()
        assert inbox == messages == distinct, f"{inbox} inbox rows, {distinct} effects"
        return {
            "messages": messages,
            "seconds": elapsed,
            "throughput": messages / elapsed,
            "write_rate": messages / write_seconds,
            "latency_p50_ms": float(latency[0]) * 1000,
            "latency_p99_ms": float(latency[1]) * 1000,
        }
    finally:
        await bus.stop()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.wait(), 30)
        await engine.dispose()
        await delete_rabbit_namespace(RABBITMQ, exchange, ["bench"])
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--consume":
        asyncio.run(consume(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--per-transaction", type=int, default=50)
    parser.add_argument("--consumers", type=int, default=2, help="Consumer processes.")
    args = parser.parse_args()
    result = asyncio.run(run(args.messages, args.per_transaction, args.consumers))
    print(
        f"outbox -> RabbitMQ -> inbox -> PostgreSQL, {result['messages']:.0f} messages,"
        f" {args.consumers} consumer process(es):"
        f" {result['throughput']:,.0f} msg/s end to end ({result['seconds']:.1f} s),"
        f" outbox writes {result['write_rate']:,.0f} msg/s,"
        f" latency p50 {result['latency_p50_ms']:.0f} ms, p99 {result['latency_p99_ms']:.0f} ms;"
        " every message handled exactly once"
    )


if __name__ == "__main__":
    main()
