"""The pure pieces around decide(): the policy's view of a node (with the commands under way), when
the pool's report settles a command, the simulated nodes following the pool's power, settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.autogrow.cluster import NodePower, SimulatedCluster
from services.autogrow.decisions import OFF, ON, SLURM_OFF, node_view, settles
from services.autogrow.settings import AutogrowSettings
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.swf import SwfJob
from shared.clock import ManualClock
from shared.events import BillingModel, PowerState
from shared.scheduler import NodeActivity
from shared.settings import ConfigurationError, load_settings

NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)


def row(**changes: Any) -> dict[str, Any]:
    return {
        "node_id": "n1",
        "scheduler_node_name": "node001",
        "power_state": "stopped",
        "since": EARLIER,
        "billing": "hourly",
        "retired_at": None,
        "drain_requested": True,
        "requested_power": None,
        "requested_at": None,
        "retiring": False,
        "refused_at": None,
        **changes,
    }


def test_a_node_is_seen_as_the_pool_reported_it() -> None:
    built = NOW - timedelta(days=3)
    view = node_view(row(), built, NOW, 120)
    assert view is not None
    assert (view.power, view.since, view.billing) == (
        PowerState.STOPPED,
        EARLIER,
        BillingModel.HOURLY,
    )
    assert view.drain_requested and view.image_built_at == built


@pytest.mark.parametrize(
    ("reported", "requested", "seen"),
    [
        ("stopped", ON, PowerState.STARTING),
        ("stopping", ON, PowerState.STARTING),
        ("running", ON, PowerState.RUNNING),
        ("running", OFF, PowerState.STOPPING),
        ("starting", SLURM_OFF, PowerState.STOPPING),
        ("stopped", OFF, PowerState.STOPPED),
    ],
)
def test_a_command_under_way_counts_until_it_times_out(
    reported: str, requested: str, seen: PowerState
) -> None:
    asked = NOW - timedelta(seconds=30)
    under_way = node_view(
        row(power_state=reported, requested_power=requested, requested_at=asked), None, NOW, 120
    )
    timed_out = node_view(
        row(power_state=reported, requested_power=requested, requested_at=asked), None, NOW, 30
    )
    assert under_way is not None and timed_out is not None
    assert under_way.power is seen
    assert under_way.since == (asked if seen is not PowerState(reported) else EARLIER)
    assert timed_out.power is PowerState(reported)


def test_retired_and_nameless_nodes_cannot_be_powered() -> None:
    assert node_view(row(retired_at=EARLIER), None, NOW, 120) is None
    assert node_view(row(scheduler_node_name=None), None, NOW, 120) is None


def test_only_a_report_in_the_asked_direction_settles_a_command() -> None:
    assert settles(ON, PowerState.STARTING) and settles(ON, PowerState.RUNNING)
    assert not settles(ON, PowerState.STOPPED)  # e.g. an older report overtaken by the command
    assert settles(OFF, PowerState.STOPPING) and settles(SLURM_OFF, PowerState.STOPPED)
    assert not settles(OFF, PowerState.RUNNING) and not settles(None, PowerState.RUNNING)


def test_simulated_nodes_register_after_the_boot_and_vanish_when_stopped() -> None:
    clock = ManualClock(NOW)
    job = SwfJob(1, 0, None, 3600, 1, 1, 1, 3600, 1, None, None)
    sched = SimulatedScheduler([job], clock, nodes=["node001", "node002"], cores_per_node=1)
    cluster = SimulatedCluster(sched, engine=None, clock=clock, boot_seconds=60)  # type: ignore[arg-type]

    def activity() -> dict[str, NodeActivity]:
        return {n.name: n.activity for n in sched.take_snapshot().nodes}

    running = [NodePower("node001", PowerState.RUNNING, NOW)]
    cluster.follow(running, NOW + timedelta(seconds=59))
    assert activity() == {"node001": NodeActivity.DOWN, "node002": NodeActivity.DOWN}
    clock.advance(60)
    cluster.follow(running, clock.now())
    assert activity()["node001"] is NodeActivity.BUSY, "booted, and the waiting job started"
    cluster.follow([NodePower("node001", PowerState.STOPPING, clock.now())], clock.now())
    assert activity()["node001"] is NodeActivity.DOWN
    assert sched.jobs[0].interruptions == 1, "stopping a node under a job kills the job"


def test_settings_name_the_variable_that_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCFLEET_AUTOGROW_POLICY__MIN_RUNNING", "3")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_POLICY__MAX_RUNNING", "8")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_SCHEDULER", "simulated")
    loaded = load_settings(AutogrowSettings)
    assert (loaded.policy.min_running, loaded.policy.max_running) == (3, 8)
    assert loaded.simulated_node_names[:2] == ["node001", "node002"]

    monkeypatch.setenv("HPCFLEET_AUTOGROW_POLICY__MIN_RUNNING", "9")
    with pytest.raises(ConfigurationError, match=r"HPCFLEET_AUTOGROW_POLICY: .*min_running \(9\)"):
        load_settings(AutogrowSettings)
    monkeypatch.delenv("HPCFLEET_AUTOGROW_POLICY__MIN_RUNNING")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_MODE", "slurm-decides")
    with pytest.raises(ConfigurationError, match="slurm-decides needs scheduler slurm"):
        load_settings(AutogrowSettings)
    monkeypatch.setenv("HPCFLEET_AUTOGROW_SCHEDULER", "slurm")
    monkeypatch.setenv("HPCFLEET_AUTOGROW_SIMULATED_NODES", "node[3-")
    with pytest.raises(ConfigurationError, match=r"HPCFLEET_AUTOGROW_SIMULATED_NODES: .*host list"):
        load_settings(AutogrowSettings)
