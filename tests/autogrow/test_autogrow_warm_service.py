"""The warm reserve in the service: the decider gathers the recent arrivals from the snapshots'
`submissions` and hands `decide()` the outlook, for the pools whose policy warms (set per pool over
the API or for all in the settings); with no warm reserve, decisions are as they always were."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from autogrow_kit import NAMES, START, Harness, harness, provision_all, settings, swf_job
from sqlalchemy import select

from services.autogrow.decisions import RecentArrivals
from services.autogrow.policy import PolicySettings
from services.autogrow.settings import AutogrowSettings
from services.autogrow.slurm import SlurmJob, job_submissions, queue_snapshot
from services.autogrow.tables import decisions
from shared.clock import ManualClock
from shared.events import PowerOff, PowerOn
from shared.scheduler import JobSubmission, QueueSnapshot

WARM: dict[str, Any] = {
    "warm_window_seconds": 600.0,
    "warm_max_nodes": 2,
    "warm_idle_seconds": 900.0,
    "warm_starts": True,
}
# one one-node job at second 0, running 60 s; the nodes boot in 30 s
JOBS = [swf_job(1, 0, 60, 1)]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


async def recorded(h: Harness) -> list[dict[str, Any]]:
    """The policy's decisions that acted, oldest first."""
    async with h.engine.connect() as conn:
        rows = await conn.execute(
            select(decisions.c.inputs, decisions.c.actions)
            .where(decisions.c.trigger == "policy")
            .order_by(decisions.c.id)
        )
        return [{"inputs": row.inputs, "actions": row.actions} for row in rows]


async def replay(h: Harness, seconds: int) -> dict[str, float]:
    """Tick every 10 s for `seconds`; when each node was powered off (seconds from START)."""
    off: dict[str, float] = {}
    seen = 0
    for _ in range(seconds // 10):
        await h.tick(10)
        commands = await h.commands()
        for command in commands[seen:]:
            if isinstance(command, PowerOff):
                for node in command.node_ids:
                    off[node] = (command.occurred_at - START).total_seconds()
        seen = len(commands)
    return off


async def test_a_warm_policy_set_over_the_api_starts_a_node_ahead_and_says_why(
    tmp_path: Path, clock: ManualClock
) -> None:
    async with harness(
        tmp_path, settings(), clock=clock, jobs=JOBS, nodes=NAMES, boot_seconds=30
    ) as h:
        await provision_all(h)
        async with h.api() as api:
            put = await api.put("/autogrow/policies/default", json=WARM)
            assert put.status_code == 200, put.text
        await h.tick()  # the job waits: one node for it, one for the reserve
        first = await h.commands()
        off = await replay(h, 700)
        history = await recorded(h)

    (power_on,) = first
    assert isinstance(power_on, PowerOn)
    assert power_on.node_ids == ("n1", "n2")
    assert "warm before jobs come: jobs of the last 600 s asked for 1 nodes" in power_on.reason
    inputs = history[0]["inputs"]
    assert inputs["warm_reserve_nodes"] == 1
    assert inputs["recent_arrivals"] == [[START.isoformat(), 1]]
    assert inputs["policy"]["warm_starts"] is True
    # the job runs 30-90 s on n1; n2, idle from 30 s and outside the reserve once n1 frees
    # (the most lately idle node is the warm one), goes after idle_seconds (120 s); n1 stays
    # as the reserve until the job's arrival leaves the 600 s window
    assert 150 <= off["n2"] <= 160
    assert 600 <= off["n1"] <= 620
    done = [(a["action"], a["node_id"]) for d in history for a in d["actions"]]
    assert done == [
        ("power_on", "n1"),
        ("power_on", "n2"),
        ("drain", "n2"),
        ("power_off", "n2"),
        ("drain", "n1"),
        ("power_off", "n1"),
    ]
    n1_drain = next(
        a for d in history for a in d["actions"] if (a["action"], a["node_id"]) == ("drain", "n1")
    )
    assert n1_drain["reason"].startswith("idle 510 s (grace 120 s)")  # the reserve is gone


async def test_warm_settings_from_the_environment_warm_every_pool(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCFLEET_AUTOGROW_SCHEDULER", "simulated")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_POLICY__IDLE_SECONDS", "120")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_POLICY__WARM_WINDOW_SECONDS", "600")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_POLICY__WARM_MAX_NODES", "2")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_POLICY__WARM_STARTS", "true")
    from_env = AutogrowSettings()
    assert from_env.policy.warm_max_nodes == 2 and from_env.policy.warm_starts
    jobs = [swf_job(1, 0, 60, 1), swf_job(2, 5, 60, 1)]
    async with harness(
        tmp_path, from_env, clock=clock, jobs=jobs, nodes=NAMES, boot_seconds=30
    ) as h:
        await provision_all(h)
        await h.tick()  # job 1 waits: one node for it, one warm
        clock.advance(5)
        await h.tick()  # job 2 arrives: two wait for the two booting nodes; the reserve is 2
        commands = await h.commands()
        history = await recorded(h)

    assert [c.node_ids for c in commands] == [("n1", "n2"), ("n3", "n4")]
    assert "warm before jobs come: jobs of the last 600 s asked for 2 nodes" in commands[-1].reason
    # job 1 is counted once, though both snapshots listed it
    assert history[-1]["inputs"]["warm_reserve_nodes"] == 2
    assert len(history[-1]["inputs"]["recent_arrivals"]) == 2


