"""End-to-end throughput with exactly-once effects: outbox -> RabbitMQ -> inbox -> PostgreSQL.

This process plays a service that emits: it writes commands into an outbox, 50 per transaction,
while its `OutboxRelay` publishes them to RabbitMQ with confirms. A consumer process (this script
with `--consume`) takes them off its quorum queue and, per message, records the inbox row and a
state change through `Mailbox.handle_once` (whose transactions commit in groups on PostgreSQL);
`--consumers` of them compete for the queue, as a service's workers scale out. The clock runs from
the first write to the last effect; then every message must have exactly one inbox row and one
effect. Besides the rate it prints the CPU time each part spent per message (this process, the
consumers, RabbitMQ, and PostgreSQL's backends of the run's database), which says what the rate
would be on idle cores when other work shares the machine.
The processes run as a service's worker does: on its event loop (`shared.eventloop`: uvloop),
with what startup made frozen out of the garbage collector's way (`gc.freeze()`).
Run: `.venv/bin/python tests/benchmarks/bench_outbox_e2e.py [--messages N] [--consumers N]`
(`--profile DIR` writes cProfile stats of each process, `--loop asyncio` runs them on the
standard event loop instead, for comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import os
import pwd
import resource
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
from shared import eventloop
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

# Built once, as `Mailbox` builds its inbox insert: a statement built per message costs SQLAlchemy
# more CPU (`.values()`, its cache key) than executing it.
EFFECT = effects.insert()


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu(database: str) -> dict[str, float]:
    """CPU seconds used so far by this machine's RabbitMQ (beam.smp of the `rabbitmq` user) and by
    PostgreSQL for the benchmark (the backends of its database, which live as long as the
    engines' pools, and the WAL writer, checkpointer and background writer), from /proc. Other
    users of the same broker count too: the figure is an upper bound of what the run cost it."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        rabbitmq_uid = pwd.getpwnam("rabbitmq").pw_uid
    except KeyError:
        rabbitmq_uid = -1
    shared = ("walwriter", "checkpointer", "background writer")
    used = {"rabbitmq": 0.0, "postgresql": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if name.startswith("beam") and uid in (rabbitmq_uid, -1):
            used["rabbitmq"] += seconds
        elif name.startswith("postgres") and (
            f" {database} " in command or any(part in command for part in shared)
        ):
            used["postgresql"] += seconds
    return used


async def consume(url: str, exchange: str, *, prefetch: int) -> None:
    """The consumer process: inbox + effect per message, until SIGTERM; prints its CPU time."""
    engine = create_engine(url)
    mailbox = Mailbox(CONSUMER, engine, SystemClock())
    bus = RabbitBus(RABBITMQ, exchange=exchange, prefetch=prefetch, delivery_limit=5)

    async def handle(message: Message) -> None:
        async with mailbox.handle_once("bench", message) as tx:
            if tx is not None:
                await tx.conn.execute(EFFECT, {"message_id": str(message.message_id)})

    await bus.start()
    await bus.subscribe("bench", {BuildImage.name(): handle})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    gc.freeze()  # as shared.process.run_worker does once the worker has started
    print("ready", flush=True)
    idle = cpu_seconds()
    await stop.wait()
    print(f"cpu {cpu_seconds() - idle:.3f} {mailbox.groups} {mailbox.grouped}", flush=True)
    await bus.stop()
    await engine.dispose()


async def run(args: argparse.Namespace) -> dict[str, float]:
    messages, per_transaction = args.messages, args.per_transaction
    name = f"hpcfleet_bench_{uuid.uuid4().hex[:8]}"
    exchange = f"hpcfleet-bench-{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    engine = create_engine(url)
    workers: list[asyncio.subprocess.Process] = []
    stopped: set[int] = set()  # a second SIGTERM would kill a worker while it writes its profile
    bus = RabbitBus(RABBITMQ, exchange=exchange, prefetch=args.prefetch, delivery_limit=5)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(effects_metadata.create_all)
        for number in range(args.consumers):  # competing consumers, as scaled-out workers
            command = [__file__, "--consume", url, exchange, "--prefetch", str(args.prefetch)]
            if args.profile:
                command += ["--profile", str(Path(args.profile) / f"consumer{number}.prof")]
            command += ["--loop", args.loop]
            worker = await asyncio.create_subprocess_exec(
                sys.executable, *command, stdout=asyncio.subprocess.PIPE
            )
            workers.append(worker)
            assert worker.stdout is not None
            await worker.stdout.readline()  # its queue exists: nothing published is lost
        await bus.start()
        clock = SystemClock()
        mailbox = Mailbox(PRODUCER, engine, clock)
        relay = OutboxRelay(PRODUCER, engine, bus, clock, batch=500)
        written = asyncio.Event()
        gc.freeze()  # as the service processes do once they have started

        async def relay_until_done() -> None:
            while not (written.is_set() and await relay.relay() == 0):
                if await relay.relay() == 0:
                    await asyncio.sleep(0.005)

        now = datetime.now(UTC)
        servers_before, producer_before = server_cpu(name), cpu_seconds()
        profile = cProfile.Profile(time.process_time) if args.profile else None
        if profile:
            profile.enable()
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
            # max(id) is read off the index; count(*) every 50 ms cost PostgreSQL and this
            # process a noticeable share of the CPU being measured
            await asyncio.sleep(0.1)
            async with engine.connect() as conn:
                done = int(await conn.scalar(select(func.max(effects.c.id))) or 0)
                if done >= messages:  # ids have gaps if a transaction rolled back
                    done = int(await conn.scalar(select(func.count()).select_from(effects)) or 0)
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {done} of {messages} handled after 600 s")
        elapsed = time.perf_counter() - started
        await relaying
        if profile:
            profile.disable()
            profile.dump_stats(str(Path(args.profile) / "producer.prof"))
        producer_cpu = cpu_seconds() - producer_before
        servers = {k: v - servers_before[k] for k, v in server_cpu(name).items()}
        consumer_cpu = groups = grouped = 0.0
        for worker in workers:
            assert worker.stdout is not None
            worker.send_signal(signal.SIGTERM)
            stopped.add(worker.pid)
            line = await asyncio.wait_for(worker.stdout.readline(), 30)
            _, cpu, committed, members = line.split()
            consumer_cpu += float(cpu)
            groups += int(committed)
            grouped += int(members)
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
            "producer_ms": producer_cpu * 1000 / messages,
            "consumer_ms": consumer_cpu * 1000 / messages,
            "rabbitmq_ms": servers["rabbitmq"] * 1000 / messages,
            "postgresql_ms": servers["postgresql"] * 1000 / messages,
            "group": grouped / groups if groups else 1.0,
        }
    finally:
        await bus.stop()
        for worker in workers:
            if worker.pid not in stopped:
                worker.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.wait(), 30)
        await engine.dispose()
        await delete_rabbit_namespace(RABBITMQ, exchange, ["bench"])
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--per-transaction", type=int, default=50)
    parser.add_argument("--consumers", type=int, default=1, help="Consumer processes.")
    parser.add_argument("--prefetch", type=int, default=256, help="Each consumer's prefetch.")
    parser.add_argument("--profile", help="Write cProfile stats of every process to this folder.")
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default=eventloop.LOOP,
        help="The processes' event loop (default: the services', shared.eventloop.LOOP).",
    )
    parser.add_argument("--consume", nargs=2, metavar=("URL", "EXCHANGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        consuming = consume(*args.consume, prefetch=args.prefetch)
        if args.profile:
            with cProfile.Profile(time.process_time) as profile:
                eventloop.run(consuming, loop=args.loop)
            profile.dump_stats(args.profile)
        else:
            eventloop.run(consuming, loop=args.loop)
        return
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    result = eventloop.run(run(args), loop=args.loop)
    print(
        f"outbox -> RabbitMQ -> inbox -> PostgreSQL, {result['messages']:.0f} messages,"
        f" {args.consumers} consumer process(es):"
        f" {result['throughput']:,.0f} msg/s end to end ({result['seconds']:.1f} s),"
        f" outbox writes {result['write_rate']:,.0f} msg/s,"
        f" latency p50 {result['latency_p50_ms']:.0f} ms, p99 {result['latency_p99_ms']:.0f} ms;"
        " every message handled exactly once\n"
        f"CPU per message: producer (outbox writes + relay) {result['producer_ms']:.2f} ms,"
        f" consumers {result['consumer_ms']:.2f} ms, RabbitMQ {result['rabbitmq_ms']:.2f} ms,"
        f" PostgreSQL {result['postgresql_ms']:.2f} ms;"
        f" {result['group']:.1f} handlers a commit;"
        f" load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
