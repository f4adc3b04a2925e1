"""End-to-end throughput with exactly-once effects: outbox -> RabbitMQ -> inbox -> PostgreSQL.

This process plays the API: it writes BuildImage commands into bakery's outbox, 50 per
transaction. A real bakery worker (`python -m services.bakery.worker`, its own process) relays the
outbox to RabbitMQ with confirms, consumes the queue, and for each message records the inbox row
and the build row in one transaction. The clock runs from the first write to the last build row.
Run: `.venv/bin/python tests/benchmarks/bench_outbox_e2e.py [--messages N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from sqlalchemy import func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from tests_support import delete_rabbit_namespace

import services.registry  # noqa: F401
from deploy.migrations import upgrade
from services.bakery.tables import MAILBOX, builds
from shared.clock import SystemClock
from shared.events import BuildImage
from shared.outbox import Mailbox
from shared.store import create_engine

ADMIN = os.environ.get("HPCFLEET_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ = os.environ.get("HPCFLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run(messages: int, per_transaction: int) -> dict[str, float]:
    name = f"hpcfleet_bench_{uuid.uuid4().hex[:8]}"
    exchange = f"hpcfleet-bench-{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    engine = create_engine(url)
    worker: asyncio.subprocess.Process | None = None
    try:
        await upgrade(engine)
        env = {
            **os.environ,
            "HPCFLEET_DATABASE_URL": url,
            "HPCFLEET_BUS_URL": RABBITMQ,
            "HPCFLEET_EXCHANGE": exchange,
            "HPCFLEET_PREFETCH": "256",
            "HPCFLEET_LOG_LEVEL": "WARNING",
        }
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.bakery.worker", env=env
        )
        await asyncio.sleep(3)  # let it declare its queue before anything is relayed
        mailbox = Mailbox(MAILBOX, engine, SystemClock())
        now = datetime.now(UTC)
        started = time.perf_counter()
        for first in range(0, messages, per_transaction):
            async with mailbox.transaction() as tx:
                for n in range(first, min(messages, first + per_transaction)):
                    tx.emit(BuildImage(recipe=f"r{n}", reason="bench", occurred_at=now))
        written = time.perf_counter() - started
        done = 0
        while done < messages:
            await asyncio.sleep(0.05)
            async with engine.connect() as conn:
                done = int(await conn.scalar(select(func.count()).select_from(builds)) or 0)
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {done} of {messages} handled after 600 s")
        elapsed = time.perf_counter() - started
        async with engine.connect() as conn:
            inbox = await conn.scalar(select(func.count()).select_from(MAILBOX.inbox))
            unpublished = await conn.scalar(
                select(func.count()).where(MAILBOX.outbox.c.published_at.is_(None))
            )
            latency = (
                await conn.execute(
                    text(
                        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d),"
                        " percentile_cont(0.99) WITHIN GROUP (ORDER BY d) FROM ("
                        " SELECT extract(epoch FROM i.handled_at - o.created_at) AS d"
                        " FROM bakery_inbox i JOIN bakery_outbox o USING (message_id)) s"
                    )
                )
            ).one()
        assert inbox == messages, f"{inbox} inbox rows for {messages} messages"
        assert unpublished == 0
        return {
            "messages": messages,
            "seconds": elapsed,
            "throughput": messages / elapsed,
            "write_rate": messages / written,
            "latency_p50_ms": float(latency[0]) * 1000,
            "latency_p99_ms": float(latency[1]) * 1000,
        }
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(worker.wait(), 30)
        await engine.dispose()
        await delete_rabbit_namespace(RABBITMQ, exchange, ["bakery"])
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--per-transaction", type=int, default=50)
    args = parser.parse_args()
    result = asyncio.run(run(args.messages, args.per_transaction))
    print(
        f"outbox -> RabbitMQ -> inbox -> PostgreSQL, {result['messages']:.0f} messages:"
        f" {result['throughput']:,.0f} msg/s end to end ({result['seconds']:.1f} s),"
        f" outbox writes {result['write_rate']:,.0f} msg/s,"
        f" latency p50 {result['latency_p50_ms']:.0f} ms, p99 {result['latency_p99_ms']:.0f} ms;"
        " every message handled exactly once"
    )


if __name__ == "__main__":
    main()
