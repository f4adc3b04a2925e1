"""Notifications: what `alerts.next_actions` says is due, sent to SNS and/or a webhook, recorded.

A notification counts as sent once every configured channel took it; until then it is not
recorded, so it comes out of `next_actions` again after a back-off: a healthy channel may repeat
one, no channel loses one. A pass stops at the first failure (a channel that is down would fail
the rest too) and reports it in `audit_status` for readiness.

SNS gets plain text, for the e-mail subscribers audit.yaml creates, with message attributes
(`severity`, `kind`, `escalated`, `rule`) for subscription filter policies: escalation contacts
subscribe with the filter {"escalated": ["true"]}. The webhook gets JSON with a `text` field,
which Slack- and Teams-style receivers show as it is, and the whole alert beside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aioboto3
import httpx
from botocore.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

from services.audit.alerts import Action, ActionKind, Escalation, next_actions, next_due
from services.audit.rules import Severity
from services.audit.tables import AlertRecord, find_alerts, record_notification, set_status
from shared.clock import Clock

log = logging.getLogger(__name__)

SUBJECT_LENGTH = 99  # SNS: under 100 characters, one line
WHAT_LENGTH = 4000  # keeps a message far below SNS's 256 KB whatever the event held


@dataclass(frozen=True)
class Notification:
    """One notification of one alert, in the forms the channels send."""

    alert: AlertRecord
    action: Action
    link: str | None  # the alert in the audit API, when its public URL is configured

    @property
    def subject(self) -> str:
        attempt = self.action.attempt
        if self.action.kind is ActionKind.ESCALATE:
            label = "ESCALATED: "
        elif self.action.kind is ActionKind.RENOTIFY:
            label = f"{'ESCALATED, ' if self.action.escalated else ''}reminder {attempt - 1}: "
        else:
            label = ""
        subject = f"[{self.alert.severity.value.upper()}] {label}{self.alert.title}"
        return "".join(c if c.isprintable() else " " for c in subject)[:SUBJECT_LENGTH]

    @property
    def text(self) -> str:
        alert, action = self.alert, self.action
        where = ", ".join(
            part
            for part in (
                f"account {alert.account}" if alert.account else None,
                alert.region,
                f"from {alert.source_ip}" if alert.source_ip else None,
            )
            if part
        )
        ack = f"{self.link}/ack" if self.link else f"/audit/alerts/{alert.alert_id}/ack"
        return "\n".join(
            [
                alert.title,
                "",
                f"What: {alert.what[:WHAT_LENGTH]}",
                f"Who: {alert.who}",
                f"Where: {where or 'unknown'}",
                f"When: {alert.occurred_at or 'not stated'} (recorded {alert.opened_at})",
                f"Severity: {alert.severity.value}; rule: {alert.rule}; from: {alert.source.value}",
                "",
                f"Notification {action.attempt} ({action.kind.value}"
                f"{', escalated' if action.escalated else ''}). It repeats until someone "
                "acknowledges the alert:",
                f'POST {ack} with {{"who": "...", "comment": "..."}}',
            ]
        )

    @property
    def attributes(self) -> dict[str, dict[str, str]]:
        """SNS message attributes, for subscription filter policies."""
        values = {
            "severity": self.alert.severity.value,
            "kind": self.action.kind.value,
            "escalated": "true" if self.action.escalated else "false",
            "rule": self.alert.rule,
        }
        return {k: {"DataType": "String", "StringValue": v} for k, v in values.items()}

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON."""
        return {
            "text": f"{self.subject}\n{self.text}",
            "alert": self.alert.model_dump(mode="json"),
            "notification": {
                "kind": self.action.kind.value,
                "attempt": self.action.attempt,
                "escalated": self.action.escalated,
            },
            "link": self.link,
        }


class Channel(Protocol):
    name: str

    async def send(self, notification: Notification) -> None:
        """Deliver, or raise."""


