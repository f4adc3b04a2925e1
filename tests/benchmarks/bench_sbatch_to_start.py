"""How fast a waiting job reaches EC2: `sbatch` -> StartInstances, in the distributed deployment.

Every service runs as its own process (API and worker) over RabbitMQ and PostgreSQL, AWS is a moto
server over HTTP that notes when each StartInstances arrives (before moto handles it), auth vends
the credentials after its AD FS sign-ins, and a real slurmctld holds the queue. Two paths:

* polling (hpcfleet decides): `sbatch`, then autogrow's next read of the queue (every
  `--poll-interval`) sees the job, decides, and its PowerOn crosses the outbox, RabbitMQ and the
  pool to StartInstances. Measured from just before `sbatch` runs; each job is submitted at a
  random moment of the poll cycle, so the figures cover its whole range.
* hook (Slurm decides): Slurm allocates the job to a powered-down CLOUD node and runs its
  ResumeProgram, the production hook (`python -m services.autogrow.slurm_hooks resume`, token from
  auth as the ``slurm`` client), which posts to autogrow, whose PowerOn goes the same way.
  Measured from the moment the ResumeProgram started (its wrapper stamps it first thing).
  With `--paths route` the hook route is called directly with a token this script gets (the
  measure used before the hook had its token).

No node boots (the jobs wait forever), so every job costs one stopped node: the pool has one per
job. Run: `.venv/bin/python tests/benchmarks/bench_sbatch_to_start.py [--jobs 50]`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from distributed_kit import Deployment, Plan, deployed

import services.registry  # noqa: F401  (every table joins the metadata)
from deploy.migrations import upgrade
from services.autogrow.tables import MAILBOX, decisions
from shared.cloud.moto_server import MotoServer
from shared.store import create_engine
from shared.testing.slurm_cluster import SlurmCluster

PG_ADMIN = "postgresql://root@127.0.0.1:5432/postgres"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
CPUS = 4
WARM_UP = 2
"""Jobs run first and not counted: the first hook fetches its token, the first calls open
connections; both happen once an hour or once a process, not per job."""


@asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh, migrated PostgreSQL database of its own; dropped at the end."""
    name = f"hpcfleet_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"postgresql+asyncpg://root@127.0.0.1:5432/{name}"
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    try:
        yield url
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def until(check: Callable[[], Any], *, within: float, what: str, every: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {within} s")
        await asyncio.sleep(every)


async def pool_ready(deployment: Deployment, size: int) -> None:
    async with deployment.client("pool") as pool:

        async def filled() -> bool:
            view = (await pool.get("/pool/pools/default")).json()
            return bool(view["spec"]["image_id"]) and view["by_state"] == {"stopped": size}

        async with deployment.client("bakery") as bakery:
            answer = await bakery.post("/bakery/builds", json={"recipe": "linux"})
            answer.raise_for_status()
        await until(filled, within=300, what="pool filled", every=0.5)


async def autogrow_reads_the_queue(deployment: Deployment) -> None:
    async with deployment.client("autogrow") as autogrow:

        async def read() -> bool:
            return (await autogrow.get("/autogrow/queue")).status_code == 200

        await until(read, within=60, what="autogrow's first read of Slurm", every=0.2)


def new_start(moto: MotoServer, seen: int) -> Callable[[], Any]:
    def check() -> Any:
        starts = moto.recorded("StartInstances")
        return starts[seen] if len(starts) > seen else None

    return check


def new_resume(cluster: SlurmCluster, seen: int) -> Callable[[], Any]:
    def check() -> Any:
        found = [c for c in cluster.power_calls() if c.action == "resume"]
        return found[seen] if len(found) > seen else None

    return check


Sample = tuple[float, float]
"""(when the path began, when StartInstances arrived), epoch seconds."""


async def polling_path(
    deployment: Deployment, cluster: SlurmCluster, moto: MotoServer, jobs: int, poll: float
) -> list[Sample]:
    """sbatch -> StartInstances, with autogrow polling Slurm."""
    latencies = []
    for i in range(WARM_UP + jobs):
        await asyncio.sleep(random.uniform(0.2, 0.2 + poll))  # a random phase of the poll cycle
        seen = len(moto.recorded("StartInstances"))
        submitted = time.time()
        await asyncio.to_thread(cluster.sbatch, "sleep 3600", "--exclusive", nodes=1)
        start = await until(
            new_start(moto, seen), within=poll + 20, what="StartInstances", every=0.01
        )
        assert len(start.values("InstanceId")) == 1, start
        if i >= WARM_UP:
            latencies.append((submitted, start.at))
    return latencies


async def hook_path(
    deployment: Deployment, cluster: SlurmCluster, moto: MotoServer, jobs: int
) -> list[Sample]:
    """Slurm's ResumeProgram starting -> StartInstances, with Slurm deciding."""
    latencies = []
    for i in range(WARM_UP + jobs):
        await asyncio.sleep(random.uniform(0.0, 0.5))
        seen = len(moto.recorded("StartInstances"))
        calls = len([c for c in cluster.power_calls() if c.action == "resume"])
        await asyncio.to_thread(cluster.sbatch, "sleep 3600", "--exclusive", nodes=1)

        call = await until(
            new_resume(cluster, calls), within=30, what="Slurm's ResumeProgram", every=0.01
        )
        start = await until(new_start(moto, seen), within=20, what="StartInstances", every=0.01)
        if i >= WARM_UP:
            latencies.append((call.at, start.at))
    return latencies


async def route_path(deployment: Deployment, moto: MotoServer, jobs: int) -> list[Sample]:
    """POST /autogrow/hooks/resume with a token this script got -> StartInstances."""
    token = await deployment.sign_in()
    async with deployment.client("autogrow", token) as autogrow:
        nodes = (await autogrow.get("/autogrow/nodes")).json()
        stopped = sorted(n["scheduler_node_name"] for n in nodes if n["power_state"] == "stopped")
        latencies = []
        for i, name in enumerate(stopped[: WARM_UP + jobs]):
            await asyncio.sleep(random.uniform(0.0, 0.5))
            seen = len(moto.recorded("StartInstances"))
            called = time.time()
            answer = await autogrow.post("/autogrow/hooks/resume", json={"nodes": [name]})
            answer.raise_for_status()
            start = await until(new_start(moto, seen), within=20, what="StartInstances", every=0.01)
            if i >= WARM_UP:
                latencies.append((called, start.at))
    return latencies


STAGES = (
    "-> read or called",
    "-> PowerOn in outbox",
    "-> published",
    "-> EC2",
)
"""The stages a sample is split into (seconds each, in `breakdown`): until autogrow's read of the
queue that saw the job began (polling; the wait for the poll) or its hook route began deciding
(hook: the hook program, auth and the route's start); then until the PowerOn was committed to
autogrow's outbox (the read and the decision; the hook's decision); then until the relay
published it to RabbitMQ; then until StartInstances reached EC2 (the bus and the pool)."""


async def breakdown(url: str, samples: list[Sample]) -> list[tuple[float, ...]]:
    """Each sample split at the `STAGES`, seconds."""
    engine = create_engine(url)
    outbox = MAILBOX.outbox
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        outbox.c.created_at,
                        outbox.c.published_at,
                        decisions.c.decided_at,
                        decisions.c.inputs,
                    )
                    .join(decisions, decisions.c.decision_id == outbox.c.correlation_id)
                    .where(outbox.c.name == "PowerOn")
                    .order_by(outbox.c.id)
                )
            ).all()
    finally:
        await engine.dispose()
    rows = rows[len(rows) - len(samples) :]  # the measured ones come last, one per sample
    split = []
    for (began, started), row in zip(samples, rows, strict=True):
        taken = row.inputs.get("snapshot_taken_at")  # a policy decision: the read it was made on
        read = datetime.fromisoformat(taken).timestamp() if taken else row.decided_at.timestamp()
        created, published = row.created_at.timestamp(), row.published_at.timestamp()
        split.append((read - began, created - read, published - created, started - published))
    return split