async def test_without_a_warm_reserve_nothing_changes(tmp_path: Path, clock: ManualClock) -> None:
    async with harness(
        tmp_path, settings(), clock=clock, jobs=JOBS, nodes=NAMES, boot_seconds=30
    ) as h:
        await provision_all(h)
        await h.tick()
        first = await h.commands()
        off = await replay(h, 300)
        history = await recorded(h)
        kept = len(h.autogrow.decider.arrivals)

    (power_on,) = first
    assert power_on.node_ids == ("n1",)
    assert power_on.reason == "1 nodes wanted by waiting jobs, 0 idle or booting"
    assert 210 <= off["n1"] <= 220  # idle from 90 s, 120 s grace
    assert all("warm_reserve_nodes" not in d["inputs"] for d in history)
    assert kept == 0, "no pool warms: no arrival is kept"


# ---- the arrivals' memory -------------------------------------------------------------------


def submission(
    job_id: str, ago: float, nodes: int = 1, partition: str = "batch", cores: int = 0
) -> JobSubmission:
    return JobSubmission(
        job_id=job_id,
        partition=partition,
        submitted_at=START - timedelta(seconds=ago),
        nodes=nodes,
        cores=cores,
    )


def snapshot(*jobs: JobSubmission) -> QueueSnapshot:
    return QueueSnapshot(taken_at=START, submissions=jobs)


def warm(**changes: Any) -> PolicySettings:
    return PolicySettings.model_validate({**WARM, **changes})


def test_arrivals_are_merged_by_job_and_outlive_the_snapshot_that_showed_them() -> None:
    arrivals = RecentArrivals()
    arrivals.observe(snapshot(submission("1", 30), submission("2", 20)), START, 600, 16)
    # job 1 ended and is no longer listed; job 2 is listed again; job 3 is new
    arrivals.observe(snapshot(submission("2", 20), submission("3", 5, nodes=2)), START, 600, 16)
    outlook = arrivals.outlook(warm())
    assert outlook is not None
    assert sorted(outlook.arrivals) == sorted(
        [
            (START - timedelta(seconds=30), 1),
            (START - timedelta(seconds=20), 1),
            (START - timedelta(seconds=5), 2),
        ]
    )


def test_arrivals_are_forgotten_past_the_window_and_beyond_the_cap() -> None:
    arrivals = RecentArrivals()
    listed = [submission(str(i), 10 * i) for i in range(1, 8)]  # 10 s .. 70 s ago
    arrivals.observe(snapshot(*listed, submission("old", 700)), START, 600, 3)
    assert len(arrivals) == 3  # the newest 3: more could not raise a reserve capped at 3
    later = START + timedelta(seconds=585)
    arrivals.observe(snapshot(), later, 600, 3)
    assert len(arrivals) == 1  # only job 1 (595 s old by then) is still in the window
    arrivals.observe(snapshot(), later, 0, 0)  # no pool warms any more
    assert len(arrivals) == 0


def test_the_outlook_is_the_pools_partitions_in_its_whole_nodes_and_none_without_warming() -> None:
    arrivals = RecentArrivals()
    jobs = [
        submission("1", 10, nodes=1, cores=8, partition="cpu"),
        submission("2", 20, nodes=3, cores=3, partition="gpu"),
    ]
    arrivals.observe(snapshot(*jobs), START, 600, 16)
    outlook = arrivals.outlook(warm(cores_per_node=4, partitions=frozenset({"cpu"})))
    assert outlook is not None
    assert outlook.arrivals == ((START - timedelta(seconds=10), 2),)  # 8 cores: 2 nodes of 4
    assert arrivals.outlook(PolicySettings()) is None


def test_slurm_lists_the_newest_jobs_and_an_array_once() -> None:
    def slurm_job(job_id: int, at: int, **kw: Any) -> SlurmJob:
        fields: dict[str, Any] = {
            "job_id": job_id,
            "state": "PENDING",
            "reason": "Resources",
            "partition": "batch",
            "node_count": 1,
            "cpus": 2,
            "exclusive": False,
            "nodes": (),
            "submitted": START + timedelta(seconds=at),
            "array_job_id": None,
            "array_task_id": None,
            "tasks": 1,
            "array_max_tasks": 0,
        }
        return SlurmJob(**{**fields, **kw})

    jobs = [
        slurm_job(10, 0),
        slurm_job(11, 5, node_count=2, state="RUNNING"),
        slurm_job(20, 9, array_job_id=20, tasks=3),  # the array's pending tasks
        slurm_job(21, 9, array_job_id=20, array_task_id=1, state="RUNNING"),  # a started task
        slurm_job(30, 7, submitted=None),
    ]
    listed = job_submissions(jobs, limit=2)
    assert [(s.job_id, s.nodes, s.cores) for s in listed] == [("20", 4, 8), ("11", 2, 2)]


def test_slurm_lists_submissions_in_a_recorded_queue() -> None:
    samples = Path(__file__).parents[1] / "slurm" / "samples"
    squeue = json.loads((samples / "squeue_running.json").read_text())
    sinfo = json.loads((samples / "sinfo_nodes_off.json").read_text())
    snap = queue_snapshot(squeue, sinfo, START)
    by_id = {s.job_id: s for s in snap.submissions}
    # ten jobs, the three arrays each once with all their tasks (array 3: 7 pending + 3 started)
    assert sorted(by_id, key=int) == [str(i) for i in range(1, 11)]
    assert (by_id["3"].nodes, by_id["7"].nodes, by_id["7"].cores) == (10, 2, 6)