class SnsChannel:
    """SNS Publish to the alert topic, in the topic's own region; no botocore retries."""

    name = "sns"

    def __init__(
        self, session: aioboto3.Session, topic_arn: str, *, endpoint_url: str | None
    ) -> None:
        self.session = session
        self.topic_arn = topic_arn
        self.region = topic_arn.split(":")[3]
        self.endpoint_url = endpoint_url
        self._config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=10,
        )

    async def send(self, notification: Notification) -> None:
        async with self.session.client(
            "sns", region_name=self.region, endpoint_url=self.endpoint_url, config=self._config
        ) as sns:
            await sns.publish(
                TopicArn=self.topic_arn,
                Subject=notification.subject,
                Message=notification.text,
                MessageAttributes=notification.attributes,
            )


class WebhookError(Exception):
    """The webhook did not take a notification; the message never holds the URL (a secret)."""


class WebhookChannel:
    """POST JSON to a webhook; any answer but 2xx is a failure, and redirects are not followed."""

    name = "webhook"

    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self.host = urlsplit(url).hostname or "?"
        self.timeout = timeout

    async def send(self, notification: Notification) -> None:
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
                response = await http.post(self.url, json=notification.payload())
        except httpx.HTTPError as exc:
            raise WebhookError(f"webhook at {self.host}: {type(exc).__name__}") from None
        if not response.is_success:
            raise WebhookError(f"webhook at {self.host} answered HTTP {response.status_code}")


class Notifier:
    """One pass: send what is due, record it, and say when the next is due."""

    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        channels: Sequence[Channel],
        policy: Mapping[Severity, Escalation],
        *,
        batch: int,
        api_url: str | None,
    ) -> None:
        if not channels:
            raise ValueError("a notifier needs at least one channel")
        self.engine = engine
        self.clock = clock
        self.channels = channels
        self.policy = policy
        self.batch = batch
        self.api_url = api_url.rstrip("/") if api_url else None

    async def reconcile(self) -> float | None:
        """Seconds until the next notification is due (inf: none), or None when a send failed."""
        async with self.engine.connect() as conn:
            found = {a.alert_id: a for a in await find_alerts(conn, acknowledged=False)}
        states = {alert_id: alert.state for alert_id, alert in found.items()}
        due = next_actions(states.values(), self.clock.now(), self.policy)
        error: str | None = None
        for action in due[: self.batch]:
            alert = found[action.alert_id]
            try:
                await self._send(Notification(alert, action, self._link(alert)))
            except Exception as exc:
                error = f"cannot notify alert {alert.alert_id}: {type(exc).__name__}: {exc}"
                break
            async with self.engine.begin() as conn:
                after = await record_notification(
                    conn,
                    states[action.alert_id],
                    action,
                    self.clock.now(),
                    [c.name for c in self.channels],
                )
            if after is None:  # another worker recorded it: its next turn comes from the store
                del states[action.alert_id]
            else:
                states[action.alert_id] = after
        await self._status(error)
        if error is not None:
            return None
        upcoming = next_due(states.values(), self.policy)
        return math.inf if upcoming is None else (upcoming - self.clock.now()).total_seconds()

    async def _send(self, notification: Notification) -> None:
        for channel in self.channels:
            await channel.send(notification)
        log.info(
            "notified alert %s (%s, attempt %d) by %s",
            notification.alert.alert_id,
            notification.action.kind.value,
            notification.action.attempt,
            ", ".join(c.name for c in self.channels),
        )

    def _link(self, alert: AlertRecord) -> str | None:
        return f"{self.api_url}/audit/alerts/{alert.alert_id}" if self.api_url else None

    async def _status(self, error: str | None) -> None:
        if error is not None:
            log.warning("%s; retrying after a back-off", error)
        try:
            async with self.engine.begin() as conn:
                await set_status(conn, "notify", self.clock.now(), error)
        except Exception as exc:
            log.warning("cannot record the notifier's status: %s: %s", type(exc).__name__, exc)
