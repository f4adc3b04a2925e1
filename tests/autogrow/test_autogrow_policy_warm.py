"""decide()'s warm reserve: nodes kept or started for the jobs the recent arrivals say will come."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from services.autogrow.billing import BillingRules
from services.autogrow.policy import (
    PolicySettings,
    PoolNodeView,
    QueueOutlook,
    decide,
    warm_reserve,
)
from shared.events import BillingModel, PowerState
from shared.scheduler import NodeActivity, PartitionDemand, QueueSnapshot, SchedulerNode

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RULES = BillingRules()
WARM = PolicySettings(
    idle_seconds=120,
    warm_window_seconds=900,
    warm_max_nodes=3,
    warm_idle_seconds=1200,
    warm_starts=True,
)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def running(name: str) -> PoolNodeView:
    return PoolNodeView(name, name, PowerState.RUNNING, ago(7200), BillingModel.PER_SECOND)


def stopped(name: str) -> PoolNodeView:
    return PoolNodeView(name, name, PowerState.STOPPED, ago(7200), BillingModel.PER_SECOND)


def idle(name: str, seconds: float) -> SchedulerNode:
    return SchedulerNode(name=name, activity=NodeActivity.IDLE, cpus=1, idle_since=ago(seconds))


def down(name: str) -> SchedulerNode:
    return SchedulerNode(name=name, activity=NodeActivity.DOWN, cpus=1)


def queue(nodes: list[SchedulerNode], pending: int = 0) -> QueueSnapshot:
    demand = PartitionDemand(
        partition="batch", pending_jobs=pending, pending_cores=pending, pending_nodes=pending
    )
    return QueueSnapshot(taken_at=NOW, partitions=(demand,), nodes=tuple(nodes))


def arrived(*pairs: tuple[float, int]) -> QueueOutlook:
    return QueueOutlook(arrivals=tuple((ago(seconds), nodes) for seconds, nodes in pairs))


def test_the_reserve_is_what_the_window_asked_for_capped() -> None:
    assert warm_reserve(None, NOW, WARM) == (0, float("inf"))
    count, changes_in = warm_reserve(arrived((100, 1), (800, 1), (901, 5)), NOW, WARM)
    assert count == 2  # the job 901 s ago is outside the 900 s window
    assert changes_in == 100  # the job of 800 s ago leaves the window in 100 s
    assert warm_reserve(arrived((10, 8)), NOW, WARM)[0] == 3  # capped at warm_max_nodes
    assert warm_reserve(arrived((10, 8)), NOW, PolicySettings())[0] == 0  # off by default


def test_stopped_nodes_are_started_to_fill_the_reserve_before_jobs_come() -> None:
    pool = [stopped("a"), stopped("b"), stopped("c")]
    decision = decide(
        queue([down("a"), down("b"), down("c")]), pool, RULES, NOW, WARM, arrived((30, 2))
    )
    assert [a.node_id for a in decision.power_on] == ["a", "b"]
    assert all("warm before jobs come" in a.reason for a in decision.power_on)
    assert decision.recheck_at == NOW + timedelta(seconds=870)  # the arrival leaves the window


def test_without_warm_starts_nothing_starts_for_the_reserve() -> None:
    settings = WARM.model_copy(update={"warm_starts": False})
    decision = decide(queue([down("a")]), [stopped("a")], RULES, NOW, settings, arrived((30, 2)))
    assert decision.power_on == ()


def test_idle_nodes_within_the_reserve_stay_the_rest_go_at_idle_seconds() -> None:
    pool = [running(n) for n in "abcd"]
    seen = [idle("a", 600), idle("b", 500), idle("c", 400), idle("d", 300)]
    decision = decide(queue(seen), pool, RULES, NOW, WARM, arrived((60, 1), (200, 1)))
    # two nodes warm: the two most lately idle (c, d) stay; the longest idle go
    assert [a.node_id for a in decision.drain] == ["a", "b"]
    assert "grace 120 s" in decision.drain[0].reason
    assert decision.recheck_at == NOW + timedelta(seconds=700)  # the job of 200 s ago leaves


def test_a_reserve_node_goes_once_idle_past_warm_idle_seconds() -> None:
    decision = decide(queue([idle("a", 1300)]), [running("a")], RULES, NOW, WARM, arrived((60, 1)))
    assert [a.node_id for a in decision.drain] == ["a"]
    assert "warm reserve" in decision.drain[0].reason


def test_waiting_jobs_come_before_the_reserve() -> None:
    pool = [stopped(n) for n in "abcde"]
    snap = queue([down(n) for n in "abcde"], pending=2)
    decision = decide(snap, pool, RULES, NOW, WARM, arrived((5, 2), (50, 1)))
    assert len(decision.power_on) == 5  # two for the waiting jobs, three warm (the cap)
    capped = WARM.model_copy(update={"max_running": 3})
    assert len(decide(snap, pool, RULES, NOW, capped, arrived((5, 2))).power_on) == 3


def test_no_outlook_no_change() -> None:
    pool = [running("a"), stopped("b")]
    seen = [idle("a", 200), down("b")]
    with_warm = decide(queue(seen), pool, RULES, NOW, WARM)
    assert with_warm.power_on == () and [a.node_id for a in with_warm.drain] == ["a"]


@hypothesis_settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["stopped", "idle", "busy"]), st.floats(0, 4000)),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.tuples(st.floats(0, 1200), st.integers(1, 6)), max_size=6),
    st.integers(0, 4),
    st.floats(0, 1, exclude_max=True),
)
def test_the_reserve_keeps_every_rule_and_its_recheck_time(
    kinds: list[tuple[str, float]],
    arrivals: list[tuple[float, int]],
    pending: int,
    fraction: float,
) -> None:
    pool, seen = [], []
    for i, (kind, seconds) in enumerate(kinds):
        name = f"n{i}"
        if kind == "stopped":
            pool.append(stopped(name))
            seen.append(down(name))
        else:
            pool.append(running(name))
            if kind == "idle":
                seen.append(idle(name, seconds))
            else:
                seen.append(SchedulerNode(name=name, activity=NodeActivity.BUSY, cpus=1))
    snap, outlook = queue(seen, pending), arrived(*arrivals)
    decision = decide(snap, pool, RULES, NOW, WARM, outlook)
    warm = warm_reserve(outlook, NOW, WARM)[0]
    assert warm <= WARM.warm_max_nodes
    kind_of = {f"n{i}": kind for i, (kind, _) in enumerate(kinds)}
    assert all(kind_of[a.node_id] == "stopped" for a in decision.power_on)
    assert len(decision.power_on) <= max(0, pending + warm - decision.supply_nodes)
    assert all(kind_of[a.node_id] == "idle" for a in decision.drain)
    # idle nodes beyond the waiting jobs and the reserve go first; the reserve stays inside
    # warm_idle_seconds
    for action in decision.drain:
        if "warm reserve" in action.reason:
            assert kinds[int(action.node_id[1:])][1] >= WARM.warm_idle_seconds
    if decision.recheck_at is not None:
        assert decision.recheck_at > NOW
        span = (decision.recheck_at - NOW) // timedelta(microseconds=1)
        later = NOW + timedelta(microseconds=int(span * fraction))
        again = decide(snap, pool, RULES, later, WARM, outlook)
        assert [a.node_id for a in again.power_on] == [a.node_id for a in decision.power_on]
        assert [a.node_id for a in again.drain] == [a.node_id for a in decision.drain]
