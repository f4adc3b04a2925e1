"""The audit service against a real moto server (SQS, SNS) and both stores, under a manual clock.

Each test gets its own queue, dead-letter queue (redrive after 5 receives, as audit.yaml), alert
topic and a "watch" queue subscribed to the topic, where the notifications land.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aioboto3
import boto3
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from tests_support import wait_until

from services.audit import sqs as sqs_module
from services.audit.service import Audit, PacedLoop, assemble
from services.audit.settings import AuditSettings
from services.audit.tables import alerts, load_status, notifications
from shared.api import ApiGuard, create_app
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock, SystemClock, settle
from shared.cloud.moto_server import MotoServer
from shared.service import Runtime
from shared.settings import Settings
from shared.tokens import TokenIssuer, TokenVerifier, generate_signing_key

EVENTS = Path(__file__).parent / "events"
REGION = "us-east-1"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def event(name: str) -> str:
    return (EVENTS / f"{name}.json").read_text()


@dataclass
class Aws:
    """One test's queues and topic on the moto server, through plain boto3."""

    endpoint: str
    sqs: Any
    sns: Any
    queue: str = ""
    dlq: str = ""
    topic: str = ""
    watch: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)

    def create(self) -> Aws:
        name = f"audit-{uuid.uuid4().hex[:8]}"
        self.dlq = self.sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        dlq_arn = self._arn(self.dlq)
        redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5})
        self.queue = self.sqs.create_queue(
            QueueName=name, Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": "1"}
        )["QueueUrl"]
        self.topic = self.sns.create_topic(Name=f"{name}-alerts")["TopicArn"]
        self.watch = self.sqs.create_queue(QueueName=f"{name}-watch")["QueueUrl"]
        self.sns.subscribe(TopicArn=self.topic, Protocol="sqs", Endpoint=self._arn(self.watch))
        return self

    def _arn(self, url: str) -> str:
        attributes = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(attributes["Attributes"]["QueueArn"])

    def send(self, body: str, *, dead: bool = False) -> None:
        self.sqs.send_message(QueueUrl=self.dlq if dead else self.queue, MessageBody=body)

    def left(self, url: str) -> int:
        """Messages still on a queue, visible or in flight."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        got = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return sum(int(got[n]) for n in names)

    async def notified(self, count: int) -> list[dict[str, Any]]:
        """Wait until `count` notifications in all reached the watch queue; all of them."""

        async def arrived() -> bool:
            answer = await asyncio.to_thread(
                self.sqs.receive_message, QueueUrl=self.watch, MaxNumberOfMessages=10
            )
            for message in answer.get("Messages", []):
                self.seen.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.watch, ReceiptHandle=message["ReceiptHandle"])
            return len(self.seen) >= count

        await wait_until(arrived, timeout=10, what=f"{count} notification(s) on the topic")
        return self.seen


def attribute(notification: dict[str, Any], name: str) -> str:
    return str(notification["MessageAttributes"][name]["Value"])


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server
        server.reset()  # moto's backends are process-wide: leave no queues for later tests


@pytest.fixture
def aws(moto: MotoServer) -> Aws:
    moto.clear_faults()
    clients = {
        name: boto3.client(name, endpoint_url=moto.endpoint, region_name=REGION, **KEYS)
        for name in ("sqs", "sns")
    }
    return Aws(moto.endpoint, clients["sqs"], clients["sns"]).create()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def settings(aws: Aws) -> AuditSettings:
    return AuditSettings(
        queue_url=aws.queue,
        dlq_url=aws.dlq,
        topic_arn=aws.topic,
        api_url="https://audit.example.test",
        wait_seconds=1,
        retry_seconds=60,
        retry_max_seconds=600,
        notify_interval=3600,
        # high: repeat every 10 minutes, escalate after 20
        escalation={"high": {"renotify_every": 600, "escalate_after": "PT20M"}},
    )


def make_runtime(engine: AsyncEngine, clock: ManualClock, endpoint: str) -> Runtime:
    return Runtime(Settings(aws_endpoint_url=endpoint), engine, MemoryBus(), clock)


def make_audit(runtime: Runtime, settings: AuditSettings) -> Audit:
    return assemble(runtime, settings, aioboto3.Session(region_name=REGION, **KEYS))


@pytest.fixture
async def audit(
    engine: AsyncEngine, clock: ManualClock, aws: Aws, settings: AuditSettings
) -> AsyncIterator[Audit]:
    audit = make_audit(make_runtime(engine, clock, aws.endpoint), settings)
    yield audit
    await audit.service.stop()


def api_client(audit: Audit) -> httpx.AsyncClient:
    app = create_app(
        title="audit", routers=[audit.service.router], readiness=audit.service.readiness
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit")


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_an_iam_policy_change_repeats_and_escalates_until_acknowledged(
    audit: Audit, aws: Aws, clock: ManualClock, engine: AsyncEngine
) -> None:
    """The issue's "done when": queue -> alert -> notify, repeat, escalate -> ack -> silence."""

    async def settled(sent: int) -> None:
        """The notifier's pass at this clock time ran to its end, `sent` notifications in all;
        then it is asleep until the next is due, and the clock may move."""

        async def done() -> bool:
            async with engine.connect() as conn:
                checked = (await load_status(conn)).get("notify")
            return (
                checked is not None
                and checked.checked_at == clock.now()
                and await count(engine, notifications) == sent
            )

        await wait_until(done, timeout=10, what=f"the notifier's pass with {sent} sent")
        await settle()

    await audit.service.start_worker(MemoryBus())
    await settled(0)
    clock.advance(1)  # so that the first notification's pass is told apart from the one at start
    aws.send(event("iam_put_role_policy"))

    first = (await aws.notified(1))[0]
    await settled(1)
    assert first["Subject"].startswith("[HIGH] IAM policy changed: PutRolePolicy")
    assert "alice@corp.example (role hpcfleet-operator)" in first["Message"]
    assert attribute(first, "kind") == "notify"
    assert attribute(first, "escalated") == "false"
    async with api_client(audit) as api:
        listed = (await api.get("/audit/alerts", params={"acknowledged": "false"})).json()
        assert [(a["rule"], a["status"]) for a in listed] == [("iam-policy-change", "notified")]
        alert_id = listed[0]["alert_id"]
        assert f"https://audit.example.test/audit/alerts/{alert_id}/ack" in first["Message"]
        await wait_until(
            lambda: _true(aws.left(aws.queue) == 0), timeout=5, what="the message's deletion"
        )

        clock.advance(600)  # still nobody: a reminder
        second = (await aws.notified(2))[1]
        await settled(2)
        assert second["Subject"].startswith("[HIGH] reminder 1: IAM policy changed")
        clock.advance(600)  # 20 minutes open: escalated
        third = (await aws.notified(3))[2]
        await settled(3)
        assert attribute(third, "kind") == "escalate"
        assert attribute(third, "escalated") == "true"
        assert third["Subject"].startswith("[HIGH] ESCALATED: ")

        acked = await api.post(
            f"/audit/alerts/{alert_id}/ack", json={"who": "bob", "comment": "approved change"}
        )
        assert acked.status_code == 200, acked.text
        assert acked.json()["status"] == "acknowledged"
        clock.advance(600)  # the next reminder would be due: silence instead
        await settled(3)
        clock.advance(86_400)  # and a day later
        await settled(3)
        detail = (await api.get(f"/audit/alerts/{alert_id}")).json()
    assert [s["kind"] for s in detail["sent"]] == ["notify", "renotify", "escalate"]
    assert detail["acknowledgement"]["by"] == "bob"
    assert json.loads(detail["raw"]) == json.loads(event("iam_put_role_policy"))
    answer = aws.sqs.receive_message(QueueUrl=aws.watch)
    assert "Messages" not in answer


