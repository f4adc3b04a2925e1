"""The life of an alert until someone owns it: notify, re-notify, escalate, acknowledge.

open -> notified -> re-notified every `renotify_every` -> escalated once `escalate_after` has
passed since it opened -> acknowledged (by whom, when, why), after which it is silent for good.

Level-triggered like the rest of hpcfleet: `next_actions(alerts, now)` reads the alerts' state and
says what is due; the caller sends, then records each sent notification with `record`. A send that
failed is simply not recorded and comes out of `next_actions` again on the next tick; a crash
between sending and recording re-sends once, never loses one. No I/O, the clock passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from services.audit.rules import Severity


@dataclass(frozen=True)
class Escalation:
    """How insistently an unacknowledged alert of one severity is repeated, and when it goes up."""

    renotify_every: timedelta
    escalate_after: timedelta | None  # None: never escalated, only repeated

    def __post_init__(self) -> None:
        if self.renotify_every <= timedelta(0):
            raise ValueError("renotify_every must be positive")
        if self.escalate_after is not None and self.escalate_after < timedelta(0):
            raise ValueError("escalate_after must not be negative")


DEFAULT_ESCALATION: Mapping[Severity, Escalation] = {
    Severity.CRITICAL: Escalation(timedelta(minutes=15), timedelta(minutes=30)),
    Severity.HIGH: Escalation(timedelta(minutes=30), timedelta(hours=2)),
    Severity.MEDIUM: Escalation(timedelta(hours=4), timedelta(hours=24)),
    Severity.LOW: Escalation(timedelta(hours=24), None),
}


class Status(StrEnum):
    OPEN = "open"  # recorded, nobody told yet
    NOTIFIED = "notified"
    ESCALATED = "escalated"
    ACKNOWLEDGED = "acknowledged"


@dataclass(frozen=True)
class Acknowledgement:
    """Who took the alert, when, and why; kept for good (an acknowledgement is never undone)."""

    by: str
    at: datetime
    comment: str = ""


class AlreadyAcknowledged(Exception):
    """An alert is acknowledged once; the first acknowledgement stands."""

    def __init__(self, alert_id: str, first: Acknowledgement) -> None:
        super().__init__(f"alert {alert_id} was already acknowledged by {first.by} at {first.at}")
        self.alert_id = alert_id
        self.first = first


@dataclass(frozen=True)
class AlertState:
    """What the lifecycle needs to know about one alert (the store keeps the rest)."""

    alert_id: str
    severity: Severity
    opened_at: datetime
    notifications: int = 0
    last_notified_at: datetime | None = None
    escalated_at: datetime | None = None
    acknowledgement: Acknowledgement | None = None

    @property
    def status(self) -> Status:
        if self.acknowledgement is not None:
            return Status.ACKNOWLEDGED
        if self.escalated_at is not None:
            return Status.ESCALATED
        if self.notifications:
            return Status.NOTIFIED
        return Status.OPEN


class ActionKind(StrEnum):
    NOTIFY = "notify"  # the first notification
    RENOTIFY = "renotify"  # still unacknowledged
    ESCALATE = "escalate"  # tell the escalation contacts too, from now on


@dataclass(frozen=True)
class Action:
    """One notification to send now."""

    kind: ActionKind
    alert_id: str
    severity: Severity
    escalated: bool  # include the escalation contacts
    attempt: int  # 1 for the first notification


def opened(alert_id: str, severity: Severity, at: datetime) -> AlertState:
    """A new alert, nobody told yet."""
    return AlertState(alert_id=alert_id, severity=severity, opened_at=at)


def next_actions(
    alerts: Iterable[AlertState],
    now: datetime,
    policy: Mapping[Severity, Escalation] = DEFAULT_ESCALATION,
) -> list[Action]:
    """Every notification due at `now`, most severe and oldest first; at most one per alert."""
    due = [(alert, kind) for alert in alerts if (kind := _due(alert, now, policy[alert.severity]))]
    due.sort(key=lambda pair: (-pair[0].severity.rank, pair[0].opened_at, pair[0].alert_id))
    return [
        Action(
            kind=kind,
            alert_id=alert.alert_id,
            severity=alert.severity,
            escalated=kind is ActionKind.ESCALATE or alert.escalated_at is not None,
            attempt=alert.notifications + 1,
        )
        for alert, kind in due
    ]


def next_due(
    alerts: Iterable[AlertState], policy: Mapping[Severity, Escalation] = DEFAULT_ESCALATION
) -> datetime | None:
    """When `next_actions` will next have something to do, so a loop can sleep until then."""
    times = [t for alert in alerts if (t := _due_at(alert, policy[alert.severity])) is not None]
    return min(times, default=None)


def record(alert: AlertState, action: Action, at: datetime) -> AlertState:
    """The state after `action` was sent at `at`."""
    if action.alert_id != alert.alert_id:
        raise ValueError(f"action for {action.alert_id} recorded on alert {alert.alert_id}")
    escalating = action.kind is ActionKind.ESCALATE and alert.escalated_at is None
    return replace(
        alert,
        notifications=alert.notifications + 1,
        last_notified_at=at,
        escalated_at=at if escalating else alert.escalated_at,
    )


def acknowledge(alert: AlertState, by: str, at: datetime, comment: str = "") -> AlertState:
    """The acknowledged alert; raises AlreadyAcknowledged on a second acknowledgement."""
    if alert.acknowledgement is not None:
        raise AlreadyAcknowledged(alert.alert_id, alert.acknowledgement)
    if not by.strip():
        raise ValueError("an acknowledgement names who made it")
    if at < alert.opened_at:
        raise ValueError("an alert cannot be acknowledged before it opened")
    return replace(alert, acknowledgement=Acknowledgement(by=by.strip(), at=at, comment=comment))


def _due(alert: AlertState, now: datetime, escalation: Escalation) -> ActionKind | None:
    if alert.acknowledgement is not None:
        return None
    if alert.last_notified_at is None:
        return ActionKind.NOTIFY
    escalate_at = _escalation_at(alert, escalation)
    if escalate_at is not None and now >= escalate_at:
        return ActionKind.ESCALATE
    if now >= alert.last_notified_at + escalation.renotify_every:
        return ActionKind.RENOTIFY
    return None


def _due_at(alert: AlertState, escalation: Escalation) -> datetime | None:
    if alert.acknowledgement is not None:
        return None
    if alert.last_notified_at is None:
        return alert.opened_at
    renotify = alert.last_notified_at + escalation.renotify_every
    escalate = _escalation_at(alert, escalation)
    return renotify if escalate is None else min(renotify, escalate)


def _escalation_at(alert: AlertState, escalation: Escalation) -> datetime | None:
    """When this alert escalates, or None if it never will (again)."""
    if alert.escalated_at is not None or escalation.escalate_after is None:
        return None
    return alert.opened_at + escalation.escalate_after
