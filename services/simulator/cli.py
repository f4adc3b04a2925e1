"""`hpcfleet simulate`: replay a workload trace under each power policy and compare cost and wait.

A composition root (it joins autogrow's scheduler and policy with the pool's planner), so it is
the only simulator module that parses options, prints and exits. Several policies replay in
parallel processes; each worker writes its own files and sends back only its summary and a
binned curve, so memory stays at one trace per process.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.autogrow.swf import (
    BUNDLED_TRACES,
    SkipCounts,
    SwfFormatError,
    SwfHeader,
    SwfJob,
    bundled_trace,
    open_swf,
)
from services.simulator.engine import SimConfig, fitting, origin_of, run
from services.simulator.policies import POLICIES
from services.simulator.report import (
    curve,
    plot_compare,
    summarize,
    verify,
    write_policy_files,
    write_summary,
)
from shared.events import BillingModel

DAY = 86400

_progress_queue: Any = None  # a worker's channel to the parent's progress bar


@dataclass(frozen=True, slots=True)
class _Task:
    """One policy's replay, as sent to a worker process."""

    policy: str
    jobs: list[SwfJob]
    config: SimConfig
    origin_unix: int | None
    skipped: dict[str, int]
    out: Path | None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def _replay(task: _Task) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Replay, check and write one policy; returns its summary, problems and plot curves."""
    queue = _progress_queue

    def report(fraction: float) -> None:
        if queue is not None:
            queue.put((task.policy, fraction))

    result = run(
        task.jobs,
        task.config,
        POLICIES[task.policy](),
        origin=origin_of(task.origin_unix),
        skipped=task.skipped,
        progress=report,
    )
    problems = verify(result)
    if task.out is not None:
        write_policy_files(result, task.out / task.policy)
    curves = {"powered": curve(result)}
    if task.policy == "always-on":
        curves["busy"] = curve(result, busy=True)
    return summarize(result), problems, curves


def _fail(console: Console, message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]hpcfleet simulate:[/] {message}")
    return typer.Exit(code)


def _read_trace(console: Console, trace: str) -> tuple[list[SwfJob], SwfHeader, SkipCounts]:
    source: Any = Path(trace)
    if not source.exists():
        if trace not in BUNDLED_TRACES:
            raise _fail(console, f"{trace}: no such file (bundled: {', '.join(BUNDLED_TRACES)})", 2)
        source = bundled_trace(trace)
    try:
        with open_swf(source) as reader:
            jobs = list(reader)
    except (OSError, SwfFormatError) as exc:
        raise _fail(console, f"cannot read {trace}: {exc}", 1) from None
    return jobs, reader.header, reader.skipped


def _nothing_to_simulate(
    console: Console, skipped: SkipCounts, skips: dict[str, int]
) -> typer.Exit:
    reasons = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skips.items() if v)
    only_malformed = skipped.malformed and skipped.total == skipped.malformed
    hint = " (is it an SWF file?)" if only_malformed else ""
    first = f"; first problems: {'; '.join(skipped.problems[:3])}" if skipped.problems else ""
    message = f"no job to simulate{hint}: {reasons or 'the trace is empty'}{first}"
    return _fail(console, message, 1)


def _skips(skipped: SkipCounts, too_large: int, outside: int) -> dict[str, int]:
    return {
        "cancelled_without_run_time": skipped.cancelled,
        "no_run_time": skipped.no_run_time,
        "no_processor_count": skipped.no_size,
        "no_submit_time": skipped.no_submit,
        "malformed_lines": skipped.malformed,
        "larger_than_pool": too_large,
        "after_limit_days": outside,
    }


def simulate(
    trace: str = typer.Argument(
        ...,
        help="An SWF trace of the Parallel Workloads Archive (plain or .gz), or a bundled "
        "trace's name.",
    ),
    nodes: int | None = typer.Option(
        None, "--nodes", min=1, help="Pool size. Default: the trace's MaxNodes."
    ),
    cores_per_node: int | None = typer.Option(
        None, "--cores-per-node", min=1, help="Default: the trace's MaxProcs / MaxNodes."
    ),
    billing: BillingModel = typer.Option(
        BillingModel.PER_SECOND, "--billing", help="per-second (60 s minimum a start) or hourly."
    ),
    boot_seconds: float = typer.Option(
        60.0, "--boot-seconds", min=0, help="Billed time from a start until the node takes jobs."
    ),
    launch_seconds: float = typer.Option(
        600.0,
        "--launch-seconds",
        min=0,
        help="A cold launch from the image, for a policy with no warm pool (asg-5min).",
    ),
    policy: str = typer.Option("all", "--policy", help=f"One of {', '.join(POLICIES)}, or all."),
    limit_days: float | None = typer.Option(
        None, "--limit-days", min=0, help="Only jobs submitted in the trace's first N days."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write summary.json and per-policy CSVs and plots here."
    ),
    compare: bool = typer.Option(
        False, "--compare", help="Every policy, one table, and compare.png (in --out, or .)."
    ),
    reconcile_seconds: float = typer.Option(
        60.0,
        "--reconcile-seconds",
        min=1,
        help="The policies' loop interval for changes that need no immediate answer.",
    ),
    processes: int = typer.Option(2, "--processes", min=1, help="Policies replayed at once."),
) -> None:
    """Replay a workload trace under each power policy: cost, waiting and node starts."""
    console = Console(width=None if sys.stdout.isatty() else 150)  # a log keeps the full table
    if policy != "all" and policy not in POLICIES:
        raise _fail(console, f"unknown policy {policy!r}: choose {', '.join(POLICIES)} or all", 2)
    names = list(POLICIES) if compare or policy == "all" else [policy]
    jobs, header, skipped = _read_trace(console, trace)
    if not jobs:
        raise _nothing_to_simulate(console, skipped, _skips(skipped, 0, 0))
    if nodes is None:
        if header.max_nodes is None or header.max_nodes < 1:
            raise _fail(console, "the trace's header has no MaxNodes: give --nodes", 2)
        nodes = header.max_nodes
    if cores_per_node is None:
        max_nodes, max_procs = header.max_nodes, header.max_procs
        cores_per_node = max(1, max_procs // max_nodes) if max_nodes and max_procs else 1
    outside = 0
    if limit_days is not None:
        first = min(j.submit for j in jobs)
        kept = [j for j in jobs if j.submit < first + limit_days * DAY]
        outside, jobs = len(jobs) - len(kept), kept
    jobs, too_large = fitting(jobs, nodes, cores_per_node)
    skips = _skips(skipped, too_large, outside)
    if not jobs:
        raise _nothing_to_simulate(console, skipped, skips)
    config = SimConfig(
        nodes=nodes,
        cores_per_node=cores_per_node,
        billing=billing,
        boot_seconds=boot_seconds,
        launch_seconds=launch_seconds,
        reconcile_seconds=reconcile_seconds,
    )
    if compare and out is None:
        out = Path(".")
    inputs = {
        "trace": trace,
        "computer": header.computer,
        "jobs": len(jobs),
        "nodes": nodes,
        "cores_per_node": cores_per_node,
        "billing": billing.value,
        "boot_seconds": boot_seconds,
        "launch_seconds": launch_seconds,
        "reconcile_seconds": reconcile_seconds,
        "limit_days": limit_days,
        "skipped": skips,
    }
    console.print(
        f"{trace}: {len(jobs):,} jobs on {nodes} nodes x {cores_per_node} cores, "
        f"{billing.value} billing; skipped {sum(skips.values()):,} "
        + str({k: v for k, v in skips.items() if v})
    )
    tasks = [_Task(name, jobs, config, header.unix_start_time, skips, out) for name in names]
    results = _run_all(console, tasks, processes)
    summaries = [results[name][0] for name in names]
    _print_table(console, summaries)
    failed = False
    for name in names:
        for problem in results[name][1][:5]:
            console.print(f"[bold red]{name}: check failed:[/] {problem}")
            failed = True
    if out is not None:
        write_summary(out / "summary.json", inputs, summaries)
        console.print(f"wrote {out / 'summary.json'} and per-policy files under {out}/")
    if compare and out is not None:
        curves = {name: results[name][2]["powered"] for name in names}
        if "always-on" in results:
            curves["busy (lower bound)"] = results["always-on"][2]["busy"]
        title = f"{header.computer or trace}: {nodes} nodes, {billing.value} billing"
        plot_compare(out / "compare.png", summaries, curves, title)
        console.print(f"wrote {out / 'compare.png'}")
    if failed:
        raise typer.Exit(1)


def _run_all(
    console: Console, tasks: list[_Task], processes: int
) -> dict[str, tuple[dict[str, Any], list[str], dict[str, Any]]]:
    """Replay every task with a progress bar per policy; in worker processes when several."""
    columns = (
        TextColumn("{task.description:>14}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bars = {t.policy: progress.add_task(t.policy, total=1.0) for t in tasks}
        if processes == 1 or len(tasks) == 1:
            return {t.policy: _replay_here(t, progress, bars[t.policy]) for t in tasks}
        context = multiprocessing.get_context("spawn")  # no forking under rich's refresh thread
        queue = context.Queue()
        with ProcessPoolExecutor(
            max_workers=min(processes, len(tasks)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(queue,),
        ) as pool:
            futures: dict[str, Future[tuple[dict[str, Any], list[str], dict[str, Any]]]] = {
                t.policy: pool.submit(_replay, t) for t in tasks
            }
            while not all(f.done() for f in futures.values()):
                try:
                    name, fraction = queue.get(timeout=0.2)
                    progress.update(bars[name], completed=fraction)
                except Empty:
                    continue
            return {name: future.result() for name, future in futures.items()}


def _replay_here(
    task: _Task, progress: Progress, bar: TaskID
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    started = time.perf_counter()
    result = _replay(task)
    progress.update(
        bar, completed=1.0, description=f"{task.policy} {time.perf_counter() - started:.0f}s"
    )
    return result


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:,.1f}"


def _print_table(console: Console, summaries: list[dict[str, Any]]) -> None:
    table = Table(title="cost and waiting per policy (node-hours; waits in minutes)")
    for column in (
        "policy",
        "billed node-h",
        "cost / lower bound",
        "mean wait",
        "median wait",
        "p95 wait",
        "bounded slowdown",
        "node starts",
        "jobs run",
        "not run",
        "replay s",
    ):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for s in summaries:
        ratio = s["cost_over_lower_bound"]
        table.add_row(
            s["policy"],
            f"{s['billed_node_hours']:,.0f}",
            "-" if ratio is None else f"{ratio:.4f}",
            _minutes(s["mean_wait_s"]),
            _minutes(s["median_wait_s"]),
            _minutes(s["p95_wait_s"]),
            "-" if s["mean_bounded_slowdown"] is None else f"{s['mean_bounded_slowdown']:.2f}",
            f"{s['node_starts']:,}",
            f"{s['jobs_run']:,}",
            str(s["jobs_not_run"]),
            f"{s['replay_seconds']:.1f}",
        )
    if summaries:
        console.print(f"lower bound: {summaries[0]['lower_bound_node_hours']:,.0f} node-hours")
    console.print(table)