async def _true(value: bool) -> bool:
    return value


async def test_the_same_event_twice_is_one_alert_and_both_copies_are_deleted(
    audit: Audit, aws: Aws, engine: AsyncEngine
) -> None:
    aws.send(event("iam_put_role_policy"))
    aws.send(event("iam_put_role_policy"))
    assert audit.intake is not None
    while aws.left(aws.queue):
        assert await audit.intake.poll() == 0.0
    assert await count(engine, alerts) == 1


async def test_malformed_and_dead_lettered_messages_are_kept_as_alerts(
    audit: Audit, aws: Aws, engine: AsyncEngine
) -> None:
    aws.send("{not json")  # on the queue: unparsed
    aws.send(event("ec2_describe_instances"))  # on the queue, no security event: deleted
    aws.send(event("root_console_login"), dead=True)  # classified, and stays critical
    aws.send(event("ec2_describe_instances"), dead=True)  # dead-lettered: never dropped
    assert audit.intake is not None
    while aws.left(aws.queue) or aws.left(aws.dlq):
        assert await audit.intake.poll() == 0.0

    async with api_client(audit) as api:
        found = (await api.get("/audit/alerts")).json()
        by_rule = sorted((a["source"], a["rule"], a["severity"]) for a in found)
        assert by_rule == [
            ("dead-letter", "root-activity", "critical"),
            ("dead-letter", "unparsed", "medium"),
            ("queue", "unparsed", "medium"),
        ]
        garbled = next(a for a in found if a["source"] == "queue")
        detail = (await api.get(f"/audit/alerts/{garbled['alert_id']}")).json()
        assert detail["raw"] == "{not json"
        critical = (await api.get("/audit/alerts", params={"severity": "critical"})).json()
        assert [a["rule"] for a in critical] == ["root-activity"]


