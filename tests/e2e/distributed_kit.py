"""The distributed deployment, for the end-to-end tests and the benchmarks (a plain module:
conftest.py is not importable by name when several test folders have one).

`deployed()` runs hpcfleet as production does, on this machine: every service's API and worker as
its own process over RabbitMQ and PostgreSQL, AWS in a moto server over HTTP, and auth trusting
the development IdP as AD FS (served over https, signing real SAML). Services get their AWS
credentials from auth, which signs in to AD FS for each role and calls moto's STS; the operator's
token comes from `hpcfleet login`'s own code. `SlurmBridge` plays what EC2 does to a compute node:
an instance the pool starts boots the emulated Slurm node, one it stops takes it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import boto3
import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from tests_support import delete_rabbit_namespace, free_port

from services.auth.development import OPERATOR, DevDirectory, idp_server, served_url
from services.auth.login import login, read_token
from services.pool.spec import POOL_TAG
from services.pool.tables import nodes as pool_nodes
from services.up import default_subnets, rehearsal_recipes
from shared.clock import SystemClock
from shared.cloud.moto_server import MotoServer
from shared.testing.processes import Processes, clean_environment
from shared.testing.slurm_cluster import SlurmCluster, hpcfleet_hook

REGION = "us-east-1"
SERVICES = ("auth", "bakery", "pool", "autogrow", "audit")
CONSUMERS = ("bakery", "pool", "autogrow")
"""The services that consume from the bus, so have a queue and a dead-letter queue."""


def pool_spec(subnets: Sequence[Mapping[str, str]], **overrides: Any) -> dict[str, Any]:
    """The pool the deployment starts with, following the `linux` recipe's images."""
    return {
        "name": "default",
        "size": 3,
        "instance_types": ["c5.xlarge"],
        "subnets": list(subnets),
        "recipe": "linux",
        **overrides,
    }


@dataclass(frozen=True)
class Plan:
    """What is chosen before anything starts: each API's URL, and the identity files."""

    urls: dict[str, str]
    directory: DevDirectory

    @classmethod
    def make(cls, workdir: Path) -> Plan:
        """Free ports, and a development directory with a ``slurm`` client besides the
        services' (Slurm's hooks get their token as it)."""
        directory = DevDirectory.create(
            workdir / "identity", datetime.now(UTC), other_clients=("slurm",)
        )
        urls = {service: f"http://127.0.0.1:{free_port()}" for service in SERVICES}
        return cls(urls, directory)

    def hook(self, action: str) -> list[str]:
        """The command Slurm's ResumeProgram (`resume`) or SuspendProgram (`suspend`) runs: the
        production hook, with its token from auth as the ``slurm`` client."""
        return hpcfleet_hook(
            action,
            self.urls["autogrow"],
            auth_url=self.urls["auth"],
            client_secret_file=self.directory.client_secrets["slurm"],
        )


@dataclass
class Deployment:
    """A running deployment: where each API is, the identity files, the operator's token."""

    workdir: Path
    processes: Processes
    urls: dict[str, str]
    directory: DevDirectory
    adfs_url: str
    moto: MotoServer
    rabbitmq_url: str
    exchange: str
    operator_token: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    async def sign_in(self, scope: str | None = None) -> str:
        """An operator token through AD FS, as `hpcfleet login` gets one."""
        path = self.workdir / f"token-{time.monotonic_ns()}"
        await login(
            auth_url=self.urls["auth"],
            adfs_url=self.adfs_url,
            username=OPERATOR,
            password=self.directory.operator.password,
            token_path=path,
            scope=scope,
            adfs_verify=self.directory.tls.client_context(),
        )
        return read_token(path)

    async def client_token(self, client_id: str) -> str:
        """A service token by the client-credentials grant, as the services get theirs."""
        secret = self.directory.client_secrets[client_id].read_text()
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.post(
                f"{self.urls['auth']}/auth/token",
                data={"grant_type": "client_credentials"},
                auth=(client_id, secret),
            )
        answer.raise_for_status()
        token: str = answer.json()["access_token"]
        return token

    async def vended(self, role: str) -> dict[str, str]:
        """What auth's credentials endpoint hands the service `role` (its own client)."""
        token = await self.client_token(role)
        async with self.client("auth", token) as auth:
            answer = await auth.get(f"/auth/credentials/{role}")
        answer.raise_for_status()
        body: dict[str, str] = answer.json()
        return body

    def client(self, service: str, token: str | None = None) -> httpx.AsyncClient:
        """An HTTP client for a service's API with the operator's token (or `token`)."""
        return httpx.AsyncClient(
            base_url=self.urls[service],
            headers={"authorization": f"Bearer {token or self.operator_token}"},
            timeout=10,
        )

    async def dead_letters(self) -> dict[str, int]:
        """Messages waiting in each consumer's dead-letter queue (passive declare: the queue
        must exist, which also proves the consumer subscribed)."""
        connection = await aio_pika.connect(self.rabbitmq_url)
        counts: dict[str, int] = {}
        try:
            for consumer in CONSUMERS:
                channel = await connection.channel()
                queue = await channel.declare_queue(
                    f"{self.exchange}.{consumer}.dead", passive=True
                )
                counts[consumer] = queue.declaration_result.message_count or 0
        finally:
            await connection.close()
        return counts


