"""Each service's API as the fuzz run drives it: the app `hpcfleet serve <service>` builds (the
token guard, the readiness checks, the outbox relay), on a fresh PostgreSQL database and the
in-memory bus, with the fakes the service's own tests use (FakeCloud for pool, a simulated
scheduler for autogrow, moto's SQS and SNS for audit, the development IdP for auth), seeded with
some data so that the answers have something in them to check against their schemas.

The apps run inside schemathesis's ASGI client, on its one event-loop thread: everything that
touches the database or the bus happens in the app's lifespan or its requests, on that loop.
The clock is a ManualClock, so a run is reproducible and a token never expires in the middle.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import boto3
import httpx
from fastapi import FastAPI

from deploy.migrations import upgrade
from services.audit.service import assemble as assemble_audit
from services.audit.settings import AuditSettings
from services.auth.api import AWS_SCOPE_PREFIX, SCOPES
from services.auth.devidp import DevIdp, DevIdpConfig, DevUser, SigningKeyPair, role_value
from services.auth.service import assemble as assemble_auth
from services.auth.settings import AuthSettings
from services.autogrow.cluster import SimulatedCluster
from services.autogrow.service import assemble as assemble_autogrow
from services.autogrow.settings import AutogrowSettings
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.swf import SwfJob
from services.bakery.recipes import load_recipes
from services.bakery.service import assemble as assemble_bakery
from services.bakery.settings import BakerySettings
from services.console.router import make_router as console_router
from services.pool.service import assemble as assemble_pool
from services.pool.settings import PoolSettings
from shared.api import ApiGuard, create_app
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.cloud.fake import FakeCloud
from shared.cloud.moto_server import MotoServer
from shared.events import BillingModel, ImageReady, NodeProvisioned
from shared.process import api_app
from shared.service import Runtime, Service
from shared.settings import Settings
from shared.store import create_engine
from shared.testing.auth_service import serve_app
from shared.tokens import TokenIssuer, TokenVerifier, generate_signing_key

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
REGION = "us-east-1"
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
NODES = [f"node{n:03d}" for n in range(1, 5)]
PG_ADMIN_DSN = os.environ.get("HPCFLEET_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/postgres")

Seed = Callable[[FastAPI], Awaitable[None]]


@dataclass
class Target:
    """One service's app, and the tokens for it: `token()` carries every scope of the service."""

    name: str
    app: FastAPI
    scopes: tuple[str, ...]
    issuer: TokenIssuer
    clock: ManualClock
    guarded_prefixes: tuple[str, ...]
    # routes that check the token themselves (auth's), after FastAPI validated their inputs
    self_checked: tuple[str, ...] = ()
    # per operation ("PUT /pool/pools/{name}"), inputs that exist in the seeded data (fixed
    # path parameters or body; schemathesis draws the rest), so that answers past the 404 or the
    # 422 are checked too; filled in by the seeding
    known: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def token(self) -> str:
        return self.issuer.issue("fuzzer", "operator", self.scopes, self.clock.now())

    def expired(self) -> str:
        """A token of the right key and scopes that expired an hour ago."""
        issued = self.clock.now() - self.issuer.ttl - timedelta(hours=1)
        return self.issuer.issue("fuzzer", "operator", self.scopes, issued)

    def guarded(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self.guarded_prefixes)

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            cleanup()


def _service_app(
    title: str,
    runtime: Runtime,
    service: Service,
    guard: ApiGuard | None,
    seed: Seed | None = None,
) -> FastAPI:
    """What `hpcfleet serve` builds, on this runtime, on a migrated database, seeded."""

    async def prepare(app: FastAPI) -> None:
        await upgrade(runtime.engine)
        if seed is not None:
            await seed(app)

    return api_app(title, runtime, service, guard, prepare=prepare)


