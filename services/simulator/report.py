"""What a replay shows: the summary figures, the files anyone can re-check, and the plots.

Per policy, `schedule.csv` (every job: submit, start, end, nodes) and `power.csv` (every powered
interval of every node, with what it was billed) are the raw record: from them alone one can check
that every job ran on powered nodes, that no node ran two jobs at once, that no job started before
it was submitted and that the billed hours follow from the intervals. `verify` does exactly those
checks on the run itself. Times in the files are trace seconds (the SWF's own clock).
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt
import numpy as np

from services.autogrow.billing import billed_seconds
from services.simulator.engine import RunResult

HOUR = 3600.0
DAY = 86400.0
SLOWDOWN_THRESHOLD = 10.0  # seconds: the usual bound that keeps tiny jobs from dominating
EPSILON = 1e-6


def summarize(result: RunResult) -> dict[str, Any]:
    """The figures the issue asks for, per policy (times in seconds, costs in node-hours)."""
    ran = [j for j in result.jobs if j.start is not None]
    waits = sorted(j.start - j.submit for j in ran if j.start is not None)
    lower = sum(j.nodes_needed * j.run_time for j in ran) / HOUR
    billed = result.billed_seconds / HOUR
    slowdowns = [
        max(1.0, (w + j.run_time) / max(j.run_time, SLOWDOWN_THRESHOLD))
        for w, j in zip((j.start - j.submit for j in ran if j.start is not None), ran, strict=True)
    ]
    skipped = dict(result.skipped)
    pool = result.provisioning
    return {
        "policy": result.policy,
        "billed_node_hours": round(billed, 3),
        "lower_bound_node_hours": round(lower, 3),
        "cost_over_lower_bound": round(billed / lower, 5) if lower > 0 else None,
        "mean_wait_s": round(statistics.fmean(waits), 2) if waits else None,
        "median_wait_s": round(statistics.median(waits), 2) if waits else None,
        "p95_wait_s": round(_nearest_rank(waits, 0.95), 2) if waits else None,
        "mean_bounded_slowdown": round(statistics.fmean(slowdowns), 4) if slowdowns else None,
        "node_starts": result.starts,
        "jobs_run": len(ran),
        "jobs_not_run": len(result.jobs) - len(ran),
        "jobs_skipped": sum(skipped.values()),
        "skipped_by_cause": skipped,
        "jobs_interrupted": sum(1 for j in result.jobs if j.interruptions),
        "span_hours": round((result.end - result.start) / HOUR, 3),
        "policy_steps": result.steps,
        "replay_seconds": round(result.wall_seconds, 2),
        "warm_pool": None
        if pool is None
        else {
            "launches": pool.launches,
            "node_hours": round(pool.billed_seconds / HOUR, 3),
            "note": "building the pool once, before the trace; not in billed_node_hours",
        },
    }


def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def verify(result: RunResult) -> list[str]:
    """Check the run as a reader of the CSVs would; an empty list means it holds."""
    problems: list[str] = []
    by_node: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for node, on, ready, off in result.intervals:
        by_node[node].append((on, ready, off))
    for intervals in by_node.values():
        intervals.sort()
    index = {name: i for i, name in enumerate(result.names)}
    jobs_on: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for job in result.jobs:
        if job.start is None or job.end is None:
            continue
        if job.start < job.submit:
            problems.append(f"job {job.job_id} started before it was submitted")
        if abs(job.end - job.start - job.run_time) > EPSILON:
            problems.append(f"job {job.job_id} did not run its recorded run time")
        if len(job.nodes) != job.nodes_needed:
            problems.append(f"job {job.job_id} ran on {len(job.nodes)} of {job.nodes_needed} nodes")
        for name in job.nodes:
            i = index[name]
            jobs_on[i].append((job.start, job.end, job.job_id))
            intervals = by_node[i]
            latest = bisect.bisect_right(intervals, (job.start, math.inf, math.inf)) - 1
            _, ready, off = intervals[latest] if latest >= 0 else (0.0, math.inf, -math.inf)
            if not ready <= job.start or off < job.end:
                problems.append(f"job {job.job_id} ran on {name} while it was not up")
    for i, runs in jobs_on.items():
        runs.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(runs):
            if start < end - EPSILON:
                problems.append(f"{result.names[i]} ran jobs {first} and {second} at once")
    for i, intervals in by_node.items():
        for (_, _, off), (on, _, _) in itertools.pairwise(intervals):
            if on < off:
                problems.append(f"{result.names[i]} was powered on twice at once")
    model, rules = result.config.billing, result.config.rules
    billed = sum(billed_seconds(model, off - on, rules) for _, on, _, off in result.intervals)
    if abs(billed - result.billed_seconds) > 1.0:  # whole seconds, summed in another order
        problems.append(f"billed {result.billed_seconds} s, the intervals give {billed} s")
    return problems


def write_policy_files(result: RunResult, directory: Path) -> None:
    """schedule.csv, power.csv, running.csv and running.png for one policy."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "schedule.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job_id", "submit_s", "start_s", "end_s", "wait_s", "nodes"])
        for job in result.jobs:
            if job.start is None or job.end is None:
                writer.writerow([job.job_id, _n(job.submit), "", "", "", ""])
            else:
                writer.writerow(
                    [
                        job.job_id,
                        _n(job.submit),
                        _n(job.start),
                        _n(job.end),
                        _n(job.start - job.submit),
                        " ".join(job.nodes),
                    ]
                )
    model, rules = result.config.billing, result.config.rules
    with (directory / "power.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["node", "on_s", "registered_s", "off_s", "billed_s"])
        for node, on, ready, off in sorted(result.intervals, key=lambda r: (r[0], r[1])):
            billed = billed_seconds(model, off - on, rules)
            writer.writerow([result.names[node], _n(on), _n(ready), _n(off), _n(billed)])
    with (directory / "running.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time_s", "powered_nodes"])
        writer.writerows((_n(t), n) for t, n in result.running_changes)
    _plot_running(result, directory / "running.png")