def _serve_idp(directory: DevDirectory) -> tuple[Any, threading.Thread, str]:
    server = idp_server(directory.idp(SystemClock()), directory.tls)
    thread = threading.Thread(target=server.run, name="dev-adfs", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the development IdP did not start")
        time.sleep(0.01)
    return server, thread, served_url(server)


@asynccontextmanager
async def deployed(
    workdir: Path,
    *,
    database_url: str,
    rabbitmq_url: str,
    exchange: str,
    moto: MotoServer,
    env: Mapping[str, str],
    pool: Mapping[str, Any] | None = None,
    plan: Plan | None = None,
) -> AsyncIterator[Deployment]:
    """Start the deployment; `env` adds settings (autogrow's scheduler, loop periods...), `pool`
    overrides parts of the default pool, `plan` fixes the ports and identity beforehand (for a
    Slurm whose hooks must know them). On exit every process is stopped by SIGTERM and must
    exit 0, and the exchange and queues are deleted."""
    started = time.monotonic()
    plan = plan or Plan.make(workdir)
    directory, urls = plan.directory, plan.urls
    ports = {service: int(url.rsplit(":", 1)[1]) for service, url in urls.items()}
    idp, idp_thread, adfs_url = _serve_idp(directory)
    processes = Processes({}, workdir / "logs")
    codes: dict[str, int] = {}
    try:
        recipes = await asyncio.to_thread(rehearsal_recipes, workdir, moto.endpoint, REGION)
        subnets = await asyncio.to_thread(default_subnets, moto.endpoint, REGION)
        processes.env = clean_environment(
            {
                "HPCFLEET_DATABASE_URL": database_url,
                "HPCFLEET_BUS_URL": rabbitmq_url,
                "HPCFLEET_EXCHANGE": exchange,
                "HPCFLEET_RELAY_INTERVAL": "0.2",
                "HPCFLEET_AWS_ENDPOINT_URL": moto.endpoint,
                "HPCFLEET_AWS_REGION": REGION,
                "HPCFLEET_LOG_LEVEL": "INFO",
                **directory.auth_environment(adfs_url),
                **directory.client_environment(urls["auth"]),
                "HPCFLEET_POOL_DEFAULT_POOL": json.dumps(pool_spec(subnets, **(pool or {}))),
                "HPCFLEET_POOL_RECONCILE_INTERVAL": "0.5",
                "HPCFLEET_BAKERY_RECIPES": str(recipes),
                "HPCFLEET_BAKERY_WORK_DIR": str(workdir / "bakery"),
                "HPCFLEET_BAKERY_POLL_SECONDS": "0.2",
                "HPCFLEET_BAKERY_BUILD_INTERVAL": "1",
                "HPCFLEET_BAKERY_LEASE_SECONDS": "30",
                **env,
            }
        )
        deployment = Deployment(
            workdir, processes, urls, directory, adfs_url, moto, rabbitmq_url, exchange
        )
        for service in SERVICES:
            processes.api(service, ports[service])
            processes.worker(service)
        await asyncio.gather(
            *(
                processes.wait_healthy(url, name=f"{service}-api", timeout=180)
                for service, url in urls.items()
            )
        )
        await subscribed(rabbitmq_url, exchange, CONSUMERS, alive=processes.check)
        deployment.timings["processes up"] = time.monotonic() - started
        deployment.operator_token = await deployment.sign_in()
        await _roles_ready(deployment)
        deployment.timings["credentials ready"] = time.monotonic() - started
        yield deployment
    finally:
        codes = processes.stop_all()
        idp.should_exit = True
        idp_thread.join(timeout=10)
        await delete_rabbit_namespace(rabbitmq_url, exchange, CONSUMERS)
    unclean = {name: code for name, code in codes.items() if code != 0}
    assert not unclean, f"{unclean}\n{processes.report(list(unclean))}"


async def subscribed(
    rabbitmq_url: str,
    exchange: str,
    consumers: Sequence[str],
    *,
    alive: Callable[[], None] = lambda: None,
    timeout: float = 120.0,  # noqa: ASYNC109 (a polling deadline)
) -> None:
    """Wait until each consuming worker has declared its queue: from then on no event is
    published to an exchange with nobody bound to it for them (such an event would be lost)."""
    deadline = time.monotonic() + timeout
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        for consumer in consumers:
            while True:
                alive()
                channel = await connection.channel()
                try:
                    await channel.declare_queue(f"{exchange}.{consumer}", passive=True)
                    break
                except aio_pika.exceptions.ChannelClosed:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the {consumer} worker never subscribed") from None
                    await asyncio.sleep(0.1)
    finally:
        await connection.close()


async def _roles_ready(deployment: Deployment, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """auth signed in to AD FS for every service role and holds fresh STS credentials."""
    deadline = time.monotonic() + timeout
    roles: Any = None
    async with deployment.client("auth") as auth:
        while time.monotonic() < deadline:
            deployment.processes.check()
            roles = (await auth.get("/auth/roles")).json()
            if roles and all(role["ready"] for role in roles):
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"auth's roles never became ready: {roles}")


class SlurmBridge:
    """What EC2 does to a compute node, done to the emulated Slurm node: while the pool's
    provisioned instance runs, the node with its scheduler name is booted (slurmd starts and
    registers); once the instance stops, every process of the node is killed, jobs included, as
    a real power-off would. New instances warming up before they are provisioned stay down: the
    pool stops them after their first boot, before the scheduler would use them."""

    def __init__(self, cluster: SlurmCluster, engine: AsyncEngine, endpoint: str) -> None:
        self.cluster = cluster
        self.engine = engine
        self.ec2 = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="test-harness",
            aws_secret_access_key="test-harness",
        )
        self.booted: list[tuple[float, str]] = []
        self.halted: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(pool_nodes.c.instance_id, pool_nodes.c.scheduler_node_name).where(
                    pool_nodes.c.provisioned.is_(True), pool_nodes.c.instance_id.is_not(None)
                )
            )
            names = {row.instance_id: row.scheduler_node_name for row in rows}
        running = await asyncio.to_thread(self._running_instances)
        wanted = {names[i] for i in running if i in names}
        up = set(self.cluster.up_nodes())
        boot = sorted(wanted - up)
        halt = sorted(up - wanted)
        if boot:
            await asyncio.to_thread(self.cluster.node_up, boot)
            self.booted += [(time.time(), name) for name in boot]
        if halt:
            await asyncio.to_thread(self.cluster.node_down, halt)
            self.halted += [(time.time(), name) for name in halt]

    def _running_instances(self) -> set[str]:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": "tag-key", "Values": [POOL_TAG]},
                {"Name": "instance-state-name", "Values": ["running"]},
            ]
        )
        return {
            i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]
        }

    def check(self) -> None:
        """Raise the error that stopped the bridge, if it did."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            error = self._task.exception()
            if error is not None:
                raise AssertionError(f"the Slurm bridge failed: {error!r}") from error

    @asynccontextmanager
    async def running(self, every: float = 0.2) -> AsyncIterator[SlurmBridge]:
        async def loop() -> None:
            while True:
                await self.sync()
                await asyncio.sleep(every)

        self._task = asyncio.create_task(loop(), name="slurm-bridge")
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def eventually(
    check: Callable[[], Awaitable[Any]],
    *,
    within: float,
    what: str,
    every: float = 0.2,
    health: Sequence[Callable[[], None]] = (),
) -> Any:
    """Poll `check` until it returns something truthy, and return that; fail saying what never
    happened. Each of `health` is called first and raises if a part died (a service process,
    the bridge), so a crash fails at once instead of as a timeout."""
    deadline = time.monotonic() + within
    while True:
        for alive in health:
            alive()
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)
