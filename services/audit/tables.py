"""audit's tables, and the statements the service runs on them.

`audit_alerts`: one row per alert, unique on the rule's deduplication key, with the raw message.
`audit_acknowledgements`: one row per acknowledged alert; its primary key is what refuses a second
acknowledgement whatever the number of API processes, and nothing deletes from it (its foreign key
also keeps an acknowledged alert from being deleted). `audit_notifications`: every notification
sent. `audit_status`: the worker's last word on each queue and on the notifier, which the API's
readiness reads, the worker having no HTTP port of its own.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field
from sqlalchemy import (
    Boolean,
    Column,
    ForeignKey,
    Integer,
    Select,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.audit.alerts import Acknowledgement, Action, AlertState, Status, record
from services.audit.rules import Alert, Severity
from shared.outbox import mailbox_tables
from shared.store import UtcDateTime, metadata, upsert

MAILBOX = mailbox_tables("audit")
MAX_KEY = 200  # longer deduplication keys (never from AWS itself) are stored as their digest


class Source(StrEnum):
    QUEUE = "queue"  # the security-event queue
    DEAD_LETTER = "dead-letter"  # its dead-letter queue
    HPCFLEET = "hpcfleet"  # an operator action recorded by hpcfleet itself


alerts = Table(
    "audit_alerts",
    metadata,
    Column("alert_id", String(36), primary_key=True),
    Column("dedup_key", String(MAX_KEY), nullable=False, unique=True),
    Column("rule", String(60), nullable=False),
    Column("severity", String(10), nullable=False),
    # what the event says, as classified: Text, since an event's fields have no length we control
    Column("title", Text, nullable=False),
    Column("what", Text, nullable=False),
    Column("who", Text, nullable=False),
    Column("account", Text, nullable=True),
    Column("region", Text, nullable=True),
    Column("source_ip", Text, nullable=True),
    Column("occurred_at", UtcDateTime, nullable=True),
    Column("source", String(20), nullable=False),
    Column("message_id", String(100), nullable=True),  # the SQS message id
    Column("raw", Text, nullable=False),
    Column("opened_at", UtcDateTime, nullable=False, index=True),
    Column("notifications", Integer, nullable=False, server_default="0"),
    Column("last_notified_at", UtcDateTime, nullable=True),
    Column("escalated_at", UtcDateTime, nullable=True),
)

acknowledgements = Table(
    "audit_acknowledgements",
    metadata,
    Column("alert_id", String(36), ForeignKey(alerts.c.alert_id), primary_key=True),
    Column("acknowledged_by", String(200), nullable=False),
    Column("acknowledged_at", UtcDateTime, nullable=False),
    Column("comment", Text, nullable=False),
)

notifications = Table(
    "audit_notifications",
    metadata,
    Column("alert_id", String(36), ForeignKey(alerts.c.alert_id), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("kind", String(10), nullable=False),
    Column("escalated", Boolean, nullable=False),
    Column("sent_at", UtcDateTime, nullable=False),
    Column("channels", String(100), nullable=False),
)

checks = Table(
    "audit_status",
    metadata,
    Column("component", String(20), primary_key=True),  # "queue", "dead-letter", "notify"
    Column("checked_at", UtcDateTime, nullable=False),
    Column("ok_at", UtcDateTime, nullable=True),
    Column("error", Text, nullable=True),  # null: the last check succeeded
)


class AlertRecord(BaseModel):
    """An alert as stored: what the API lists and what a notification says."""

    model_config = ConfigDict(frozen=True)

    alert_id: str
    key: str = Field(description="Deduplication key: CloudTrail event id, SNS id or a digest.")
    rule: str = Field(description="The rule that matched, e.g. iam-policy-change.")
    severity: Severity
    title: str
    what: str
    who: str
    account: str | None
    region: str | None
    source_ip: str | None
    occurred_at: datetime | None = Field(description="When the event happened, if it says.")
    source: Source
    opened_at: datetime = Field(description="When audit recorded the alert.")
    notifications: int = Field(description="Notifications sent so far.")
    last_notified_at: datetime | None
    escalated_at: datetime | None
    acknowledgement: Acknowledgement | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> Status:
        return self.state.status

    @property
    def state(self) -> AlertState:
        """What the lifecycle (services.audit.alerts) needs."""
        return AlertState(
            alert_id=self.alert_id,
            severity=self.severity,
            opened_at=self.opened_at,
            notifications=self.notifications,
            last_notified_at=self.last_notified_at,
            escalated_at=self.escalated_at,
            acknowledgement=self.acknowledgement,
        )


class SentNotification(BaseModel):
    attempt: int
    kind: str
    escalated: bool
    sent_at: datetime
    channels: list[str]


class StatusRow(BaseModel):
    component: str
    checked_at: datetime
    ok_at: datetime | None
    error: str | None


def clean(text: str) -> str:
    """Text both stores accept: PostgreSQL refuses NUL, and no driver encodes a lone surrogate
    (JSON lets an event carry both), so one crafted field cannot keep an alert out."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _optional(text: str | None) -> str | None:
    return None if text is None else clean(text)