def _n(value: float) -> str:
    """A time as the trace writes it: whole seconds when whole."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def busy_changes(result: RunResult) -> list[tuple[float, int]]:
    """(time, nodes running jobs) at every change: the lower bound over time."""
    deltas: dict[float, int] = defaultdict(int)
    for job in result.jobs:
        if job.start is not None and job.end is not None:
            deltas[job.start] += job.nodes_needed
            deltas[job.end] -= job.nodes_needed
    level = 0
    changes = []
    for t in sorted(deltas):
        level += deltas[t]
        changes.append((t, level))
    return changes


def binned_mean(
    changes: Sequence[tuple[float, int]], start: float, end: float, width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Time-weighted mean of a step function per bin of `width` seconds: (bin starts, means)."""
    edges = np.arange(start, end + width, width)
    if len(changes) == 0:
        return edges[:-1], np.zeros(len(edges) - 1)
    times = np.array([t for t, _ in changes] + [end], dtype=float)
    levels = np.array([n for _, n in changes], dtype=float)
    # the integral of the step function at every change, then at every bin edge
    cumulative = np.concatenate(([0.0], np.cumsum(levels * np.diff(times))))
    at = np.clip(edges, times[0], times[-1])
    slot = np.clip(np.searchsorted(times, at, side="right") - 1, 0, len(levels) - 1)
    integral = cumulative[slot] + levels[slot] * (at - times[slot])
    return edges[:-1], np.diff(integral) / width


def _bin_width(span: float) -> float:
    return HOUR if span <= 14 * DAY else DAY


def _plot_running(result: RunResult, path: Path) -> None:
    width = _bin_width(result.end - result.start)
    unit = "hour" if width == HOUR else "day"
    fig, ax = plt.subplots(figsize=(11, 4))
    for changes, label in ((result.running_changes, "powered"), (busy_changes(result), "busy")):
        x, y = binned_mean(changes, result.start, result.end, width)
        ax.step((x - result.start) / DAY, y, where="post", label=f"{label} nodes")
    ax.set_xlabel("days since the first job")
    ax.set_ylabel(f"nodes (mean per {unit})")
    ax.set_title(f"{result.policy}: powered vs busy nodes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(path: Path, inputs: dict[str, Any], summaries: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"inputs": inputs, "policies": {s["policy"]: s for s in summaries}}
    path.write_text(json.dumps(body, indent=2) + "\n")


def plot_compare(
    path: Path,
    summaries: Sequence[dict[str, Any]],
    curves: dict[str, tuple[list[float], list[float]]],
    title: str,
) -> None:
    """The cost/wait trade-off (one point per policy) and powered nodes over time."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), width_ratios=(1, 1.6))
    for s in summaries:
        if s["cost_over_lower_bound"] is None or s["mean_wait_s"] is None:
            continue
        x, y = s["cost_over_lower_bound"], s["mean_wait_s"] / 60
        left.scatter(x, y, s=40)
        left.annotate(s["policy"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    left.set_xlabel("billed node-hours / lower bound")
    left.set_ylabel("mean wait (minutes)")
    left.set_title("cost vs waiting")
    left.grid(alpha=0.3)
    for label, (days, nodes) in curves.items():
        right.step(days, nodes, where="post", label=label, linewidth=1)
    right.set_xlabel("days since the first job")
    right.set_ylabel("powered nodes (mean per bin)")
    right.set_title("powered nodes over time")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve(result: RunResult, busy: bool = False) -> tuple[list[float], list[float]]:
    """Powered (or busy) nodes binned for the comparison plot: (days, mean nodes)."""
    changes = busy_changes(result) if busy else result.running_changes
    x, y = binned_mean(changes, result.start, result.end, _bin_width(result.end - result.start))
    return ((x - result.start) / DAY).tolist(), y.tolist()
