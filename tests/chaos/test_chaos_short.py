"""The chaos run, short, in CI: a fixed seed, a minute and a half of faults, every invariant.

The whole system runs as processes over its own PostgreSQL, RabbitMQ and moto (nothing shared is
touched), while processes are killed and restarted, the broker drops every connection, PostgreSQL
restarts, AWS fails a tenth of the calls, and poison and duplicate messages arrive; see chaos.py.
`make chaos` runs the ten-minute version. A failure prints the report: the seed reproduces the
fault schedule (`python tests/chaos/chaos.py --seed ...`, the command is in the report).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from chaos import Options, plan_faults, run_chaos, scan_logs, trace_slice

pytestmark = [pytest.mark.slow]

SHORT = Options(
    seed=15,
    minutes=1.5,
    kills=5,
    disconnects=2,
    postgres_restarts=1,
    aws_fault_rate=0.10,
    nodes=8,
    max_jobs=200,
    converge_minutes=2.5,
)


def _servers_installed() -> None:
    missing = [
        name
        for name, path in (
            ("rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server"),
            ("postgresql", "/usr/lib/postgresql"),
        )
        if not Path(path).exists()
    ]
    if missing and os.environ.get("HPCFLEET_SKIP_RABBITMQ") == "1":
        pytest.skip(f"not installed: {missing}")
    assert not missing, f"install {missing}: the run starts its own servers"


def test_the_schedule_is_the_seeds_alone() -> None:
    processes = [f"{s}-{k}" for s in ("auth", "pool") for k in ("api", "worker")]
    assert plan_faults(SHORT, processes) == plan_faults(SHORT, list(reversed(processes)))
    assert plan_faults(SHORT, processes) != plan_faults(replace(SHORT, seed=4), processes)
    kinds = [p.kind for p in plan_faults(SHORT, processes)]
    assert kinds.count("kill") == 5 and kinds.count("disconnect") == 2
    assert kinds.count("poison") == kinds.count("duplicate") == 3  # one per consuming service


def test_the_trace_slice_fits_the_fault_phase() -> None:
    budget = SHORT.minutes * 60 * SHORT.speed
    jobs, about = trace_slice(SHORT.seed, budget, SHORT.max_jobs)
    assert jobs and about["jobs"] == len(jobs)
    first = jobs[0].submit
    assert all(job.submit - first + job.run_time <= budget for job in jobs)
    assert jobs == trace_slice(SHORT.seed, budget, SHORT.max_jobs)[0]


def test_the_soak_slice_arrives_at_a_steady_rate_over_the_whole_window() -> None:
    """The soak's jobs arrive evenly over the whole hour (the trace's own arrivals came over
    its first 60 %, in bursts), each with the trace's size and run time, and all fit."""
    budget = 60 * 60 * 240.0  # make soak: an hour at x240
    jobs, about = trace_slice(7, budget, 2000, steady=True)
    assert about["arrivals"] == "evenly spaced" and len(jobs) > 500
    first = jobs[0].submit
    offsets = [job.submit - first for job in jobs]
    assert all(offset + job.run_time <= budget for offset, job in zip(offsets, jobs, strict=True))
    tenths = [0] * 10
    for offset in offsets:
        tenths[min(9, int(10 * offset / budget))] += 1
    # every tenth of the hour gets its share; only the last loses the jobs too long to end in time
    assert min(tenths[:9]) >= 0.9 * max(tenths) and tenths[9] >= 0.5 * max(tenths), tenths
    assert about["arrivals_span_fraction"] > 0.95
    by_id = {job.job_id: job for job in trace_slice(7, budget, 2000)[0]}
    assert all(job.run_time == by_id[job.job_id].run_time for job in jobs if job.job_id in by_id)


def test_secrets_and_tokens_are_found_in_logs(tmp_path: Path) -> None:
    log = tmp_path / "pool-worker.log"
    log.write_text(
        '{"event": "fetched with s3cr3t-client-secret"}\n'
        '{"event": "Bearer eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJwb29sIn0.sig"}\n'
    )
    found = scan_logs([log], {"s3cr3t-client-secret"})
    assert len(found) == 2, found
    assert scan_logs([log], {"not-there-at-all"}) == [found[1]]


async def test_the_distributed_system_keeps_its_invariants_under_chaos() -> None:
    _servers_installed()
    report = await run_chaos(SHORT)
    print(report.text())
    assert report.faults["kill"] == SHORT.kills
    assert report.faults["disconnect"] == SHORT.disconnects
    assert report.faults["postgres-restart"] == SHORT.postgres_restarts
    assert report.faults["poison"] == report.faults["duplicate"] == 3
    assert report.aws_calls_failed > 0
    failed = [f"{i.name}: {i.detail}" for i in report.invariants if not i.passed]
    assert report.converge_seconds is not None, report.converge_waits
    assert not failed, "\n".join(failed)