def _key(key: str) -> str:
    key = clean(key)
    if len(key) <= MAX_KEY:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def insert_alert(
    conn: AsyncConnection,
    alert: Alert,
    *,
    raw: str,
    source: Source,
    at: datetime,
    message_id: str | None = None,
) -> tuple[str, bool]:
    """Store `alert` unless an alert with its key exists: (the alert's id, whether it is new)."""
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    alert_id = str(uuid.uuid4())
    key = _key(alert.key)
    result = await conn.execute(
        dialect_insert(alerts)
        .values(
            alert_id=alert_id,
            dedup_key=key,
            rule=alert.rule,
            severity=alert.severity.value,
            title=clean(alert.title),
            what=clean(alert.what),
            who=clean(alert.who),
            account=_optional(alert.account),
            region=_optional(alert.region),
            source_ip=_optional(alert.source_ip),
            occurred_at=alert.occurred_at,
            source=source.value,
            message_id=message_id,
            raw=clean(raw),
            opened_at=at,
        )
        .on_conflict_do_nothing(index_elements=["dedup_key"])
    )
    if result.rowcount:
        return alert_id, True
    known = await conn.execute(select(alerts.c.alert_id).where(alerts.c.dedup_key == key))
    return known.scalar_one(), False


def _alerts_query() -> Select[Any]:
    columns = [c for c in alerts.c if c.name not in ("raw", "message_id")]
    return select(
        *columns,
        acknowledgements.c.acknowledged_by,
        acknowledgements.c.acknowledged_at,
        acknowledgements.c.comment,
    ).select_from(alerts.outerjoin(acknowledgements))


def _record(row: Any) -> AlertRecord:
    ack = None
    if row.acknowledged_by is not None:
        ack = Acknowledgement(row.acknowledged_by, row.acknowledged_at, row.comment)
    return AlertRecord(
        alert_id=row.alert_id,
        key=row.dedup_key,
        rule=row.rule,
        severity=Severity(row.severity),
        title=row.title,
        what=row.what,
        who=row.who,
        account=row.account,
        region=row.region,
        source_ip=row.source_ip,
        occurred_at=row.occurred_at,
        source=Source(row.source),
        opened_at=row.opened_at,
        notifications=row.notifications,
        last_notified_at=row.last_notified_at,
        escalated_at=row.escalated_at,
        acknowledgement=ack,
    )


async def find_alerts(
    conn: AsyncConnection,
    *,
    acknowledged: bool | None = None,
    severities: Iterable[Severity] = (),
    limit: int | None = None,
) -> list[AlertRecord]:
    """Alerts, newest first; `acknowledged` False: only those nobody acknowledged yet."""
    query = _alerts_query().order_by(alerts.c.opened_at.desc(), alerts.c.alert_id)
    if acknowledged is not None:
        ack = acknowledgements.c.alert_id
        query = query.where(ack.is_not(None) if acknowledged else ack.is_(None))
    wanted = [s.value for s in severities]
    if wanted:
        query = query.where(alerts.c.severity.in_(wanted))
    if limit is not None:
        query = query.limit(limit)
    return [_record(row) for row in await conn.execute(query)]


async def get_alert(conn: AsyncConnection, alert_id: str) -> AlertRecord | None:
    row = (await conn.execute(_alerts_query().where(alerts.c.alert_id == alert_id))).first()
    return None if row is None else _record(row)


async def raw_message(conn: AsyncConnection, alert_id: str) -> str:
    query = select(alerts.c.raw).where(alerts.c.alert_id == alert_id)
    return str((await conn.execute(query)).scalar_one())


async def sent_notifications(conn: AsyncConnection, alert_id: str) -> list[SentNotification]:
    query = (
        select(notifications)
        .where(notifications.c.alert_id == alert_id)
        .order_by(notifications.c.attempt)
    )
    return [
        SentNotification(
            attempt=row.attempt,
            kind=row.kind,
            escalated=row.escalated,
            sent_at=row.sent_at,
            channels=row.channels.split(","),
        )
        for row in await conn.execute(query)
    ]


async def record_notification(
    conn: AsyncConnection,
    before: AlertState,
    action: Action,
    at: datetime,
    channels: Sequence[str],
) -> AlertState | None:
    """Record `action` as sent at `at`; None if another process recorded this attempt first."""
    after = record(before, action, at)
    moved = await conn.execute(
        update(alerts)
        .where(
            alerts.c.alert_id == before.alert_id,
            alerts.c.notifications == before.notifications,
        )
        .values(
            notifications=after.notifications,
            last_notified_at=after.last_notified_at,
            escalated_at=after.escalated_at,
        )
    )
    if moved.rowcount != 1:
        return None
    await conn.execute(
        insert(notifications).values(
            alert_id=before.alert_id,
            attempt=action.attempt,
            kind=action.kind.value,
            escalated=action.escalated,
            sent_at=at,
            channels=",".join(channels),
        )
    )
    return after


async def insert_acknowledgement(
    conn: AsyncConnection, alert_id: str, acknowledgement: Acknowledgement
) -> None:
    """Raises IntegrityError when the alert was acknowledged already."""
    await conn.execute(
        insert(acknowledgements).values(
            alert_id=alert_id,
            acknowledged_by=acknowledgement.by,
            acknowledged_at=acknowledgement.at,
            comment=acknowledgement.comment,
        )
    )


async def set_status(
    conn: AsyncConnection, component: str, at: datetime, error: str | None
) -> None:
    """Record a check of `component`: `error` None when it succeeded."""
    values: dict[str, Any] = {"component": component, "checked_at": at, "error": error}
    if error is None:
        values["ok_at"] = at
    await upsert(conn, checks, values, keys=["component"])


async def load_status(conn: AsyncConnection) -> dict[str, StatusRow]:
    rows = (await conn.execute(select(checks))).mappings().all()
    return {row["component"]: StatusRow.model_validate(dict(row)) for row in rows}