def _runtime(database_url: str, clock: ManualClock, **settings: object) -> Runtime:
    return Runtime(Settings(**settings), create_engine(database_url), MemoryBus(), clock)


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (the app's lifespan migrates it); dropped afterwards.
    PostgreSQL, not SQLite: it is the production store, and it refuses what SQLite takes (a NUL
    character in text, for one)."""
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        raise AssertionError(
            "PostgreSQL is not reachable on 127.0.0.1:5432; start it: pg_ctlcluster "
            "--skip-systemctl-redirect $(ls /etc/postgresql) main start"
        ) from None
    name = f"hpcfleet_fuzz_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _signer(clock: ManualClock) -> tuple[TokenIssuer, ApiGuard]:
    key = generate_signing_key()
    return TokenIssuer(key), ApiGuard(TokenVerifier([key.public_key()]), clock)


@asynccontextmanager
async def _unguarded(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the service's routes without the token check, for seeding through the API."""
    inner = create_app(title="seed", routers=[service.router])
    transport = httpx.ASGITransport(app=inner)
    async with httpx.AsyncClient(transport=transport, base_url="http://seed") as client:
        yield client


def _scoped(service: str) -> tuple[str, ...]:
    return (f"{service}:read", f"{service}:write")


# ---- pool ---------------------------------------------------------------------------------------


def pool_target(folder: Path, database_url: str) -> Target:
    clock = ManualClock(START)
    issuer, guard = _signer(clock)
    runtime = _runtime(database_url, clock)
    cloud = FakeCloud(clock=clock, region=REGION)
    settings = PoolSettings(retry_seconds=0.001, cloud_attempts=2, lock_wait_seconds=2)
    pool = assemble_pool(runtime, settings, cloud)
    image = cloud.add_image("hpc-node-2026-03", owner=cloud.account_id)
    known: dict[str, list[dict[str, Any]]] = {}

    async def seed(_app: FastAPI) -> None:
        on_image_ready = pool.service.handlers[ImageReady.name()]
        await on_image_ready(
            ImageReady(
                occurred_at=clock.now(),
                recipe="linux",
                images={REGION: image.image_id},
                version="2026.03.1",
                base_image="ami-base",
                built_at=clock.now(),
                billing=BillingModel.PER_SECOND,
            )
        )
        spec = {
            "name": "hpc",
            "size": 3,
            "instance_types": ["c7i.large", "c6i.large"],
            "subnets": [{"subnet_id": "subnet-a", "zone": "us-east-1a"}],
            "recipe": "linux",
            "max_surge_percent": 50,
        }
        async with _unguarded(pool.service) as client:
            response = await client.put("/pool/pools/hpc", json=spec)
            assert response.status_code == 200, response.text
        for _ in range(3):
            await pool.reconciler.reconcile()
        hpc = {"path_parameters": {"name": "hpc"}}
        known["GET /pool/pools/{name}"] = [hpc]
        known["GET /pool/pools/{name}/nodes"] = [hpc]
        known["PUT /pool/pools/{name}"] = [
            {**hpc, "body": {**spec, "size": size, "tags": {"team": "fuzz"}}} for size in (2, 4)
        ]

    app = _service_app("hpcfleet pool", runtime, pool.service, guard, seed)
    return Target("pool", app, _scoped("pool"), issuer, clock, ("/pool",), known=known)


# ---- bakery -------------------------------------------------------------------------------------


def bakery_target(folder: Path, database_url: str) -> Target:
    clock = ManualClock(START)
    issuer, guard = _signer(clock)
    runtime = _runtime(database_url, clock)
    recipes_file = Path(str(files("services.bakery").joinpath("examples/recipes.json")))
    settings = BakerySettings(recipes=recipes_file, work_dir=folder / "work")
    bakery = assemble_bakery(
        runtime, settings, load_recipes(recipes_file), None, unavailable="no AWS in the fuzz run"
    )

    known: dict[str, list[dict[str, Any]]] = {}

    async def seed(_app: FastAPI) -> None:
        async with _unguarded(bakery.service) as client:
            response = await client.post("/bakery/builds", json={"recipe": "linux"})
            assert response.status_code == 202, response.text
        build_id = response.json()["build_id"]
        known["GET /bakery/builds/{build_id}"] = [{"path_parameters": {"build_id": build_id}}]
        known["POST /bakery/builds"] = [{"body": {"recipe": name}} for name in ("linux", "sles")]

    app = _service_app("hpcfleet bakery", runtime, bakery.service, guard, seed)
    return Target("bakery", app, _scoped("bakery"), issuer, clock, ("/bakery",), known=known)


# ---- autogrow -----------------------------------------------------------------------------------


def _job(job_id: int, submit: int, run_time: int, procs: int) -> SwfJob:
    return SwfJob(
        job_id=job_id,
        submit=submit,
        wait=None,
        run_time=run_time,
        procs=procs,
        allocated_procs=procs,
        requested_procs=procs,
        requested_time=run_time,
        status=1,
        queue=None,
        partition=None,
    )


def autogrow_target(folder: Path, database_url: str) -> Target:
    clock = ManualClock(START)
    issuer, guard = _signer(clock)
    runtime = _runtime(database_url, clock)
    settings = AutogrowSettings(scheduler="simulated")
    jobs = [_job(n, submit=0, run_time=3600, procs=2) for n in range(1, 4)]
    simulated = SimulatedScheduler(
        jobs, clock, nodes=NODES, cores_per_node=settings.policy.cores_per_node, origin=START
    )
    cluster = SimulatedCluster(simulated, runtime.engine, clock, boot_seconds=60)
    autogrow = assemble_autogrow(runtime, settings, cluster)
    scopes = (*_scoped("autogrow"), "autogrow:hook")
    known: dict[str, list[dict[str, Any]]] = {}

    async def seed(_app: FastAPI) -> None:
        provisioned = autogrow.service.handlers[NodeProvisioned.name()]
        for n, name in enumerate(NODES):
            await provisioned(
                NodeProvisioned(
                    occurred_at=clock.now(),
                    node_id=f"hpc-{n:04d}",
                    instance_id=f"i-{n:017x}",
                    image_id="ami-1",
                    instance_type="c6i.large",
                    zone="us-east-1a",
                    scheduler_node_name=name,
                    pool="hpc",
                )
            )
        await autogrow.watcher.poll()
        await autogrow.decider.step()
        hpc = {"path_parameters": {"pool": "hpc"}}
        known["GET /autogrow/policies/{pool}"] = [hpc]
        known["PUT /autogrow/policies/{pool}"] = [hpc, {**hpc, "body": {}}]
        hooks = [{"body": {"nodes": NODES[:n]}} for n in (1, 2, 4)]
        known["POST /autogrow/hooks/resume"] = hooks
        known["POST /autogrow/hooks/suspend"] = hooks

    app = _service_app("hpcfleet autogrow", runtime, autogrow.service, guard, seed)
    return Target("autogrow", app, scopes, issuer, clock, ("/autogrow",), known=known)


# ---- audit --------------------------------------------------------------------------------------


def audit_target(folder: Path, database_url: str, moto: MotoServer) -> Target:
    clock = ManualClock(START)
    issuer, guard = _signer(clock)
    runtime = _runtime(database_url, clock, aws_endpoint_url=moto.endpoint, aws_region=REGION)
    suffix = uuid.uuid4().hex[:8]
    sqs = boto3.client("sqs", endpoint_url=moto.endpoint, region_name=REGION, **KEYS)
    sns = boto3.client("sns", endpoint_url=moto.endpoint, region_name=REGION, **KEYS)
    queue = sqs.create_queue(QueueName=f"fuzz-events-{suffix}")["QueueUrl"]
    dlq = sqs.create_queue(QueueName=f"fuzz-events-dlq-{suffix}")["QueueUrl"]
    topic = sns.create_topic(Name=f"fuzz-alerts-{suffix}")["TopicArn"]
    settings = AuditSettings(
        queue_url=queue,
        dlq_url=dlq,
        topic_arn=topic,
        wait_seconds=1,
        retry_seconds=60,
        retry_max_seconds=600,
        notify_interval=3600,
    )
    audit = assemble_audit(runtime, settings, aioboto3.Session(region_name=REGION, **KEYS))
    known: dict[str, list[dict[str, Any]]] = {}

    async def seed(_app: FastAPI) -> None:
        alerts = []
        for n in range(5):
            alert_id = await audit.actions.record(
                actor="fuzz-operator",
                action="pool.resize",
                target=f"pool hpc-{n}",
                detail="seeded for the fuzz run",
                action_id=f"fuzz-{n}",
            )
            alerts.append({"path_parameters": {"alert_id": alert_id}})
        known["GET /audit/alerts/{alert_id}"] = alerts
        known["POST /audit/alerts/{alert_id}/ack"] = alerts
        # what the worker records of the queues and the channel, so that /readyz is ready
        assert audit.intake is not None and audit.notifier is not None
        assert await audit.intake.poll() is not None
        assert await audit.notifier.reconcile() is not None

    app = _service_app("hpcfleet audit", runtime, audit.service, guard, seed)
    return Target("audit", app, _scoped("audit"), issuer, clock, ("/audit",), known=known)


# ---- auth ---------------------------------------------------------------------------------------

ACCOUNT = "123456789012"
PROVIDER = f"arn:aws:iam::{ACCOUNT}:saml-provider/ADFS"
ISSUER = "http://adfs.example.test/adfs/services/trust"
CLIENT_SECRET = "pool-client-secret-0123456789abcdef"
USERS = (
    DevUser(
        "EXAMPLE\\alice",
        "alice-Secret-1",
        roles=(role_value(f"arn:aws:iam::{ACCOUNT}:role/hpcfleet-operator", PROVIDER),),
    ),
    DevUser(
        "carol@example.test",
        "carol-Secret-1",
        roles=(role_value(f"arn:aws:iam::{ACCOUNT}:role/hpcfleet-auditor", PROVIDER),),
        mfa_code="246810",
    ),
)


def auth_target(folder: Path, database_url: str) -> Target:
    """auth in development with the development IdP as AD FS (plain http on loopback), one
    service client, no STS roles (the broker has nothing to keep fresh, so nothing answers 503)."""
    folder.mkdir(parents=True, exist_ok=True)
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    signing = SigningKeyPair.generate("ADFS Signing - fuzz", clock.now())
    idp = DevIdp(
        DevIdpConfig(environment="development", users=USERS, secure_cookies=False), signing, clock
    )
    stack = ExitStack()
    adfs_url = stack.enter_context(serve_app(idp.app))
    cert = folder / "adfs.crt"
    cert.write_bytes(signing.cert_pem)
    secret = folder / "pool.secret"
    secret.write_text(CLIENT_SECRET + "\n")
    settings = AuthSettings(
        environment="development",
        adfs_url=adfs_url,
        adfs_signing_certificates=cert,
        adfs_issuer=ISSUER,
        clients={"pool": f"file:{secret}"},
    )
    runtime = _runtime(database_url, clock)
    service, context = assemble_auth(runtime, settings)
    assert context.issuer is not None
    issuer = context.issuer
    scopes = (*SCOPES, *(f"{AWS_SCOPE_PREFIX}{n}" for n in ("pool", "bakery", "autogrow", "audit")))
    # no guard: auth's routes check tokens themselves (shared.api's public prefix /auth)
    app = _service_app("hpcfleet auth", runtime, service, None)
    target = Target(
        "auth",
        app,
        scopes,
        issuer,
        clock,
        (),
        self_checked=("/auth/whoami", "/auth/roles", "/auth/credentials/"),
        known={
            "POST /auth/token": [
                {"body": {"grant_type": "password", "username": u.username, "password": p}}
                for u in USERS
                for p in (u.password, "wrong")
            ]
            + [
                {"body": {"grant_type": "client_credentials", "client_id": "pool", **secret}}
                for secret in ({"client_secret": CLIENT_SECRET}, {"client_secret": "wrong"}, {})
            ]
        },
    )
    target.cleanups.append(stack.close)
    return target


# ---- console ------------------------------------------------------------------------------------


def console_target() -> Target:
    """The status page's token route, as the single-process mode serves it."""
    clock = ManualClock(START)
    issuer, guard = _signer(clock)
    app = create_app(title="hpcfleet console", routers=[console_router(issuer, clock)], guard=guard)
    return Target("console", app, (), issuer, clock, ())