async def test_a_message_that_cannot_be_stored_stays_on_the_queue(
    audit: Audit, aws: Aws, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def store_down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("database unreachable")

    aws.send(event("sg_authorize_egress"))
    assert audit.intake is not None
    with monkeypatch.context() as patched:
        patched.setattr(sqs_module, "insert_alert", store_down)
        assert await audit.intake.poll() is None  # failed: the loop backs off
    assert aws.left(aws.queue) == 1  # received, not deleted: it comes back
    await wait_until(
        lambda: _stored_after_poll(audit, engine), timeout=10, what="the redelivered message"
    )
    assert aws.left(aws.queue) == 0


async def _stored_after_poll(audit: Audit, engine: AsyncEngine) -> bool:
    assert audit.intake is not None
    await audit.intake.poll()
    return await count(engine, alerts) == 1


async def test_sqs_unavailable_is_retried_with_backoff_and_reported_in_readiness(
    audit: Audit, aws: Aws, moto: MotoServer, clock: ManualClock, engine: AsyncEngine
) -> None:
    intake_loop = audit.service.loops[0]
    assert isinstance(intake_loop, PacedLoop)
    moto.inject_fault("ReceiveMessage", "ServiceUnavailable", status=503, count=None)
    await audit.service.start_worker(MemoryBus())
    aws.send(event("iam_update_assume_role_policy"))  # arrives while SQS is down
    await wait_until(
        lambda: _true(intake_loop.failed_in_a_row >= 1), timeout=5, what="a failed receive"
    )
    assert 30 <= intake_loop.interval <= 60  # the first back-off: half to all of retry_seconds
    async with api_client(audit) as api:
        ready = await api.get("/readyz")
        assert ready.status_code == 503
        assert "ServiceUnavailable" in ready.json()["failed"]["sqs"]

        moto.clear_faults()
        await settle()  # the intake is asleep for its back-off
        clock.advance(60)  # the back-off passes: the next receive works
        await wait_until(lambda: _stored(engine), timeout=10, what="the alert after the outage")
        await wait_until(
            lambda: _ready(api), timeout=10, what="readiness once SQS and the notifier work"
        )
    assert intake_loop.failed_in_a_row == 0


async def _stored(engine: AsyncEngine) -> bool:
    return await count(engine, alerts) == 1


async def _ready(api: httpx.AsyncClient) -> bool:
    return (await api.get("/readyz")).status_code == 200


class Webhook:
    """A local receiver that answers with the given statuses in turn, then 204."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_failing_webhook_is_retried_and_nothing_is_recorded_until_every_channel_took_it(
    sqlite_engine: AsyncEngine, clock: ManualClock, aws: Aws, settings: AuditSettings
) -> None:
    hook = Webhook([500])
    try:
        settings = AuditSettings(**{**settings.model_dump(), "webhook_url": hook.url})
        audit = make_audit(make_runtime(sqlite_engine, clock, aws.endpoint), settings)
        alert_id = await audit.actions.record(
            actor="carol", action="pool.resize", target="pool default", detail="64 -> 96"
        )
        assert audit.notifier is not None
        assert await audit.notifier.reconcile() is None  # SNS took it, the webhook did not
        assert await count(sqlite_engine, notifications) == 0
        async with api_client(audit) as api:
            failed = (await api.get("/readyz")).json()["failed"]
            assert "webhook at 127.0.0.1 answered HTTP 500" in failed["notify"]

        wait = await audit.notifier.reconcile()  # both took it: recorded, next in 24 h (low)
        assert wait == 24 * 3600
    finally:
        hook.close()
    assert await count(sqlite_engine, notifications) == 1
    assert len(await aws.notified(2)) == 2  # the healthy channel repeated; none lost one
    body = hook.bodies[-1]
    assert body["alert"]["alert_id"] == alert_id
    assert body["alert"]["who"] == "carol"
    assert body["notification"] == {"kind": "notify", "attempt": 1, "escalated": False}
    assert body["text"].startswith("[LOW] hpcfleet operator action: pool.resize")


async def test_operator_actions_are_alerts_once_per_action_id(
    audit: Audit, engine: AsyncEngine
) -> None:
    first = await audit.actions.record(
        actor="dave", action="bakery.build", target="recipe linux", action_id="cmd-1"
    )
    again = await audit.actions.record(
        actor="dave", action="bakery.build", target="recipe linux", action_id="cmd-1"
    )
    assert first == again
    assert await count(engine, alerts) == 1
    with pytest.raises(ValueError, match="who did what"):
        await audit.actions.record(actor=" ", action="bakery.build", target="recipe linux")
    async with api_client(audit) as api:
        found = (await api.get(f"/audit/alerts/{first}")).json()
    assert (found["rule"], found["source"], found["who"]) == ("operator-action", "hpcfleet", "dave")
    assert json.loads(found["raw"])["action_id"] == "cmd-1"


BAD_REQUESTS = [
    # method, path (ALERT: a real alert's id), body or query, expected status, words in the answer
    ("POST", "/audit/alerts/ALERT/ack", {}, 422, "who"),
    ("POST", "/audit/alerts/ALERT/ack", {"who": "   "}, 422, "who"),
    ("POST", "/audit/alerts/ALERT/ack", {"who": "x", "comment": "c" * 2001}, 422, "comment"),
    ("POST", "/audit/alerts/ALERT/ack", {"who": "x", "by": "y"}, 422, "by"),
    ("POST", "/audit/alerts/not-a-uuid/ack", {"who": "x"}, 422, "alert_id"),
    ("POST", f"/audit/alerts/{uuid.UUID(int=7)}/ack", {"who": "x"}, 404, "no alert"),
    ("GET", f"/audit/alerts/{uuid.UUID(int=7)}", None, 404, "no alert"),
    ("GET", "/audit/alerts", {"severity": "urgent"}, 422, "severity"),
    ("GET", "/audit/alerts", {"limit": 0}, 422, "limit"),
    ("GET", "/audit/alerts", {"acknowledged": "maybe"}, 422, "acknowledged"),
    ("DELETE", "/audit/alerts/ALERT/ack", None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "data", "expected", "words"), BAD_REQUESTS)
async def test_bad_requests_are_refused_with_a_reason(
    sqlite_engine: AsyncEngine,
    clock: ManualClock,
    method: str,
    path: str,
    data: dict[str, Any] | None,
    expected: int,
    words: str,
) -> None:
    audit = assemble(Runtime(Settings(), sqlite_engine, MemoryBus(), clock), AuditSettings(), None)
    alert_id = await audit.actions.record(actor="erin", action="pool.drain", target="node-1")
    async with api_client(audit) as api:
        path = path.replace("ALERT", alert_id)
        if method == "GET":
            answer = await api.get(path, params=data)
        else:
            answer = await api.request(method, path, json=data)
    assert answer.status_code == expected, answer.text
    assert words in answer.text


async def test_an_acknowledgement_is_made_once_and_stands(
    audit: Audit, engine: AsyncEngine, clock: ManualClock
) -> None:
    alert_id = await audit.actions.record(actor="erin", action="pool.drain", target="node-1")
    async with api_client(audit) as api:
        clock.advance(5)
        racing = await asyncio.gather(
            *(
                api.post(f"/audit/alerts/{alert_id}/ack", json={"who": f" {who} "})
                for who in ("frank", "gina", "hank")
            )
        )
        assert sorted(r.status_code for r in racing) == [200, 409, 409]
        first = next(r.json()["acknowledgement"] for r in racing if r.status_code == 200)
        assert first["at"] == "2026-03-02T09:00:05Z"
        assert first["by"] in ("frank", "gina", "hank")  # stripped
        for refused in (r for r in racing if r.status_code == 409):
            assert f"acknowledged by {first['by']}" in refused.json()["detail"]
        later = await api.post(f"/audit/alerts/{alert_id}/ack", json={"who": "ivan"})
        assert later.status_code == 409
        still = (await api.get(f"/audit/alerts/{alert_id}")).json()
        assert still["acknowledgement"] == first
        assert [
            a["alert_id"] for a in (await api.get("/audit/alerts?acknowledged=true")).json()
        ] == [alert_id]
        assert (await api.get("/audit/alerts?acknowledged=false")).json() == []


async def test_without_aws_or_a_channel_readiness_says_what_to_set(
    sqlite_engine: AsyncEngine, clock: ManualClock
) -> None:
    runtime = Runtime(Settings(), sqlite_engine, MemoryBus(), clock)
    audit = assemble(runtime, AuditSettings(topic_arn=None), None, unavailable="no AWS here")
    assert (audit.intake, audit.notifier, audit.service.loops) == (None, None, [])
    async with api_client(audit) as api:
        failed = (await api.get("/readyz")).json()["failed"]
    assert failed["sqs"] == "RuntimeError: no AWS here"
    assert "HPCFLEET_AUDIT_WEBHOOK_URL" in failed["notify"]


async def test_paced_loop_backs_off_doubling_with_jitter_up_to_the_cap() -> None:
    async def step() -> float | None:
        return None

    loop = PacedLoop("t", step, interval=5, retry=1, retry_max=10, clock=SystemClock())
    for failures, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (5, 10), (5, 10)]):
        await loop.run_once()
        assert loop.failed_in_a_row == failures + 1
        assert low <= loop.interval <= high


async def test_with_tokens_checked_an_acknowledgement_is_signed_by_the_token(
    sqlite_engine: AsyncEngine, clock: ManualClock
) -> None:
    key = generate_signing_key()
    issuer = TokenIssuer(key)
    audit = assemble(Runtime(Settings(), sqlite_engine, MemoryBus(), clock), AuditSettings(), None)
    first = await audit.actions.record(actor="erin", action="pool.drain", target="node-1")
    second = await audit.actions.record(actor="erin", action="pool.drain", target="node-2")
    guard = ApiGuard(TokenVerifier([key.public_key()]), clock)
    app = create_app(title="audit", routers=[audit.service.router], guard=guard)

    def bearer(subject: str, *scopes: str) -> dict[str, str]:
        return {"authorization": f"Bearer {issuer.issue(subject, 'operator', scopes, clock.now())}"}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://audit"
    ) as api:
        assert (await api.get("/audit/alerts")).status_code == 401
        assert (
            await api.get("/audit/alerts", headers=bearer("ann", "audit:read"))
        ).status_code == 200
        without_scope = await api.post(
            f"/audit/alerts/{first}/ack", json={}, headers=bearer("ann", "audit:read")
        )
        assert without_scope.status_code == 403
        assert "audit:write" in without_scope.json()["detail"]
        posing = await api.post(
            f"/audit/alerts/{first}/ack", json={"who": "bob"}, headers=bearer("ann", "audit:write")
        )
        assert posing.status_code == 403
        assert "acknowledge as yourself" in posing.json()["detail"]
        signed = await api.post(
            f"/audit/alerts/{first}/ack",
            json={"comment": "expected drain"},
            headers=bearer("ann", "audit:write"),
        )
        assert signed.status_code == 200, signed.text
        assert signed.json()["acknowledgement"]["by"] == "ann"
        same_name = await api.post(
            f"/audit/alerts/{second}/ack", json={"who": "ann"}, headers=bearer("ann", "audit:write")
        )
        assert same_name.json()["acknowledgement"]["by"] == "ann"
