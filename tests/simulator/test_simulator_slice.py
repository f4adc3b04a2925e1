"""Every policy on the bundled 2,000-job slice of SDSC-SP2: a real trace, checked as a reader of
the CSVs would check it, and the orderings that must hold whatever the tuning."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.autogrow.swf import bundled_trace, open_swf
from services.simulator.engine import RunResult, SimConfig, fitting, origin_of, run
from services.simulator.policies import POLICIES
from services.simulator.report import summarize, verify

SLICE = "SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz"


@pytest.fixture(scope="module")
def results() -> dict[str, RunResult]:
    with open_swf(bundled_trace(SLICE)) as reader:
        jobs = list(reader)
    header = reader.header
    assert header.max_nodes == 128 and reader.skipped.cancelled == 127
    config = SimConfig(nodes=128, cores_per_node=1)
    jobs, too_large = fitting(jobs, config.nodes, config.cores_per_node)
    assert too_large == 0
    origin = origin_of(header.unix_start_time)
    return {name: run(jobs, config, make(), origin=origin) for name, make in POLICIES.items()}


def test_every_policy_passes_the_independent_checks(results: dict[str, RunResult]) -> None:
    for name, result in results.items():
        assert verify(result) == [], name
        summary = summarize(result)
        assert summary["jobs_run"] == 1873 and summary["jobs_not_run"] == 0, name
        assert summary["jobs_interrupted"] == 0, name
        assert summary["cost_over_lower_bound"] >= 1, name


def test_what_must_hold_on_a_real_trace(results: dict[str, RunResult]) -> None:
    s = {name: summarize(result) for name, result in results.items()}
    always = s["always-on"]
    assert always["node_starts"] == 128
    for name in POLICIES:
        if name != "always-on":
            assert s[name]["billed_node_hours"] < always["billed_node_hours"], name
    # the longer the idle limit, the fewer the starts
    assert s["idle-600"]["node_starts"] < s["idle-300"]["node_starts"]
    # hpcfleet's production grace is 300 s: per-second billing makes it an idle-300 with drains
    assert s["hpcfleet"]["cost_over_lower_bound"] == pytest.approx(
        s["idle-300"]["cost_over_lower_bound"], rel=0.01
    )


def test_verify_catches_a_job_on_a_node_that_was_not_up(results: dict[str, RunResult]) -> None:
    result = results["idle-300"]
    first = result.jobs[0]
    assert first.start is not None
    used = result.names.index(first.nodes[0])
    intervals = [
        (node, on, first.start + 1 if node == used and on <= first.start < off else ready, off)
        for node, on, ready, off in result.intervals
    ]
    broken = replace(result, intervals=intervals)
    assert any("while it was not up" in p for p in verify(broken))
    fewer = replace(result, billed_seconds=result.billed_seconds - 3600)
    assert any("the intervals give" in p for p in verify(fewer))
