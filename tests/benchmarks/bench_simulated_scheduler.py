"""How fast the simulated scheduler replays the bundled traces (EASY backfilling, all nodes up).

Two ways to drive it: event-driven (`next_event_at`, as the trace simulator will) and stepped with
a full snapshot every 60 s of trace time (as the autogrow service polls). Prints a table; asserts
nothing about wall time.

    .venv/bin/python tests/benchmarks/bench_simulated_scheduler.py
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta

from rich.console import Console
from rich.table import Table

from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.swf import SwfJob, bundled_trace, open_swf
from shared.clock import ManualClock

TRACES = (
    "SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz",
    "SDSC-SP2-1998-4.2-cln.swf.gz",
    "CTC-SP2-1996-3.1-cln.swf.gz",
)
STEP_SECONDS = 60


def load(name: str) -> tuple[list[SwfJob], int, int, float]:
    started = time.perf_counter()
    with open_swf(bundled_trace(name)) as reader:
        jobs = list(reader)
    header = reader.header
    assert header.max_nodes and header.max_procs, f"{name}: no MaxNodes/MaxProcs"
    return (
        jobs,
        header.max_nodes,
        header.max_procs // header.max_nodes,
        time.perf_counter() - started,
    )


def build(jobs: list[SwfJob], nodes: int, cores: int) -> tuple[SimulatedScheduler, ManualClock]:
    clock = ManualClock()
    origin = clock.now() - timedelta(seconds=jobs[0].submit)  # the first job arrives now
    names = [f"node{i:04d}" for i in range(nodes)]
    sched = SimulatedScheduler(jobs, clock, nodes=names, cores_per_node=cores, origin=origin)
    for name in names:
        sched.node_up(name)
    return sched, clock


def event_driven(sched: SimulatedScheduler, clock: ManualClock) -> None:
    while (upcoming := sched.next_event_at()) is not None:
        clock.set(upcoming)
        sched.advance_to(upcoming)


def stepped(sched: SimulatedScheduler, clock: ManualClock) -> None:
    while not sched.done:
        clock.advance(STEP_SECONDS)
        sched.take_snapshot()


def main() -> None:
    table = Table(title="SimulatedScheduler replay (EASY backfilling, every node up)")
    for column in (
        "trace",
        "jobs",
        "nodes",
        "parse s",
        "mode",
        "replay s",
        "jobs/s",
        "mean wait h",
    ):
        table.add_column(column, justify="left" if column in ("trace", "mode") else "right")
    for name in TRACES:
        jobs, nodes, cores, parse_seconds = load(name)
        modes = [("event-driven", event_driven)]
        if len(jobs) <= 2000:
            modes.append((f"snapshot every {STEP_SECONDS} s", stepped))
        for mode, drive in modes:
            sched, clock = build(jobs, nodes, cores)
            started = time.perf_counter()
            drive(sched, clock)
            seconds = time.perf_counter() - started
            assert sched.done and not sched.rejected
            wait = statistics.fmean(j.start - j.submit for j in sched.jobs if j.start is not None)
            table.add_row(
                name.removesuffix(".swf.gz"),
                f"{len(jobs):,}",
                str(nodes),
                f"{parse_seconds:.2f}",
                mode,
                f"{seconds:.2f}",
                f"{len(jobs) / seconds:,.0f}",
                f"{wait / 3600:.2f}",
            )
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
