"""autogrow's API: the queue, the nodes, the decisions and Slurm's power hooks, including bad
input (clear 4xx) and a scheduler that cannot be read (no decisions, a clear 503)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from autogrow_kit import START, Harness, harness, node_ids, swf_job

from services.autogrow.policy import PolicySettings
from services.autogrow.settings import AutogrowSettings
from services.autogrow.slurm import SlurmScheduler
from shared.bus import Envelope
from shared.clock import ManualClock
from shared.events import NodeRetired, PowerOff, PowerOn, PowerState, RetireReason

NAMES = ["node001", "node002", "node003"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def settings(**values: Any) -> AutogrowSettings:
    return AutogrowSettings.model_validate(
        {"scheduler": "simulated", "policy": PolicySettings(idle_seconds=3600), **values}
    )


async def provision(h: Harness) -> None:
    for i, name in enumerate(NAMES, start=1):
        await h.pool.provision(f"n{i}", name)
    await h.settle()


async def test_resume_powers_the_named_nodes_on_at_once(tmp_path: Path, clock: ManualClock) -> None:
    async with harness(tmp_path, settings(), clock=clock, nodes=NAMES) as h:
        await provision(h)
        async with h.api() as api:
            first = await api.post("/autogrow/hooks/resume", json={"nodes": ["node002"]})
            await h.settle()
            again = await api.post(
                "/autogrow/hooks/resume", json={"nodes": ["node002", "node003", "node003"]}
            )
            await h.settle()
            decisions = (await api.get("/autogrow/decisions")).json()
        commands = await h.commands()

    assert first.status_code == 200, first.text
    assert first.json()["acted"] == ["node002"]
    assert again.json()["acted"] == ["node003"] and again.json()["unchanged"] == ["node002"]
    assert node_ids(commands, PowerOn) == ["n2", "n3"]
    assert str(commands[0].decision_id) == first.json()["decision_id"]
    assert decisions[1]["trigger"] == "slurm-resume"
    assert decisions[1]["actions"][0]["reason"] == (
        "Slurm's ResumeProgram asked for node002: jobs wait for them"
    )


async def test_suspend_powers_off_idle_nodes_and_keeps_busy_ones(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 3600, 1)]
    async with harness(
        tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES, boot_seconds=0
    ) as h:
        await provision(h)
        await h.pool.report("n1", PowerState.RUNNING)
        await h.pool.report("n2", PowerState.RUNNING)
        await h.settle()
        await h.tick()  # the job runs on node001; node002 is idle
        async with h.api() as api:
            response = await api.post(
                "/autogrow/hooks/suspend", json={"nodes": ["node001", "node002", "node003"]}
            )
            await h.settle()
        commands = await h.commands()

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["acted"], body["unchanged"], body["kept"]) == (
        ["node002"],
        ["node003"],
        ["node001"],
    )
    assert node_ids(commands, PowerOff) == ["n2"]


@pytest.mark.parametrize("action", ["resume", "suspend"])
async def test_unknown_and_retired_nodes_are_404_naming_them(
    tmp_path: Path, clock: ManualClock, action: str
) -> None:
    async with harness(tmp_path, settings(), clock=clock, nodes=NAMES) as h:
        await provision(h)
        retired = NodeRetired(
            occurred_at=clock.now(), node_id="n3", instance_id="i-n3", reason=RetireReason.EXPIRED
        )
        await h.bus.publish(Envelope.of(retired))
        await h.settle()
        async with h.api() as api:
            response = await api.post(
                f"/autogrow/hooks/{action}", json={"nodes": ["node001", "node003", "node999"]}
            )
        commands = await h.commands()

    assert response.status_code == 404
    assert response.json()["detail"] == "not pool nodes autogrow knows: node003, node999"
    assert commands == [], "nothing is done for a list with unknown nodes"


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({}, "body.nodes"),
        ({"nodes": []}, "body.nodes"),
        ({"nodes": "node001"}, "body.nodes"),
        ({"nodes": ["node[001-002]"]}, "body.nodes.0"),
        ({"nodes": ["node001"], "force": True}, "body.force"),
    ],
)
async def test_bad_hook_bodies_are_422_saying_where(
    tmp_path: Path, clock: ManualClock, body: dict[str, Any], where: str
) -> None:
    async with harness(tmp_path, settings(), clock=clock, nodes=NAMES) as h, h.api() as api:
        response = await api.post("/autogrow/hooks/resume", json=body)
        not_json = await api.post("/autogrow/hooks/suspend", content=b"node001")

    assert response.status_code == 422
    assert where in [p["where"] for p in response.json()["problems"]]
    assert not_json.status_code == 422


async def test_queue_and_nodes_show_the_latest_read(tmp_path: Path, clock: ManualClock) -> None:
    jobs = [swf_job(1, 0, 600, 1)]
    async with harness(tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES) as h:
        await provision(h)
        async with h.api() as api:
            before = await api.get("/autogrow/queue")
            await h.tick()
            queue = await api.get("/autogrow/queue")
            listed = (await api.get("/autogrow/nodes")).json()
            clock.advance(60)  # nobody read the scheduler since
            stale = await api.get("/autogrow/queue")
            with pytest.raises(RuntimeError, match="no good read of the scheduler for over 30 s"):
                await h.autogrow.readiness()[1]()

    assert before.status_code == 503
    assert before.json()["detail"] == "the scheduler has not been read yet"
    assert queue.status_code == 200 and queue.json()["ready"]
    assert queue.json()["snapshot"]["partitions"][0]["pending_jobs"] == 1
    assert [(n["node_id"], n["power_state"], n["activity"]) for n in listed] == [
        ("n1", "running", "down"),  # powered on for the job, booting
        ("n2", "stopped", "down"),
        ("n3", "stopped", "down"),
    ]
    assert stale.status_code == 503
    assert stale.json()["detail"] == (
        "no good read of the scheduler for over 30 s (the last at 2026-03-02 08:00:00 UTC)"
    )
    assert stale.json()["snapshot"] is not None, "the last good snapshot is still shown"


async def test_malformed_scheduler_output_stops_decisions_with_a_clear_503(
    tmp_path: Path, clock: ManualClock
) -> None:
    jobs = [swf_job(1, 0, 600, 3)]
    async with harness(tmp_path, settings(), clock=clock, jobs=jobs, nodes=NAMES) as h:
        await provision(h)
        await h.tick()  # a good read first: PowerOn for three nodes
        bin_dir = fake_slurm(tmp_path, squeue="echo '{\"jobs\": [tru'")
        h.autogrow.watcher.scheduler = SlurmScheduler(bin_dir=bin_dir, clock=clock)
        with pytest.raises(Exception, match="squeue --json printed no valid JSON"):
            await h.tick(200)  # the command timed out: the policy would ask again
        assert await h.autogrow.decider.step() is None
        async with h.api() as api:
            queue = await api.get("/autogrow/queue")
        commands = await h.commands()

    assert len(commands) == 1, "no decision on a view that failed"
    assert h.autogrow.decider.blocked is not None
    assert "SlurmOutputInvalid" in h.autogrow.decider.blocked
    assert queue.status_code == 503
    assert queue.json()["detail"].startswith(
        "the last read of the scheduler failed: SlurmOutputInvalid: squeue --json printed no"
    )


def fake_slurm(tmp_path: Path, *, squeue: str) -> Path:
    """A bin dir whose squeue runs `squeue` (shell) and whose sinfo lists no nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("squeue", squeue), ("sinfo", 'echo \'{"errors": [], "nodes": []}\'')):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return bin_dir
