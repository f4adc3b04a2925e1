"""services/audit/alerts.py: when an alert is notified, repeated, escalated, and then silent."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.audit.alerts import (
    DEFAULT_ESCALATION,
    Acknowledgement,
    Action,
    ActionKind,
    AlertState,
    AlreadyAcknowledged,
    Escalation,
    Status,
    acknowledge,
    next_actions,
    next_due,
    opened,
    record,
)
from services.audit.rules import Severity

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
POLICY = {
    Severity.CRITICAL: Escalation(renotify_every=10 * MIN, escalate_after=30 * MIN),
    Severity.HIGH: Escalation(renotify_every=10 * MIN, escalate_after=30 * MIN),
    Severity.MEDIUM: Escalation(renotify_every=10 * MIN, escalate_after=30 * MIN),
    Severity.LOW: Escalation(renotify_every=10 * MIN, escalate_after=None),
}


def _alert(
    severity: Severity = Severity.HIGH,
    notified: Sequence[int] = (),
    escalated: int | None = None,
    acked: int | None = None,
) -> AlertState:
    """An alert opened at T0, notified at these minutes, escalated / acknowledged at those."""
    return AlertState(
        alert_id="a",
        severity=severity,
        opened_at=T0,
        notifications=len(notified),
        last_notified_at=T0 + notified[-1] * MIN if notified else None,
        escalated_at=None if escalated is None else T0 + escalated * MIN,
        acknowledgement=None if acked is None else Acknowledgement("x", T0 + acked * MIN),
    )


CASES = [
    # alert, minutes after T0, expected (kind, escalated, attempt) or None
    ("new alert: told at once", _alert(), 0, (ActionKind.NOTIFY, False, 1)),
    ("told, quiet until the repeat", _alert(notified=[0]), 9, None),
    ("repeat when due", _alert(notified=[0]), 10, (ActionKind.RENOTIFY, False, 2)),
    (
        "escalation beats a due repeat",
        _alert(notified=[0, 10, 20]),
        30,
        (ActionKind.ESCALATE, True, 4),
    ),
    (
        "escalation comes at its time",
        _alert(notified=[0, 10, 20, 29]),
        30,
        (ActionKind.ESCALATE, True, 5),
    ),
    ("escalated, quiet until the repeat", _alert(notified=[0, 10, 20, 30], escalated=30), 39, None),
    (
        "escalated repeats go up too",
        _alert(notified=[0, 10, 20, 30], escalated=30),
        40,
        (ActionKind.RENOTIFY, True, 5),
    ),
    ("acknowledged: silent", _alert(notified=[0], acked=5), 500, None),
    ("acknowledged before told: silent", _alert(acked=0), 0, None),
    (
        "low never escalates",
        _alert(Severity.LOW, notified=[0, 10, 20]),
        30,
        (ActionKind.RENOTIFY, False, 4),
    ),
    ("told late after an outage: told first", _alert(), 120, (ActionKind.NOTIFY, False, 1)),
    ("then escalated right away", _alert(notified=[120]), 120, (ActionKind.ESCALATE, True, 2)),
]


@pytest.mark.parametrize(
    ("alert", "minute", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_next_actions(
    alert: AlertState, minute: int, expected: tuple[ActionKind, bool, int] | None
) -> None:
    actions = next_actions([alert], T0 + minute * MIN, POLICY)
    if expected is None:
        assert actions == []
    else:
        (action,) = actions
        assert (action.kind, action.escalated, action.attempt) == expected
        assert (action.alert_id, action.severity) == (alert.alert_id, alert.severity)


def test_a_whole_life_on_the_default_policy_for_a_critical_alert() -> None:
    """Notified at once, every 15 minutes, escalated at 30, silent once acknowledged at 50."""
    alert = opened("root-1", Severity.CRITICAL, T0)
    timeline = []
    for minute in range(0, 120):
        now = T0 + minute * MIN
        if minute == 50:
            alert = acknowledge(alert, "alice@corp.example", now, "my console login, sorry")
        for action in next_actions([alert], now):
            timeline.append((minute, action.kind.value, action.escalated))
            alert = record(alert, action, now)
    assert timeline == [
        (0, "notify", False),
        (15, "renotify", False),
        (30, "escalate", True),
        (45, "renotify", True),
    ]
    assert alert.status is Status.ACKNOWLEDGED
    assert alert.acknowledgement is not None
    assert (alert.acknowledgement.by, alert.acknowledgement.at) == (
        "alice@corp.example",
        T0 + 50 * MIN,
    )
    assert alert.acknowledgement.comment == "my console login, sorry"
    assert (alert.notifications, alert.escalated_at) == (4, T0 + 30 * MIN)


def test_the_status_follows_the_life() -> None:
    alert = opened("a", Severity.HIGH, T0)
    assert alert.status is Status.OPEN
    (notify,) = next_actions([alert], T0, POLICY)
    alert = record(alert, notify, T0)
    assert alert.status is Status.NOTIFIED
    (escalate,) = next_actions([alert], T0 + 30 * MIN, POLICY)
    alert = record(alert, escalate, T0 + 30 * MIN)
    assert alert.status is Status.ESCALATED
    assert acknowledge(alert, "bob", T0 + 31 * MIN).status is Status.ACKNOWLEDGED


def test_a_failed_send_is_simply_due_again() -> None:
    """Nothing recorded, nothing changed: the next tick asks for the same notification."""
    alert = opened("a", Severity.HIGH, T0)
    first = next_actions([alert], T0, POLICY)
    assert next_actions([alert], T0 + MIN, POLICY) == first


def test_most_severe_then_oldest_first() -> None:
    alerts = [
        opened("low-old", Severity.LOW, T0),
        opened("high-new", Severity.HIGH, T0 + MIN),
        opened("critical", Severity.CRITICAL, T0 + 2 * MIN),
        opened("high-old", Severity.HIGH, T0),
    ]
    order = [a.alert_id for a in next_actions(alerts, T0 + 5 * MIN, POLICY)]
    assert order == ["critical", "high-old", "high-new", "low-old"]


@pytest.mark.parametrize(
    ("alert", "due"),
    [
        (_alert(), T0),
        (_alert(notified=[0]), T0 + 10 * MIN),
        (_alert(notified=[0, 10, 20, 25]), T0 + 30 * MIN),  # escalation before the repeat
        (_alert(notified=[0, 10, 20, 30], escalated=30), T0 + 40 * MIN),
        (_alert(Severity.LOW, notified=[0, 10, 20, 25]), T0 + 35 * MIN),
        (_alert(notified=[0], acked=1), None),
    ],
)
def test_next_due_says_when_to_wake(alert: AlertState, due: datetime | None) -> None:
    assert next_due([alert], POLICY) == due
    if due is not None:  # something at it, and nothing before it once told
        assert next_actions([alert], due, POLICY)
        if alert.last_notified_at is not None:
            assert next_actions([alert], due - timedelta(seconds=1), POLICY) == []


def test_next_due_of_many_is_the_earliest_and_of_none_is_none() -> None:
    assert next_due([], POLICY) is None
    later, sooner = _alert(notified=[0]), _alert(notified=[5])
    assert next_due([sooner, later], POLICY) == T0 + 10 * MIN


def test_an_acknowledgement_is_made_once_and_kept() -> None:
    alert = acknowledge(opened("a", Severity.HIGH, T0), "alice", T0 + MIN, "looking")
    with pytest.raises(AlreadyAcknowledged) as twice:
        acknowledge(alert, "bob", T0 + 2 * MIN, "me too")
    assert twice.value.alert_id == "a"
    assert twice.value.first == alert.acknowledgement
    assert alert.acknowledgement is not None and alert.acknowledgement.by == "alice"


@pytest.mark.parametrize(("by", "minute"), [("", 1), ("   ", 1), ("alice", -1)])
def test_an_acknowledgement_names_someone_and_comes_after_the_alert(by: str, minute: int) -> None:
    with pytest.raises(ValueError):
        acknowledge(opened("a", Severity.HIGH, T0), by, T0 + minute * MIN)


def test_a_notification_is_recorded_on_its_own_alert_only() -> None:
    action = Action(ActionKind.NOTIFY, "other", Severity.HIGH, escalated=False, attempt=1)
    with pytest.raises(ValueError):
        record(opened("a", Severity.HIGH, T0), action, T0)


def test_the_first_escalation_time_is_kept() -> None:
    alert = _alert(notified=[0, 30], escalated=30)
    again = Action(ActionKind.ESCALATE, "a", Severity.HIGH, escalated=True, attempt=3)
    assert record(alert, again, T0 + 40 * MIN).escalated_at == T0 + 30 * MIN


@pytest.mark.parametrize(
    ("renotify", "escalate"), [(timedelta(0), None), (-MIN, None), (MIN, -MIN)]
)
def test_an_escalation_policy_must_make_sense(
    renotify: timedelta, escalate: timedelta | None
) -> None:
    with pytest.raises(ValueError):
        Escalation(renotify, escalate)


def test_the_default_policy_is_louder_for_worse_alerts() -> None:
    ordered = [DEFAULT_ESCALATION[s] for s in sorted(Severity, key=lambda s: s.rank, reverse=True)]
    gaps = [e.renotify_every for e in ordered]
    assert gaps == sorted(gaps)
    assert DEFAULT_ESCALATION[Severity.CRITICAL].escalate_after == 30 * MIN


@given(
    severity=st.sampled_from(Severity),
    ticks=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=60),
    ack_after=st.one_of(st.none(), st.integers(min_value=0, max_value=60)),
)
def test_an_alert_is_never_silent_too_long_never_spammed_escalated_once_then_quiet(
    severity: Severity, ticks: list[int], ack_after: int | None
) -> None:
    """A reconcile loop ticking at irregular intervals, against the default policy."""
    policy = DEFAULT_ESCALATION[severity]
    alert = opened("a", severity, T0)
    now = T0
    sent: list[tuple[datetime, ActionKind]] = []
    for index, gap in enumerate([0, *ticks]):
        now += gap * MIN
        if ack_after is not None and index == ack_after and alert.acknowledgement is None:
            alert = acknowledge(alert, "alice", now)
        actions = next_actions([alert], now)
        assert len(actions) <= 1
        for action in actions:
            assert alert.acknowledgement is None  # acknowledged: silent for good
            sent.append((now, action.kind))
            alert = record(alert, action, now)
        if alert.acknowledgement is None:  # bounded silence: at most one tick late
            assert alert.last_notified_at is not None
            assert now - alert.last_notified_at < policy.renotify_every
    kinds = [kind for _, kind in sent]
    assert kinds[:1] in ([], [ActionKind.NOTIFY]) and kinds.count(ActionKind.NOTIFY) <= 1
    assert kinds.count(ActionKind.ESCALATE) <= 1
    if policy.escalate_after is None:
        assert ActionKind.ESCALATE not in kinds
    for (before, _), (after, kind) in itertools.pairwise(sent):
        if kind is ActionKind.RENOTIFY:  # never more often than the policy says
            assert after - before >= policy.renotify_every
    for when, kind in sent:
        if kind is ActionKind.ESCALATE:
            assert policy.escalate_after is not None and when >= T0 + policy.escalate_after
