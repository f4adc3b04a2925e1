"""`hpcfleet simulate` end to end: bad input gets a clear message and the right exit code, good
input gets the files anyone can re-check."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
from collections import defaultdict
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from services.autogrow.billing import billed_seconds
from services.simulator.cli import simulate
from shared.events import BillingModel

app = typer.Typer()
app.command()(simulate)
runner = CliRunner()

HEADER = "; Computer: test\n; MaxNodes: 4\n; MaxProcs: 8\n; UnixStartTime: 1000000000\n"


def swf_line(job_id: int, submit: int, run: int, procs: int, requested: int = -1) -> str:
    # id submit wait run alloc cpu mem req-procs req-time req-mem status user group app queue
    # partition preceding think
    fields = [job_id, submit, -1, run, procs, -1, -1, requested, run, -1, 1, 1, 1, 1, 1, 1, -1, -1]
    return " ".join(map(str, fields)) + "\n"


def invoke(tmp_path: Path, text: str, *args: str, name: str = "trace.swf") -> tuple[int, str]:
    trace = tmp_path / name
    trace.write_text(text)
    result = runner.invoke(app, [str(trace), "--processes", "1", *args])
    return result.exit_code, result.output


def test_a_file_that_is_not_swf_is_refused(tmp_path: Path) -> None:
    code, output = invoke(tmp_path, "<html><body>not a trace</body></html>\n")
    assert code == 1
    assert "no job to simulate (is it an SWF file?)" in output
    assert "malformed lines 1" in output


def test_an_empty_trace_is_refused(tmp_path: Path) -> None:
    code, output = invoke(tmp_path, HEADER)
    assert code == 1 and "the trace is empty" in output


def test_damaged_gzip_is_refused(tmp_path: Path) -> None:
    data = gzip.compress((HEADER + swf_line(1, 0, 10, 2)).encode())
    trace = tmp_path / "trace.swf.gz"
    trace.write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, [str(trace)])
    assert result.exit_code == 1 and "cannot read" in result.output


def test_a_header_without_max_nodes_needs_nodes(tmp_path: Path) -> None:
    text = "; Computer: test\n" + swf_line(1, 0, 100, 2)
    code, output = invoke(tmp_path, text, "--policy", "idle-300")
    assert code == 2 and "no MaxNodes: give --nodes" in output
    code, output = invoke(tmp_path, text, "--policy", "idle-300", "--nodes", "2")
    assert code == 0, output
    assert "1 jobs on 2 nodes x 1 cores" in output


def test_a_missing_file_and_an_unknown_policy_are_usage_errors(tmp_path: Path) -> None:
    assert runner.invoke(app, [str(tmp_path / "missing.swf")]).exit_code == 2
    code, output = invoke(tmp_path, HEADER + swf_line(1, 0, 10, 2), "--policy", "nope")
    assert code == 2 and "unknown policy 'nope'" in output


def test_bad_lines_and_too_large_jobs_are_skipped_and_counted(tmp_path: Path) -> None:
    text = (
        HEADER
        + swf_line(1, 0, 100, 2)  # 2 cores: one node of 2
        + swf_line(2, 10, 100, -1, requested=3)  # allocated unknown, requested 3: two nodes
        + swf_line(3, 20, -1, 2).replace(" 1 1 1 1 1 1 -1 -1", " 5 1 1 1 1 1 -1 -1")  # cancelled
        + swf_line(4, 30, 100, 9)  # 9 cores: 5 nodes, the pool has 4
        + swf_line(5, 40, -7, 2)  # a negative run time other than -1
        + "6 50 too few fields\n"
    )
    out = tmp_path / "out"
    code, output = invoke(tmp_path, text, "--policy", "hpcfleet", "--out", str(out))
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["cores_per_node"] == 2
    skipped = summary["inputs"]["skipped"]
    assert skipped["cancelled_without_run_time"] == 1
    assert skipped["larger_than_pool"] == 1
    assert skipped["malformed_lines"] == 2
    assert summary["policies"]["hpcfleet"]["jobs_run"] == 2


def test_limit_days_keeps_the_first_days(tmp_path: Path) -> None:
    text = HEADER + swf_line(1, 0, 100, 2) + swf_line(2, 2 * 86400, 100, 2)
    out = tmp_path / "out"
    code, output = invoke(
        tmp_path, text, "--policy", "always-on", "--limit-days", "1", "--out", str(out)
    )
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["always-on"]["jobs_run"] == 1
    assert summary["inputs"]["skipped"]["after_limit_days"] == 1


def test_the_files_prove_the_run_independently(tmp_path: Path) -> None:
    """From schedule.csv and power.csv alone: jobs on registered nodes, one job per node at a
    time, no start before submit, and the billed hours from the intervals."""
    jobs = "".join(swf_line(i, i * 900, 300 + 97 * i, 1 + 2 * (i % 4)) for i in range(30))
    out = tmp_path / "out"
    code, output = invoke(
        tmp_path, HEADER + jobs, "--policy", "hpcfleet", "--billing", "hourly", "--out", str(out)
    )
    assert code == 0, output
    with (out / "hpcfleet" / "power.csv").open() as f:
        power = list(csv.DictReader(f))
    with (out / "hpcfleet" / "schedule.csv").open() as f:
        schedule = list(csv.DictReader(f))
    up: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in power:
        up[row["node"]].append((float(row["registered_s"]), float(row["off_s"])))
        assert float(row["billed_s"]) == billed_seconds(
            BillingModel.HOURLY, float(row["off_s"]) - float(row["on_s"])
        )
    busy: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in schedule:
        start, end = float(row["start_s"]), float(row["end_s"])
        assert start >= float(row["submit_s"])
        for node in row["nodes"].split():
            assert any(ready <= start and end <= off for ready, off in up[node])
            busy[node].append((start, end))
    for runs in busy.values():
        runs.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(runs))
    summary = json.loads((out / "summary.json").read_text())["policies"]["hpcfleet"]
    billed = sum(float(row["billed_s"]) for row in power) / 3600
    assert summary["billed_node_hours"] == pytest.approx(billed, abs=1e-3)


def test_compare_runs_every_policy_in_parallel_and_plots(tmp_path: Path) -> None:
    jobs = "".join(swf_line(i, i * 600, 200 + 50 * i, 2 + 2 * (i % 3)) for i in range(20))
    trace = tmp_path / "trace.swf"
    trace.write_text(HEADER + jobs)
    out = tmp_path / "out"
    result = runner.invoke(app, [str(trace), "--compare", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    names = [
        "always-on",
        "idle-600",
        "idle-300",
        "asg-5min",
        "hour-boundary",
        "hpcfleet",
        "hpcfleet-warm",
    ]
    assert list(summary["policies"]) == names
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for name in names:
        assert name in result.output
        assert (out / name / "running.png").exists()
