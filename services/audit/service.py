"""audit: security events and hpcfleet's own operator actions as alerts that stay open, repeat and
escalate until someone acknowledges them. This module wires settings, API, loops and readiness.

The worker runs two `PacedLoop`s: the intake (sqs.py) and the notifier (notify.py). The API lists
alerts and takes acknowledgements; its readiness reads what the worker last recorded about the
queues and the notifier. Operator actions come in through `ActionRecorder`, which a composition
root hands to the code that performs them: the message catalogue has no event for them (yet).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

import aioboto3
from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.audit.alerts import Acknowledgement, AlreadyAcknowledged, acknowledge
from services.audit.notify import Channel, Notifier, SnsChannel, WebhookChannel
from services.audit.rules import Alert, Severity
from services.audit.settings import AuditSettings
from services.audit.sqs import Intake, SqsQueue
from services.audit.tables import (
    MAILBOX,
    AlertRecord,
    SentNotification,
    Source,
    find_alerts,
    get_alert,
    insert_acknowledgement,
    insert_alert,
    load_status,
    raw_message,
    sent_notifications,
)
from shared.api import ReadinessCheck
from shared.clock import Clock
from shared.credentials import service_aws_access
from shared.loop import ReconcileLoop
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, Settings, load_settings
from shared.tokens import TokenClaims

log = logging.getLogger(__name__)

CONSUMER = "audit"
OPERATOR_RULE = "operator-action"


class PacedLoop(ReconcileLoop):
    """A reconcile loop whose pass says when to run next: after the seconds it returns (at most
    `interval`), or, when it returns None or raises, after a back-off that doubles from `retry`
    to `retry_max` with jitter. A kick still runs the next pass at once."""

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[float | None]],
        *,
        interval: float,
        retry: float,
        retry_max: float,
        clock: Clock,
    ) -> None:
        super().__init__(name, self._paced, interval=interval, clock=clock)
        self._paced_step = step
        self.longest = interval
        self.retry = retry
        self.retry_max = retry_max
        self.failed_in_a_row = 0

    def backoff(self, failures: int) -> float:
        return min(self.retry_max, self.retry * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)

    async def _paced(self) -> None:
        self.interval = self.backoff(self.failed_in_a_row + 1)  # stands if the step fails
        try:
            wait = await self._paced_step()
        except Exception:
            self.failed_in_a_row += 1
            raise
        if wait is None:
            self.failed_in_a_row += 1
            return
        self.failed_in_a_row = 0
        self.interval = min(self.longest, max(0.0, wait))


class AckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    who: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
        | None
    ) = Field(
        default=None,
        description="Who takes the alert: the token's subject when the API checks tokens (it "
        "may be left out, and must match if given); required when it does not.",
    )
    comment: str = Field(default="", max_length=2000, description="Why, what was done.")


class AlertDetail(AlertRecord):
    raw: str = Field(description="The message as it arrived (or the recorded operator action).")
    sent: list[SentNotification] = Field(description="Every notification sent, in order.")


def make_router(engine: AsyncEngine, clock: Clock) -> APIRouter:
    router = APIRouter(prefix="/audit", tags=["audit"])

    @router.get("/alerts", summary="Alerts, newest first.")
    async def list_alerts(
        acknowledged: Annotated[
            bool | None, Query(description="false: still open; true: acknowledged.")
        ] = None,
        severity: Annotated[
            list[Severity] | None, Query(description="Only these severities (repeatable).")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[AlertRecord]:
        async with engine.connect() as conn:
            return await find_alerts(
                conn, acknowledged=acknowledged, severities=severity or (), limit=limit
            )

    @router.get(
        "/alerts/{alert_id}",
        summary="One alert with its raw message and the notifications sent.",
        responses={404: {"description": "No such alert."}},
    )
    async def alert_detail(alert_id: uuid.UUID) -> AlertDetail:
        async with engine.connect() as conn:
            alert = await _existing(conn, alert_id)
            raw = await raw_message(conn, alert.alert_id)
            sent = await sent_notifications(conn, alert.alert_id)
        return AlertDetail(**alert.model_dump(exclude={"status"}), raw=raw, sent=sent)

    @router.post(
        "/alerts/{alert_id}/ack",
        summary="Acknowledge an alert: it is silent from now on. Once, and for good.",
        responses={
            404: {"description": "No such alert."},
            409: {"description": "Already acknowledged (the answer says by whom)."},
        },
    )
    async def acknowledge_alert(
        alert_id: uuid.UUID, body: AckRequest, request: Request
    ) -> AlertRecord:
        who = _acknowledger(request, body.who)
        try:
            async with engine.begin() as conn:
                alert = await _existing(conn, alert_id)
                try:
                    acked = acknowledge(alert.state, who, clock.now(), body.comment)
                except AlreadyAcknowledged as exc:
                    raise _already(alert.alert_id, exc.first) from None
                except ValueError as exc:
                    raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
                assert acked.acknowledgement is not None
                await insert_acknowledgement(conn, alert.alert_id, acked.acknowledgement)
        except IntegrityError:  # another request acknowledged it since we read it
            async with engine.connect() as conn:
                first = (await _existing(conn, alert_id)).acknowledgement
            assert first is not None
            raise _already(str(alert_id), first) from None
        log.info("alert %s acknowledged by %s", alert.alert_id, acked.acknowledgement.by)
        return alert.model_copy(update={"acknowledgement": acked.acknowledgement})

    return router


def _acknowledger(request: Request, who: str | None) -> str:
    """Whoever the verified token names, when the API checks tokens (`shared.api.ApiGuard`): the
    author of an acknowledgement is not the caller's to make up. Without a token check (a local
    rehearsal), the body names who."""
    claims = getattr(request.state, "claims", None)
    if not isinstance(claims, TokenClaims):
        if who is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                'say who acknowledges: {"who": "..."} (this API checks no tokens)',
            )
        return who
    if who is not None and who != claims.subject:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"acknowledge as yourself: the token is {claims.subject}'s, not {who}'s",
        )
    return claims.subject


async def _existing(conn: AsyncConnection, alert_id: uuid.UUID) -> AlertRecord:
    alert = await get_alert(conn, str(alert_id))
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}")
    return alert


def _already(alert_id: str, first: Acknowledgement) -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        f"alert {alert_id} was acknowledged by {first.by} at {first.at.isoformat()}; "
        "an acknowledgement is made once and stands",
    )


class ActionRecorder:
    """Records hpcfleet's own operator actions (who resized a pool, who started a build) as
    alerts, so that someone else sees and acknowledges them like any security event.

    A composition root builds one on the shared engine and hands `record` to the code that
    performs the action. Passing the id of what the action emitted (a command's message id) as
    `action_id` makes a retried call one alert.
    """

    def __init__(
        self, engine: AsyncEngine, clock: Clock, on_recorded: Callable[[], None] = lambda: None
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.on_recorded = on_recorded

    async def record(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        detail: str = "",
        severity: Severity = Severity.LOW,
        action_id: str | None = None,
    ) -> str:
        """The alert's id."""
        if not actor.strip() or not action.strip():
            raise ValueError("an operator action names who did what")
        action_id = action_id or str(uuid.uuid4())
        now = self.clock.now()
        alert = Alert(
            key=f"hpcfleet:{action_id}",
            rule=OPERATOR_RULE,
            severity=severity,
            title=f"hpcfleet operator action: {action}",
            what=f"{action} on {target}" + (f": {detail}" if detail else ""),
            who=actor.strip(),
            account=None,
            region=None,
            source_ip=None,
            occurred_at=now,
        )
        raw = json.dumps(
            {
                "action_id": action_id,
                "actor": actor,
                "action": action,
                "target": target,
                "detail": detail,
            }
        )
        async with self.engine.begin() as conn:
            alert_id, new = await insert_alert(conn, alert, raw=raw, source=Source.HPCFLEET, at=now)
        if new:
            self.on_recorded()
        return alert_id


def readiness(
    engine: AsyncEngine, clock: Clock, settings: AuditSettings, unavailable: str
) -> list[ReadinessCheck]:
    """`sqs` and `notify`: what the worker last recorded (the worker has no HTTP port)."""
    stale = timedelta(
        seconds=max(settings.wait_seconds, settings.notify_interval)
        + settings.retry_max_seconds
        + 60
    )

    async def recorded(*components: str) -> None:
        async with engine.connect() as conn:
            rows = await load_status(conn)
        for component in components:
            row = rows.get(component)
            if row is None:
                raise RuntimeError(f"the audit worker has not checked the {component} yet")
            if row.error is not None:
                raise RuntimeError(f"{row.error} (last success: {row.ok_at or 'never'})")
            if clock.now() - row.checked_at > stale:
                raise RuntimeError(
                    f"the audit worker has not checked the {component} since {row.checked_at}"
                )

    async def sqs() -> None:
        if unavailable:
            raise RuntimeError(unavailable)
        if settings.queue_url is None:
            raise RuntimeError("no security-event queue: set HPCFLEET_AUDIT_QUEUE_URL")
        queues = [Source.QUEUE.value] + ([Source.DEAD_LETTER.value] if settings.dlq_url else [])
        await recorded(*queues)

    async def notify() -> None:
        if settings.webhook_url is None and (settings.topic_arn is None or unavailable):
            raise RuntimeError(
                "no notification channel: set HPCFLEET_AUDIT_TOPIC_ARN (with AWS access) "
                "or HPCFLEET_AUDIT_WEBHOOK_URL"
            )
        await recorded("notify")

    return [("sqs", sqs), ("notify", notify)]


@dataclass
class Audit:
    """The service and its parts, for tests and for composition roots that need more than the
    `Service` (the readiness checks, the action recorder)."""

    service: Service
    intake: Intake | None
    notifier: Notifier | None
    actions: ActionRecorder


def make_aws(runtime: Settings, settings: AuditSettings) -> tuple[aioboto3.Session | None, str]:
    """audit's AWS session from settings, or None and the reason the queue is not read."""
    access = service_aws_access(
        "audit",
        endpoint_url=runtime.aws_endpoint_url,
        auth_url=settings.auth_url,
        client_id=settings.auth_client_id,
        client_secret=settings.auth_client_secret,
        role=settings.aws_role,
    )
    return access.session, access.unavailable


def assemble(
    runtime: Runtime,
    settings: AuditSettings,
    session: aioboto3.Session | None,
    *,
    unavailable: str = "",
) -> Audit:
    engine, clock = runtime.engine, runtime.clock
    endpoint = runtime.settings.aws_endpoint_url
    endpoint_url = str(endpoint).rstrip("/") if endpoint else None

    channels: list[Channel] = []
    if session is not None and settings.topic_arn is not None:
        channels.append(SnsChannel(session, settings.topic_arn, endpoint_url=endpoint_url))
    if settings.webhook_url is not None:
        channels.append(WebhookChannel(str(settings.webhook_url), timeout=settings.webhook_timeout))
    notifier, notify_loop = None, None
    if channels:
        notifier = Notifier(
            engine,
            clock,
            channels,
            settings.policy(),
            batch=settings.notify_batch,
            api_url=str(settings.api_url) if settings.api_url else None,
        )
        notify_loop = PacedLoop(
            "audit.notify",
            notifier.reconcile,
            interval=settings.notify_interval,
            retry=settings.retry_seconds,
            retry_max=settings.retry_max_seconds,
            clock=clock,
        )
    kick = notify_loop.kick if notify_loop is not None else lambda: None

    queues = [
        (
            source,
            SqsQueue(
                session,
                url,
                region=settings.aws_region or runtime.settings.aws_region,
                endpoint_url=endpoint_url,
                wait_seconds=settings.wait_seconds,
            ),
        )
        for source, url in (
            (Source.DEAD_LETTER, settings.dlq_url),
            (Source.QUEUE, settings.queue_url),
        )
        if session is not None and url is not None
    ]
    intake, intake_loop = None, None
    if queues:
        intake = Intake(engine, clock, queues, wait_seconds=settings.wait_seconds, on_stored=kick)
        intake_loop = PacedLoop(
            "audit.intake",
            intake.poll,
            interval=settings.wait_seconds,
            retry=settings.retry_seconds,
            retry_max=settings.retry_max_seconds,
            clock=clock,
        )

    service = Service.create(
        CONSUMER,
        runtime,
        runtime.mailbox(MAILBOX),
        router=make_router(engine, clock),
        loops=[loop for loop in (intake_loop, notify_loop) if loop is not None],
        readiness=readiness(engine, clock, settings, unavailable),
    )
    return Audit(
        service=service,
        intake=intake,
        notifier=notifier,
        actions=ActionRecorder(engine, clock, on_recorded=kick),
    )


def build_audit(runtime: Runtime, settings: AuditSettings | None = None) -> Audit:
    """audit from the HPCFLEET_AUDIT_ environment (unless `settings`); a bad setting exits 2."""
    try:
        settings = settings or load_settings(AuditSettings)
        session, unavailable = make_aws(runtime.settings, settings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return assemble(runtime, settings, session, unavailable=unavailable)


def build(runtime: Runtime) -> Service:
    """audit's service, for the registry."""
    return build_audit(runtime).service
