"""How long a full reconcile pass of the pool service takes against the fake cloud, per pool size.

A pass is what the loop runs every 30 s: describe the pool in EC2, load the node table, `plan()`,
apply (book-keeping transaction with its events, EC2 calls, launch intents and outcomes). The
issue's target is a steady pass over 10,000 nodes in under 1 s. The other rows show the passes that
do the most work: the cold start (every launch intent written, then RunInstances for each), the
first boot (every new node stopped), provisioning (every node announced) and the pass right after
ImageReady (every node marked retiring and announced, and the surge launched).
Run: `.venv/bin/python tests/benchmarks/bench_pool_reconcile.py [--sizes 64 1000 10000]`
(add `--postgres postgresql+asyncpg://...` to run the store on PostgreSQL instead of SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sqlalchemy import text

from deploy.migrations import upgrade
from services.pool.service import Pool, assemble
from services.pool.settings import PoolSettings
from services.pool.spec import PoolSpec, Subnet
from services.pool.tables import pools
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.cloud.fake import FakeCloud
from shared.service import Runtime
from shared.settings import Settings
from shared.store import create_engine

START = datetime(2026, 3, 2, tzinfo=UTC)
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")


def spec(size: int, image_id: str) -> PoolSpec:
    return PoolSpec(
        name="bench",
        size=size,
        instance_types=("c7i.8xlarge", "c6i.8xlarge"),
        subnets=tuple(Subnet(subnet_id=f"subnet-{z[-1]}", zone=z) for z in ZONES),
        image_id=image_id,
        max_surge_percent=10,
    )


async def timed(pool: Pool, clock: ManualClock) -> tuple[float, float]:
    """One pass, 30 s of clock later: wall and CPU seconds."""
    clock.advance(30)
    wall, cpu = time.perf_counter(), time.process_time()
    await pool.reconciler.reconcile()
    return time.perf_counter() - wall, time.process_time() - cpu


async def bench(size: int, url: str, repeats: int) -> list[tuple[str, int, float, float]]:
    engine = create_engine(url)
    if engine.dialect.name == "postgresql":
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    await upgrade(engine, "0002_pool")
    clock = ManualClock(START)
    cloud = FakeCloud(clock=clock)
    runtime = Runtime(Settings(), engine, MemoryBus(), clock)
    pool = assemble(runtime, PoolSettings(launch_concurrency=32), cloud)
    async with engine.begin() as conn:
        await conn.execute(
            pools.insert().values(
                name="bench",
                spec=spec(size, "ami-1").model_dump(mode="json"),
                created_at=START,
                updated_at=START,
            )
        )
    rows: list[tuple[str, int, float, float]] = []
    for name in ("cold start", "first boot", "provision"):
        wall, cpu = await timed(pool, clock)
        rows.append((name, 1, wall, cpu))
    steady = [await timed(pool, clock) for _ in range(repeats)]
    rows.append(
        (
            "steady",
            repeats,
            statistics.median(w for w, _ in steady),
            statistics.median(c for _, c in steady),
        )
    )
    async with engine.begin() as conn:
        await conn.execute(pools.update().values(spec=spec(size, "ami-2").model_dump(mode="json")))
    wall, cpu = await timed(pool, clock)
    rows.append(("image ready", 1, wall, cpu))
    await pool.service.stop()
    await engine.dispose()
    clock.advance(timedelta(days=1).total_seconds())
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=5, help="steady passes measured")
    parser.add_argument("--postgres", help="a PostgreSQL URL to use (its schema is wiped)")
    args = parser.parse_args()
    store = "PostgreSQL" if args.postgres else "SQLite"
    load = os.getloadavg()[0]
    print(
        f"pool reconcile pass on FakeCloud + {store}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load {load:.1f}"
    )
    print("{:>7}  {:<12} {:>6} {:>9} {:>9}".format("nodes", "pass", "runs", "wall ms", "cpu ms"))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            url = args.postgres or f"sqlite+aiosqlite:///{tmp}/bench-{size}.db"
            for name, runs, wall, cpu in await bench(size, url, args.repeats):
                print(f"{size:>7}  {name:<12} {runs:>6} {wall * 1000:>9.1f} {cpu * 1000:>9.1f}")


if __name__ == "__main__":
    asyncio.run(main())