async def measure(
    path: str, jobs: int, poll: float, pool_interval: float, workdir: Path
) -> tuple[list[Sample], list[tuple[float, ...]], dict[str, float]]:
    size = jobs + WARM_UP
    hooked = path == "hook"
    plan = Plan.make(workdir)
    cluster = SlurmCluster(
        size,
        cpus_per_node=CPUS,
        power_saving=hooked,
        resume_command=plan.hook("resume") if hooked else None,
        resume_timeout=3600,
        suspend_time=86400,
    )
    env = {
        "HPCFLEET_AUTOGROW_SCHEDULER": "slurm",
        "HPCFLEET_AUTOGROW_MODE": "slurm-decides" if hooked else "hpcfleet-decides",
        "HPCFLEET_AUTOGROW_POLL_INTERVAL": str(poll),
        "HPCFLEET_AUTOGROW_POLICY__CORES_PER_NODE": str(CPUS),
        "HPCFLEET_AUTOGROW_POLICY__BOOT_TIMEOUT_SECONDS": "3600",
        "HPCFLEET_AUTOGROW_COMMAND_TIMEOUT_SECONDS": "600",
        "HPCFLEET_LOG_LEVEL": "WARNING",
        # production's period: a pass holds the pool's lock, which a PowerOn waits for
        "HPCFLEET_POOL_RECONCILE_INTERVAL": str(pool_interval),
    }
    with MotoServer(record=("StartInstances",)) as moto, cluster:
        moto.reset()
        env["HPCFLEET_AUTOGROW_SLURM_CONF"] = str(cluster.conf)
        async with (
            database() as url,
            deployed(
                workdir,
                database_url=url,
                rabbitmq_url=RABBITMQ,
                exchange=f"hpcfleet-bench-{uuid.uuid4().hex[:8]}",
                moto=moto,
                env=env,
                pool={"size": size, "max_surge_percent": 10},
                plan=plan,
            ) as deployment,
        ):
            began = time.monotonic()
            await pool_ready(deployment, size)
            await autogrow_reads_the_queue(deployment)
            setup = dict(deployment.timings, **{"pool filled": time.monotonic() - began})
            if path == "polling":
                samples = await polling_path(deployment, cluster, moto, jobs, poll)
            elif path == "hook":
                samples = await hook_path(deployment, cluster, moto, jobs)
            else:
                samples = await route_path(deployment, moto, jobs)
            stages = await breakdown(url, samples)
    return samples, stages, setup


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: p99 of 50 values is the largest, so nothing is interpolated."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50, help="measured jobs per path")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="autogrow's, seconds")
    parser.add_argument(
        "--pool-interval", type=float, default=30.0, help="pool's reconcile period, seconds"
    )
    parser.add_argument("--paths", default="polling,hook", help="polling, hook, route")
    args = parser.parse_args()
    rows = []
    for path in args.paths.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-{path}-") as folder:
            samples, stages, setup = asyncio.run(
                measure(path, args.jobs, args.poll_interval, args.pool_interval, Path(folder))
            )
        ms = [1000 * (started - began) for began, started in samples]
        target = 250 + (1000 * args.poll_interval if path == "polling" else 0)
        p99 = percentile(ms, 0.99)
        rows.append((path, len(ms), statistics.median(ms), p99, min(ms), max(ms), target))
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(
            f"{path}: setup "
            + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items())
            + f"; load average after {load} (2 cores)"
        )
        print(f"  latencies (ms): {', '.join(f'{v:.0f}' for v in ms)}")
        for index, name in enumerate(STAGES):
            part = [1000 * stage[index] for stage in stages]
            print(
                f"  {name:22} median {statistics.median(part):6.0f} ms, "
                f"p99 {percentile(part, 0.99):6.0f} ms"
            )
    print(
        f"\nautogrow poll interval {args.poll_interval} s, pool reconcile interval "
        f"{args.pool_interval} s"
    )
    print(f"{'path':8} {'N':>4} {'median ms':>10} {'p99 ms':>8} {'min':>6} {'max':>6} target")
    for path, n, median, p99, low, high, target in rows:
        verdict = "met" if p99 < target else "MISSED"
        print(
            f"{path:8} {n:>4} {median:>10.0f} {p99:>8.0f} {low:>6.0f} {high:>6.0f} "
            f"< {target:.0f} ms p99: {verdict}"
        )


if __name__ == "__main__":
    main()
