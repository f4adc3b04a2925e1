"""autogrow's two speed figures (issue 6), printed as a table; never asserted in a test.

1. `decide()` with 100,000 pending jobs and 10,000 nodes (target: under 50 ms), in this process as
   it is: with the whole service stack imported, as in autogrow's worker. A slow call here is a
   full (generation 2) collection of the garbage collector falling inside it: such a collection
   walks every tracked object of the process (about 200,000 here, most of them the imported
   libraries', which never die), and the thousands of actions one call returns are what bring the
   next one on. The table says how many fell inside the timed calls and what one cost. A second
   row times the same calls after `gc.freeze()` of everything alive before them: what autogrow's
   worker sees, since `run_worker` freezes its startup objects.
2. From a `QueueDepthChanged` received to `PowerOn` in the outbox, over RabbitMQ and PostgreSQL
   (target: under 100 ms at the 99th percentile). This process runs autogrow's consumer, decision
   loop and relay, as its worker does; each round publishes a queue that needs two more nodes to
   RabbitMQ and times until the transaction holding the decision and its `PowerOn` has committed.
   "received" starts when autogrow's handler gets the message; "published" when this process
   hands it to RabbitMQ (so it adds the broker's round trip).

Run: `.venv/bin/python tests/benchmarks/bench_autogrow.py [--rounds N]` (needs the PostgreSQL and
RabbitMQ servers the integration tests use).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from sqlalchemy import insert, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from tests_support import delete_rabbit_namespace

import services.registry  # noqa: F401
from deploy.migrations import upgrade
from services.autogrow.billing import DEFAULT_RULES
from services.autogrow.cluster import SimulatedCluster
from services.autogrow.policy import PolicySettings, PoolNodeView, decide
from services.autogrow.service import assemble
from services.autogrow.settings import AutogrowSettings
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.tables import nodes
from shared.bus import Envelope
from shared.bus.rabbit import RabbitBus
from shared.clock import SystemClock
from shared.events import BillingModel, Message, PowerOn, PowerState, QueueDepthChanged
from shared.scheduler import NodeActivity, PartitionDemand, QueueSnapshot, SchedulerNode
from shared.service import Runtime
from shared.settings import Settings
from shared.store import create_engine

ADMIN = os.environ.get("HPCFLEET_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ = os.environ.get("HPCFLEET_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REVISION = "head"


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """Median, 99th percentile and maximum, in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000


# ---- 1. decide() at scale ------------------------------------------------------------------------


def big_inputs(
    node_count: int, pending_jobs: int
) -> tuple[QueueSnapshot, list[PoolNodeView], datetime]:
    """A pool of which 30% is busy, 10% idle (some drained by autogrow), the rest stopped; a
    queue of `pending_jobs` jobs over four partitions, asking for more nodes than are stopped."""
    rng = random.Random(6)
    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    views: list[PoolNodeView] = []
    seen: list[SchedulerNode] = []
    for i in range(node_count):
        name = f"node{i:05d}"
        roll = rng.random()
        billing = BillingModel.HOURLY if i % 5 == 0 else BillingModel.PER_SECOND
        built = now - timedelta(days=rng.randint(0, 60))
        if roll < 0.6:
            views.append(PoolNodeView(f"n{i}", name, PowerState.STOPPED, now, billing, built))
            seen.append(SchedulerNode(name=name, activity=NodeActivity.DOWN, cpus=32))
            continue
        since = now - timedelta(seconds=rng.randint(60, 20_000))
        drained = roll > 0.97
        views.append(
            PoolNodeView(f"n{i}", name, PowerState.RUNNING, since, billing, built, False, drained)
        )
        if roll < 0.9:
            seen.append(
                SchedulerNode(name=name, activity=NodeActivity.BUSY, cpus=32, cpus_allocated=32)
            )
        else:
            activity = NodeActivity.DRAINING if drained else NodeActivity.IDLE
            idle = now - timedelta(seconds=rng.randint(0, 3_000))
            seen.append(SchedulerNode(name=name, activity=activity, cpus=32, idle_since=idle))
    per = pending_jobs // 4
    partitions = tuple(
        PartitionDemand(
            partition=f"p{k}", pending_jobs=per, pending_cores=per * 4, pending_nodes=per // 8
        )
        for k in range(4)
    )
    snapshot = QueueSnapshot(
        taken_at=now, partitions=partitions, running_jobs=3_000, nodes=tuple(seen)
    )
    return snapshot, views, now


def bench_decide(rounds: int, frozen: bool = False) -> tuple[tuple[float, float, float], str]:
    """Median, p99 and max of `rounds` calls, and what the full collections among them cost."""
    snapshot, views, now = big_inputs(10_000, 100_000)
    policy = PolicySettings(cores_per_node=32, max_running=8_000)
    full: list[float] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                watch.started = time.perf_counter()  # type: ignore[attr-defined]
            else:
                full.append(time.perf_counter() - watch.started)  # type: ignore[attr-defined]

    if frozen:
        gc.collect()
        gc.freeze()
    samples = []
    try:
        for round_ in range(rounds + 3):
            if round_ == 3:
                gc.callbacks.append(watch)
            started = time.perf_counter()
            decide(snapshot, views, DEFAULT_RULES, now, policy)
            if round_ >= 3:  # the first calls warm the caches up
                samples.append(time.perf_counter() - started)
    finally:
        if watch in gc.callbacks:
            gc.callbacks.remove(watch)
        if frozen:
            gc.unfreeze()
    tracked = len(gc.get_objects())
    worst = max(full, default=0.0) * 1000
    note = f"{len(full)} full collections, worst {worst:.0f} ms; {tracked:,} objects tracked"
    return percentiles(samples), note


