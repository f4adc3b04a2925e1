"""How long the pool's `plan()` takes, per pool size and situation (median and p99, in ms).

`plan()` is what every reconcile tick (30 s) runs, so its cost bounds how large a pool one worker
can hold; the issue's target is 10,000 nodes in under 50 ms. Situations: a steady pool in sync
with EC2, the tick right after ImageReady (every node old: marks plus a surge of launches), the
middle of a rollout (half replaced, replacements warming), and a cold start (every node launched).
Run: `.venv/bin/python tests/benchmarks/bench_pool_plan.py [--sizes 64 1000 10000]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from services.pool.plan import (
    NodeRecord,
    NodeState,
    ObservedInstance,
    client_token,
    plan,
)
from services.pool.spec import NODE_TAG, POOL_TAG, PoolSpec, Subnet

NOW = datetime(2026, 3, 1, tzinfo=UTC)
ZONES = ("eu-west-1a", "eu-west-1b", "eu-west-1c")
Scenario = tuple[PoolSpec, list[NodeRecord], list[ObservedInstance]]


def spec(size: int, image_id: str = "ami-new") -> PoolSpec:
    return PoolSpec(
        name="bench",
        size=size,
        instance_types=("c7i.8xlarge", "c6i.8xlarge"),
        subnets=tuple(Subnet(subnet_id=f"subnet-{z[-1]}", zone=z) for z in ZONES),
        image_id=image_id,
        max_node_age=timedelta(days=30),
    )


def node(i: int, image_id: str, state: NodeState, provisioned: bool = True) -> NodeRecord:
    zone = ZONES[i % len(ZONES)]
    launched = NOW - timedelta(hours=1 + i % 500)
    return NodeRecord(
        node_id=f"bench-{i:06d}",
        client_token=client_token(f"bench-{i:06d}"),
        image_id=image_id,
        instance_type="c7i.8xlarge",
        subnet_id=f"subnet-{zone[-1]}",
        zone=zone,
        state=state,
        since=launched,
        instance_id=f"i-{i:017x}",
        launched_at=launched,
        provisioned=provisioned,
    )


def shown(row: NodeRecord, booted: bool = True) -> ObservedInstance:
    return ObservedInstance(
        instance_id=row.instance_id or "",
        state=row.state,
        image_id=row.image_id,
        instance_type=row.instance_type,
        zone=row.zone,
        launch_time=row.launched_at or row.since,
        booted=booted,
        tags={POOL_TAG: "bench", NODE_TAG: row.node_id},
        client_token=row.client_token,
        subnet_id=row.subnet_id,
    )


def steady(size: int) -> Scenario:
    rows = [
        node(i, "ami-new", NodeState.RUNNING if i % 5 == 0 else NodeState.STOPPED)
        for i in range(size)
    ]
    return spec(size), rows, [shown(r) for r in rows]


def image_ready(size: int) -> Scenario:
    _, rows, instances = steady(size)
    rows = [replace(r, image_id="ami-old") for r in rows]
    return spec(size), rows, [replace(o, image_id="ami-old") for o in instances]


def mid_rollout(size: int) -> Scenario:
    half = size // 2
    rows = [node(i, "ami-new", NodeState.STOPPED) for i in range(half)]
    rows += [node(i, "ami-old", NodeState.STOPPED) for i in range(half, size)]
    warming = [
        node(size + i, "ami-new", NodeState.RUNNING, provisioned=False) for i in range(size // 10)
    ]
    return (
        spec(size),
        rows + warming,
        [shown(r) for r in rows] + [shown(r, booted=False) for r in warming],
    )


def cold_start(size: int) -> Scenario:
    return spec(size), [], []


SCENARIOS: dict[str, Callable[[int], Scenario]] = {
    "steady": steady,
    "image ready": image_ready,
    "mid rollout": mid_rollout,
    "cold start": cold_start,
}


def measure(scenario: Scenario, repeats: int) -> tuple[int, float, float, float]:
    """Actions planned, then wall-clock median and p99 and CPU-time median, in ms."""
    pool_spec, rows, instances = scenario
    actions = len(plan(pool_spec, rows, instances, NOW).actions)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        plan(pool_spec, rows, instances, NOW)
        cpu.append((time.process_time() - start_cpu) * 1000)
        wall.append((time.perf_counter() - start) * 1000)
    p99 = statistics.quantiles(wall, n=100)[98]
    return actions, statistics.median(wall), p99, statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1000, 10000])
    args = parser.parse_args()
    # CPU time is printed too because a busy machine inflates wall time, not the work done.
    load = os.getloadavg()[0]
    print(f"plan() on Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load:.1f}")
    header = ("nodes", "situation", "actions", "median ms", "p99 ms", "cpu ms")
    print("{:>7}  {:<12} {:>8} {:>10} {:>8} {:>7}".format(*header))
    for size in args.sizes:
        repeats = max(30, min(2000, 200_000 // max(size, 1)))
        for name, build in SCENARIOS.items():
            actions, median, p99, cpu = measure(build(size), repeats)
            print(f"{size:>7}  {name:<12} {actions:>8} {median:>10.3f} {p99:>8.3f} {cpu:>7.3f}")


if __name__ == "__main__":
    main()
