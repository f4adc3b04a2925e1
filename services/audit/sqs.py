"""The security-event queue reader: receive, classify, store, and only then delete.

Each pass short-polls the dead-letter queue, then long-polls the queue. Every message that
classifies to an alert is stored in its own transaction (one alert per deduplication key, the raw
body kept) and deleted only after that committed: a crash in between redelivers it and the key
absorbs the repeat. A message that cannot be stored stays; after five receives SQS moves it to the
dead-letter queue (audit.yaml), where every message becomes an alert: classified when the rules
can (a root sign-in stays critical and keeps its key, so a copy that did get through stays one
alert), unparsed otherwise. Nothing leaves either queue unrecorded except what the rules
classify as no security event, and only from the main queue.

A failed pass (SQS, or the store) is written to `audit_status` for readiness and returns None,
which makes its loop back off; botocore's own retries are off, so there is one retry policy,
and readiness sees it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aioboto3
from botocore.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

from services.audit.rules import Alert, Severity, classify_message
from services.audit.tables import Source, insert_alert, set_status
from shared.clock import Clock

log = logging.getLogger(__name__)

BATCH = 10  # SQS's most per receive and per delete


@dataclass(frozen=True)
class Received:
    body: str
    receipt: str
    message_id: str


class SqsQueue:
    """One queue through aioboto3: receives and batch deletes, no botocore retries."""

    def __init__(
        self,
        session: aioboto3.Session,
        url: str,
        *,
        region: str,
        endpoint_url: str | None,
        wait_seconds: int,
    ) -> None:
        self.session = session
        self.url = url
        self.region = region
        self.endpoint_url = endpoint_url
        self._config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=wait_seconds + 10,
        )

    def _client(self) -> Any:
        return self.session.client(
            "sqs", region_name=self.region, endpoint_url=self.endpoint_url, config=self._config
        )

    async def receive(self, wait_seconds: int) -> list[Received]:
        async with self._client() as sqs:
            answer = await sqs.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=BATCH, WaitTimeSeconds=wait_seconds
            )
        return [
            Received(m["Body"], m["ReceiptHandle"], m["MessageId"])
            for m in answer.get("Messages", [])
        ]

    async def delete(self, messages: Sequence[Received]) -> list[str]:
        """Delete `messages`; the ids of those SQS refused (they come back and dedupe)."""
        if not messages:
            return []
        entries = [{"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(messages)]
        async with self._client() as sqs:
            answer = await sqs.delete_message_batch(QueueUrl=self.url, Entries=entries)
        return [messages[int(f["Id"])].message_id for f in answer.get("Failed", [])]


def unparsed(body: str, reason: str) -> Alert:
    """An alert for a message no rule classifies, keyed like the rules' own unparsed alerts."""
    digest = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
    return Alert(
        key=f"sha256:{digest}",
        rule="unparsed",
        severity=Severity.MEDIUM,
        title="Unparsed security event",
        what=f"{reason}; the raw message is kept with the alert",
        who="unknown",
        account=None,
        region=None,
        source_ip=None,
        occurred_at=None,
    )


def classify(body: str, source: Source) -> Alert | None:
    """The alert for one message body; None only for a main-queue message that is no alert."""
    try:
        alert = classify_message(body)
    except Exception:  # a rule's bug must not lose the event
        log.exception("the rules failed on a message; recording it as unparsed")
        return unparsed(body, "the rules failed on this message")
    if alert is None and source is Source.DEAD_LETTER:
        return unparsed(body, "a dead-lettered message that no rule alerts on")
    return alert


class Intake:
    """One pass over the dead-letter queue and the queue; `on_stored` hears of new alerts."""

    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        queues: Sequence[tuple[Source, SqsQueue]],
        *,
        wait_seconds: int,
        on_stored: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.queues = queues
        self.wait_seconds = wait_seconds
        self.on_stored = on_stored

    async def poll(self) -> float | None:
        """Receive, store and delete; 0 (go on at once) or None (failed: back off)."""
        ok = True
        for source, queue in self.queues:
            # the dead-letter queue only when it has something: one short poll, no waiting
            wait = 0 if source is Source.DEAD_LETTER else self.wait_seconds
            ok = await self._drain(source, queue, wait) and ok
        return 0.0 if ok else None

    async def _drain(self, source: Source, queue: SqsQueue, wait: int) -> bool:
        error: str | None = None
        try:
            messages = await queue.receive(wait)
        except Exception as exc:
            messages, error = [], f"cannot receive from {source.value}: {_describe(exc)}"
        done: list[Received] = []
        for message in messages:
            try:
                await self._store(source, message)
            except Exception as exc:  # left on the queue: redelivered, dead-lettered at worst
                error = f"cannot store message {message.message_id}: {_describe(exc)}"
                continue
            done.append(message)
        if done:
            self.on_stored()
        try:
            refused = await queue.delete(done)
        except Exception as exc:
            refused, error = [], f"cannot delete from {source.value}: {_describe(exc)}"
        if refused:
            log.warning(
                "SQS kept %d stored message(s); they will dedupe: %s", len(refused), refused
            )
        await self._status(source, error)
        return error is None

    async def _store(self, source: Source, message: Received) -> None:
        alert = classify(message.body, source)
        if alert is None:
            log.debug("message %s is no security event", message.message_id)
            return
        async with self.engine.begin() as conn:
            alert_id, new = await insert_alert(
                conn,
                alert,
                raw=message.body,
                source=source,
                at=self.clock.now(),
                message_id=message.message_id,
            )
        if new:
            log.warning(
                "alert %s opened: %s %s (%s)", alert_id, alert.severity, alert.title, alert.rule
            )

    async def _status(self, source: Source, error: str | None) -> None:
        if error is not None:
            log.warning("security-event intake: %s", error)
        try:
            async with self.engine.begin() as conn:
                await set_status(conn, source.value, self.clock.now(), error)
        except Exception as exc:  # the store is down: the pass's own result says enough
            log.warning("cannot record the intake's status: %s", _describe(exc))


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