# ---- 2. QueueDepthChanged -> PowerOn in the outbox ----------------------------------------------


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def bench_latency(rounds: int, pool_size: int) -> tuple[list[float], list[float]]:
    name = f"hpcfleet_bench_{uuid.uuid4().hex[:8]}"
    exchange = f"hpcfleet-bench-{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    engine = create_engine(url)
    bus = RabbitBus(RABBITMQ, exchange=exchange, prefetch=64, delivery_limit=5)
    clock = SystemClock()
    runtime = Runtime(Settings(database_url=url), engine, bus, clock)
    # the decision loop's own tick is long: every decision here comes from a received queue
    settings = AutogrowSettings(scheduler="simulated", poll_interval=600, stale_seconds=3600)
    names = [f"node{i:03d}" for i in range(pool_size)]
    simulated = SimulatedScheduler([], clock, nodes=names, cores_per_node=1)
    autogrow = assemble(runtime, settings, SimulatedCluster(simulated, engine, clock))
    service = autogrow.service
    received: dict[uuid.UUID, float] = {}
    committed = asyncio.Event()
    handle = service.handlers[QueueDepthChanged.name()]

    async def timed(message: Message) -> None:
        received[message.message_id] = time.perf_counter()
        await handle(message)

    async def taken(message: Message) -> None:
        """The pool's part: take the command (RabbitMQ returns what no queue is bound to)."""

    def emitted() -> None:  # the decision's transaction committed with its PowerOn
        committed.set()
        service.relay_loop.kick()

    service.mailbox.on_emit = emitted
    from_publish: list[float] = []
    from_receipt: list[float] = []
    try:
        await upgrade(engine, REVISION)
        now = clock.now()
        async with engine.begin() as conn:
            await conn.execute(
                insert(nodes),
                [
                    {
                        "node_id": f"n{i:03d}",
                        "scheduler_node_name": name,
                        "power_state": PowerState.STOPPED.value,
                        "since": now,
                        "billing": BillingModel.PER_SECOND.value,
                    }
                    for i, name in enumerate(names)
                ],
            )
        await bus.start()
        await bus.subscribe("autogrow", {**service.handlers, QueueDepthChanged.name(): timed})
        await bus.subscribe("pool", {PowerOn.name(): taken})  # PowerOn must reach a queue
        service.start_relay()
        autogrow.decide_loop.start()
        await asyncio.sleep(0.5)
        down = tuple(SchedulerNode(name=n, activity=NodeActivity.DOWN, cpus=1) for n in names)
        for round_ in range(rounds + 10):
            async with engine.begin() as conn:  # every node stopped again, nothing under way
                await conn.execute(update(nodes).values(requested_power=None, requested_at=None))
            demand = PartitionDemand(partition="batch", pending_jobs=2, pending_cores=2)
            snapshot = QueueSnapshot(taken_at=clock.now(), partitions=(demand,), nodes=down)
            message = QueueDepthChanged(occurred_at=clock.now(), snapshot=snapshot)
            committed.clear()
            started = time.perf_counter()
            await bus.publish(Envelope.of(message))
            await asyncio.wait_for(committed.wait(), 10)
            done = time.perf_counter()
            if round_ >= 10:  # the first rounds warm the connections up
                from_publish.append(done - started)
                from_receipt.append(done - received[message.message_id])
        return from_publish, from_receipt
    finally:
        await service.stop()
        await bus.stop()
        await engine.dispose()
        await delete_rabbit_namespace(RABBITMQ, exchange, ["autogrow", "pool"])
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="queue changes to time")
    parser.add_argument("--decide-rounds", type=int, default=200, help="decide() calls to time")
    parser.add_argument("--pool", type=int, default=64, help="nodes in the pool (latency)")
    parser.add_argument(
        "--decide-only", action="store_true", help="only decide(): no RabbitMQ or PostgreSQL"
    )
    args = parser.parse_args()
    notes = []
    rows = []
    for frozen, what in ((False, "as is"), (True, "startup objects frozen")):
        figures, note = bench_decide(args.decide_rounds, frozen)
        rows.append((f"decide(), 100,000 jobs, 10,000 nodes, {what}", *figures))
        notes.append(f"decide() {what}: {note}")
    if args.decide_only:
        _print(rows, notes)
        return
    publish, receipt = asyncio.run(bench_latency(args.rounds, args.pool))
    rows.append(("QueueDepthChanged received -> PowerOn in outbox", *percentiles(receipt)))
    rows.append(("QueueDepthChanged published -> PowerOn in outbox", *percentiles(publish)))
    print(f"autogrow ({args.rounds} queue changes over RabbitMQ and PostgreSQL, {args.pool} nodes)")
    _print(rows, notes)


def _print(rows: list[tuple[str, float, float, float]], notes: list[str]) -> None:
    print(f"{'what':<60} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for what, median, p99, worst in rows:
        print(f"{what:<60} {median:>10.1f} {p99:>8.1f} {worst:>8.1f}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
