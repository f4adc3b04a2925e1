"""What bakery costs: its pure decisions at scale, and a whole build per back-end against moto.

1. `due_slot` (is a build due) across many recipes, and `plan_retention` across many images: both
   run on every pass of their loops, so their cost bounds how many recipes and images one worker
   handles.
2. A whole build (resolve base, builder, steps through SSM, image, validation, publish) with the
   EC2 back-end and with Packer, against an in-process moto server with the tests' script-running
   SSM: bakery's own overhead and the number of AWS calls, not AWS's minutes.

Run: `.venv/bin/python tests/benchmarks/bench_bakery.py [--builds 5]` (about 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bakery")]

import aioboto3  # noqa: E402
from bakery_kit import BakeryMoto, seed_base_image, write_recipe_tree  # noqa: E402

from deploy.migrations import upgrade  # noqa: E402
from services.bakery.aws import BakeryAws  # noqa: E402
from services.bakery.recipes import Retention, load_recipes  # noqa: E402
from services.bakery.retention import ImageRecord, ImageStatus, plan_retention  # noqa: E402
from services.bakery.schedule import DEFAULT_SCHEDULE, due_slot  # noqa: E402
from services.bakery.service import assemble  # noqa: E402
from services.bakery.settings import BakerySettings  # noqa: E402
from services.bakery.tables import BuildStatus, builds  # noqa: E402
from shared.bus.memory import MemoryBus  # noqa: E402
from shared.clock import SystemClock  # noqa: E402
from shared.cloud.moto_server import AwsFidelityMiddleware  # noqa: E402
from shared.service import Runtime  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.store import create_engine  # noqa: E402

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def timed(work: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and max of `repeat` runs, in ms."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def decisions() -> None:
    print("pure decisions                      median ms    max ms")
    for recipes in (10, 100, 1000):
        anchors = [NOW - timedelta(days=n % 40) for n in range(recipes)]
        median, worst = timed(lambda a=anchors: [due_slot(DEFAULT_SCHEDULE, x, NOW) for x in a], 5)
        print(f"due_slot, {recipes:>5} recipes           {median:9.2f} {worst:9.2f}")
    policy = Retention(keep_last=3, deprecate_after_days=30, deregister_after_days=90)
    for count in (100, 1000, 10000):
        images = [
            ImageRecord(
                f"ami-{n:08x}",
                "us-east-1",
                f"v{n}",
                NOW - timedelta(days=n % 400),
                ImageStatus.AVAILABLE,
            )
            for n in range(count)
        ]
        median, worst = timed(lambda i=images: plan_retention(i, policy, NOW, {}), 5)
        print(f"plan_retention, {count:>5} images      {median:9.2f} {worst:9.2f}")


class CallCounter:
    """WSGI wrapper counting the requests that reach the (script-running) moto server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    def __call__(self, environ: Any, start_response: Any) -> Any:
        self.calls += 1
        return self.app(environ, start_response)


async def builds_against_moto(count: int) -> None:
    moto = BakeryMoto()
    counter = CallCounter(moto.agent)
    moto.server.middleware = AwsFidelityMiddleware(counter)
    with moto, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        seed_base_image(moto.endpoint)
        engine = create_engine(f"sqlite+aiosqlite:///{folder / 'bench.db'}")
        await upgrade(engine)
        session = aioboto3.Session(aws_access_key_id="x", aws_secret_access_key="x")
        aws = BakeryAws(session, endpoint_url=moto.endpoint, max_attempts=1)
        runtime = Runtime(Settings(), engine, MemoryBus(), SystemClock())
        print("\nwhole build against moto            median s     max s   AWS calls")
        for backend in ("ec2", "packer"):
            path = write_recipe_tree(folder / backend, backend=backend, smoke_check="echo ok\n")
            settings = BakerySettings(
                recipes=path,
                work_dir=folder / "work",
                packer_communicator="none",
                poll_seconds=0.02,
            )
            bakery = assemble(runtime, settings, load_recipes(path), aws)
            samples, calls = [], []
            for _ in range(count):
                before = counter.calls
                started = time.perf_counter()
                async with bakery.service.mailbox.transaction() as tx:
                    await tx.conn.execute(
                        builds.insert().values(
                            build_id=str(uuid.uuid4()),
                            recipe="linux",
                            reason="bench",
                            status=BuildStatus.QUEUED,
                            requested_at=tx.now,
                            updated_at=tx.now,
                        )
                    )
                await bakery.runner.reconcile()
                await asyncio.gather(*bakery.runner.tasks.values())
                samples.append(time.perf_counter() - started)
                calls.append(counter.calls - before)
            print(
                f"{backend:<6} back-end, {count} builds          "
                f"{statistics.median(samples):9.2f} {max(samples):9.2f} "
                f"{statistics.median(calls):11.0f}"
            )
        await aws.close()
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=5, help="builds per back-end")
    args = parser.parse_args()
    decisions()
    asyncio.run(builds_against_moto(args.builds))


if __name__ == "__main__":
    main()
