"""`hpcfleet up`: the whole system in one process on embedded defaults.

Every service runs through its production code: one in-memory bus and one SQLite file (or the
given PostgreSQL and RabbitMQ), an embedded moto server standing in for AWS, and the simulated
scheduler replaying a bundled real trace on an accelerated clock. Bakery bakes an image, pool fills
and rolls onto it, autogrow powers nodes on and off with the workload; the status page at `/` and
a live summary in the terminal show it. Everything it writes stays in `--state-dir`.

Sign-in goes the production way too. The development IdP stands in for AD FS on a loopback port of
its own, over https (AD FS's session cookie is `Secure`), and auth trusts it as AD FS. `up` gets its
operator token and the status page's read-only token through `hpcfleet login`'s own code (AD FS
forms sign-in, signed SAML, exchanged at auth), renewing them before they expire. pool and bakery
get their AWS credentials from auth, whose STS broker signs in to the IdP for each service role and
calls the embedded moto's `AssumeRoleWithSAML`; their workers start once auth serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import boto3
import httpx
import uvicorn
from botocore.exceptions import ClientError
from fastapi import FastAPI
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.auth.development import OPERATOR, DevDirectory, idp_server, served_url
from services.auth.login import LoginError, login, read_token
from services.console.router import VIEWER_SCOPES
from services.console.router import make_router as console_router
from services.single import single_process_app
from shared.api import ApiGuard
from shared.clock import SystemClock
from shared.cloud.moto_server import MotoServer
from shared.process import ClockSettings, accelerated_loops, process_clock
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, Settings, load_settings
from shared.tokens import TokenVerifier

DAY_PER_MINUTE = 1440.0
OPERATOR_SCOPES = (
    "pool:read",
    "pool:write",
    "bakery:read",
    "bakery:write",
    "autogrow:read",
    "autogrow:write",
    "audit:read",
    "admin",
)
"""What `up` itself does as the operator: bake, watch, and check auth's roles at start."""
AWS_SERVICES = ("pool", "bakery")
"""The services `up` runs that call AWS, each with its own role and auth client."""
SIGN_IN_TIMEOUT = 30.0
"""Seconds for auth to serve and hold fresh credentials for every role at start."""


@dataclass(frozen=True)
class UpOptions:
    host: str
    port: int
    speed: float
    nodes: int
    trace: str
    state_dir: Path
    postgres: str | None
    rabbitmq: str | None
    live: bool = True


def check_options(options: UpOptions) -> None:
    """Refuse what cannot work, with one line each, before anything starts."""
    if options.speed <= 0:
        raise ConfigurationError("--speed must be more than 0 (1440 replays a day in a minute)")
    if not 1 <= options.nodes <= 500:
        raise ConfigurationError("--nodes must be between 1 and 500")
    if not _loopback_reachable(options.host):
        raise ConfigurationError(
            f"--host {options.host}: up signs in to itself over plain http, so it listens on "
            "this machine only (127.0.0.1, ::1) or on every address (0.0.0.0)"
        )
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((options.host, options.port))
        except OSError as exc:
            raise ConfigurationError(
                f"port {options.port} on {options.host} is taken ({exc.strerror}); "
                "choose another with --port"
            ) from None
    from services.autogrow.swf import BUNDLED_TRACES

    if options.trace not in BUNDLED_TRACES:
        raise ConfigurationError(
            f"no bundled trace {options.trace!r}; choose one of {', '.join(BUNDLED_TRACES)}"
        )


def _loopback_reachable(host: str) -> bool:
    """Whether a server bound to `host` answers on a loopback address."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def local_url(options: UpOptions) -> str:
    """Where this process reaches its own API: over loopback, whatever address it listens on."""
    host = options.host
    if host in ("0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{options.port}"


async def check_postgres(url: str) -> None:
    import asyncpg

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        connection = await asyncio.wait_for(asyncpg.connect(dsn), 10)
    except Exception as exc:
        raise ConfigurationError(
            f"PostgreSQL at {url.split('@')[-1]} does not answer: {exc}"
        ) from None
    await connection.close()


def default_subnets(endpoint: str, region: str) -> list[dict[str, str]]:
    """The default VPC's subnets of the embedded AWS, one per zone, for the default pool."""
    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="rehearsal",
        aws_secret_access_key="rehearsal",
    )
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    chosen = sorted(subnets["Subnets"], key=lambda s: s["AvailabilityZone"])[:3]
    return [{"subnet_id": s["SubnetId"], "zone": s["AvailabilityZone"]} for s in chosen]


def rehearsal_recipes(state_dir: Path, endpoint: str, region: str) -> Path:
    """bakery's bundled `linux` recipe on a base image made in the embedded AWS (which has no
    Amazon Linux images to find by name), written where `up` keeps its state."""
    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="rehearsal",
        aws_secret_access_key="rehearsal",
    )
    seed = ec2.run_instances(ImageId="ami-0a1b2c3d4e5f60718", MinCount=1, MaxCount=1)
    instance = seed["Instances"][0]["InstanceId"]
    base = ec2.create_image(InstanceId=instance, Name="al2023-ami-2023.6-x86_64 (rehearsal)")
    ec2.terminate_instances(InstanceIds=[instance])
    examples = Path(str(files("services.bakery").joinpath("examples")))
    recipe = json.loads((examples / "recipes.json").read_text())["recipes"]["linux"]
    if recipe.get("iam_instance_profile"):
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id="rehearsal",
            aws_secret_access_key="rehearsal",
        )
        try:
            iam.create_instance_profile(InstanceProfileName=recipe["iam_instance_profile"])
        except ClientError as exc:  # moto's state is per process: a second run finds it there
            if exc.response.get("Error", {}).get("Code") != "EntityAlreadyExists":
                raise
    recipe["base"] = {"image_id": base["ImageId"]}
    for step in recipe["steps"]:
        step["script"] = str(examples / step["script"])
    recipe["first_boot"]["template"] = str(examples / recipe["first_boot"]["template"])
    recipe["validation"]["smoke_check"] = str(examples / recipe["validation"]["smoke_check"])
    recipe["regions"] = [region]
    path = state_dir / "recipes.json"
    path.write_text(json.dumps({"recipes": {"linux": recipe}}, indent=2))
    return path


def environment(
    options: UpOptions, moto: str, recipes: Path, identity: DevDirectory, adfs_url: str
) -> dict[str, str]:
    """The settings every service reads, for this run (set in this process's environment)."""
    state = options.state_dir
    surge = options.nodes + max(1, -(-options.nodes // 10))
    return {
        "HPCFLEET_DATABASE_URL": options.postgres or f"sqlite+aiosqlite:///{state / 'hpcfleet.db'}",
        "HPCFLEET_BUS_URL": options.rabbitmq or "memory://",
        "HPCFLEET_AWS_ENDPOINT_URL": moto,
        **identity.auth_environment(adfs_url, environment="development"),
        **identity.client_environment(local_url(options)),
        "HPCFLEET_AUTOGROW_SCHEDULER": "simulated",
        "HPCFLEET_AUTOGROW_SIMULATED_TRACE": options.trace,
        "HPCFLEET_AUTOGROW_SIMULATED_NODES": f"node[001-{surge:03d}]",
        "HPCFLEET_BAKERY_WORK_DIR": str(state / "bakery"),
        "HPCFLEET_BAKERY_RECIPES": str(recipes),
        **accelerated_loops(options.speed),
    }


class SignedIn:
    """A token got the way `hpcfleet login` gets one (AD FS sign-in as the operator, the SAML
    exchanged at auth), for `scopes`; signed in again a minute before it expires, so a long `up`
    never holds an expired token."""

    def __init__(
        self,
        *,
        auth_url: str,
        adfs_url: str,
        identity: DevDirectory,
        adfs_verify: ssl.SSLContext,
        scopes: tuple[str, ...],
        token_path: Path,
    ) -> None:
        self._auth_url = auth_url
        self._adfs_url = adfs_url
        self._identity = identity
        self._adfs_verify = adfs_verify
        self._scopes = scopes
        self._path = token_path
        self._cached: tuple[str, datetime] | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            now = datetime.now(UTC)
            if self._cached is not None and self._cached[1] - timedelta(minutes=1) > now:
                return self._cached[0]
            result = await login(
                auth_url=self._auth_url,
                adfs_url=self._adfs_url,
                username=OPERATOR,
                password=self._identity.operator.password,
                token_path=self._path,
                scope=" ".join(self._scopes),
                adfs_verify=self._adfs_verify,
            )
            token = await asyncio.to_thread(read_token, self._path)
            self._cached = (token, result.expires_at)
            return token


class SignedInAuth(httpx.Auth):
    """httpx auth that sends a `SignedIn` token, renewed as it nears expiry."""

    def __init__(self, source: SignedIn) -> None:
        self._source = source

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, Any, None]:
        raise RuntimeError("SignedInAuth is for httpx.AsyncClient")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["authorization"] = f"Bearer {await self._source.token()}"
        yield request


def build_services(runtime: Runtime, options: UpOptions, moto: MotoServer) -> list[Service]:
    from services.auth.service import build as build_auth
    from services.autogrow.service import build as build_autogrow
    from services.bakery.service import build as build_bakery
    from services.pool.service import build as build_pool
    from services.pool.settings import PoolSettings
    from services.pool.spec import PoolSpec

    spec = PoolSpec.model_validate(
        {
            "name": "default",
            "size": options.nodes,
            "instance_types": ["c5.xlarge", "c5a.xlarge"],
            "subnets": default_subnets(moto.endpoint, runtime.settings.aws_region),
            "recipe": "linux",
        }
    )
    pool_settings = load_settings(PoolSettings).model_copy(update={"default_pool": spec})
    # Tokens and STS credentials live in real time, whatever speed the workload replays at.
    real_time = Runtime(runtime.settings, runtime.engine, runtime.bus, SystemClock())
    return [
        build_auth(real_time),
        build_bakery(runtime),
        build_pool(runtime, pool_settings),
        build_autogrow(runtime),
    ]


async def bake_first_image(client: httpx.AsyncClient) -> None:
    """Ask bakery for an image at once (its schedule would wait for Patch Tuesday)."""
    for _ in range(50):
        response = await client.post("/bakery/builds", json={"recipe": "linux", "reason": "up"})
        if response.status_code in (202, 409):
            return
        await asyncio.sleep(0.2)


def summary_table(pool: dict[str, Any], queue: dict[str, Any] | None, cost: Any) -> Table:
    table = Table(title="hpcfleet", show_header=False, expand=False)
    by_state = pool.get("by_state", {})
    table.add_row("image", str(pool.get("spec", {}).get("image_id") or "baking..."))
    table.add_row("nodes", ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) or "none")
    snapshot = (queue or {}).get("snapshot") or {}
    pending = sum(p.get("pending_jobs", 0) for p in snapshot.get("partitions", []))
    table.add_row("queue", f"{pending} waiting, {snapshot.get('running_jobs', 0)} running")
    table.add_row("scheduler time", str(snapshot.get("taken_at", "-"))[:19])
    if isinstance(cost, dict) and "billed_node_hours" in cost:
        table.add_row("cost so far", f"{cost['billed_node_hours']:.1f} node-hours")
    return table


async def live_summary(client: httpx.AsyncClient, console: Console, url: str) -> None:
    console.print(f"hpcfleet is up: status page {url}  API docs {url}docs  (Ctrl-C stops it)")
    with Live(console=console, refresh_per_second=1, transient=False) as live:
        while True:
            await asyncio.sleep(2)
            try:
                pool = (await client.get("/pool/pools/default")).json()
                queue_response = await client.get("/autogrow/queue")
                queue = queue_response.json() if queue_response.status_code == 200 else None
                cost_response = await client.get("/autogrow/cost")
                cost = cost_response.json() if cost_response.status_code == 200 else None
                if isinstance(pool, dict) and "spec" in pool:
                    live.update(summary_table(pool, queue, cost))
            except httpx.HTTPError:
                continue


async def up(options: UpOptions) -> None:
    check_options(options)
    if options.postgres:
        await check_postgres(options.postgres)
    options.state_dir.mkdir(parents=True, exist_ok=True)
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again; with handlers of
    # our own in place that second signal is a no-op, so Ctrl-C ends `up` cleanly (status 0).
    # Set before the IdP's server starts, so that Ctrl-C stops it after the main one.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: None)
    identity = await asyncio.to_thread(
        DevDirectory.create, options.state_dir / "identity", datetime.now(UTC), AWS_SERVICES
    )
    adfs = idp_server(identity.idp(SystemClock()), identity.tls)
    adfs_serving = asyncio.create_task(adfs.serve(), name="dev-adfs")
    try:
        adfs_url = await _listening(adfs, adfs_serving)
        # EC2 stamps launch times on the services' accelerated clock, so billing follows it
        epoch = time.time()
        with MotoServer(clock_speed=options.speed, clock_epoch=epoch) as moto:
            region = Settings().aws_region
            recipes = rehearsal_recipes(options.state_dir, moto.endpoint, region)
            os.environ.update(environment(options, moto.endpoint, recipes, identity, adfs_url))
            settings = load_settings(Settings)
            clock = process_clock(ClockSettings(speed=options.speed, epoch=epoch))
            runtime = Runtime.from_settings(settings, clock=clock)
            services = build_services(runtime, options, moto)
            verifier = TokenVerifier([identity.token_public_keys.read_text()])
            guard = ApiGuard(verifier, SystemClock())
            tls = identity.tls.client_context()

            def signed_in(scopes: tuple[str, ...], name: str) -> SignedIn:
                return SignedIn(
                    auth_url=local_url(options),
                    adfs_url=adfs_url,
                    identity=identity,
                    adfs_verify=tls,
                    scopes=scopes,
                    token_path=identity.folder / name,
                )

            operator = signed_in(OPERATOR_SCOPES, "operator.token")
            viewer = signed_in(VIEWER_SCOPES, "status-page.token")
            hold, started = asyncio.Event(), asyncio.Event()
            app = single_process_app(
                runtime,
                services,
                extra_routers=[console_router(None, SystemClock(), token_source=viewer.token)],
                guard=guard,
                started=started,
                hold=hold,
            )
            await serve(app, options, operator, hold, started)
    finally:
        adfs.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await adfs_serving


async def _listening(server: uvicorn.Server, serving: asyncio.Task[None]) -> str:
    """The URL of a uvicorn server started as `serving`, once it listens."""
    deadline = time.monotonic() + 15
    while not server.started:
        if serving.done() or time.monotonic() > deadline:
            raise ConfigurationError("the development identity provider did not start")
        await asyncio.sleep(0.01)
    return served_url(server)


async def sign_in_and_wait_for_credentials(
    options: UpOptions, operator: SignedIn, serving: asyncio.Task[None]
) -> bool:
    """Sign in as the operator once auth serves, then wait until auth holds fresh AWS credentials
    for every role (its broker signed in to the IdP and called STS), so no worker asks too early.
    False if the server stopped meanwhile (Ctrl-C); a ConfigurationError if it never gets there."""
    deadline = time.monotonic() + SIGN_IN_TIMEOUT
    problem = "auth did not answer"
    async with httpx.AsyncClient(base_url=local_url(options), timeout=5) as client:
        while time.monotonic() < deadline:
            if serving.done():
                return False
            try:
                token = await operator.token()
                answer = await client.get(
                    "/auth/roles", headers={"authorization": f"Bearer {token}"}
                )
                roles = answer.json() if answer.status_code == 200 else None
                if roles and all(role["ready"] for role in roles):
                    return True
                problem = f"auth's roles are not ready: {roles or answer.text}"
            except (LoginError, httpx.HTTPError) as exc:
                problem = str(exc) or type(exc).__name__
            await asyncio.sleep(0.05)
    raise ConfigurationError(
        f"signing in through the development identity provider failed: {problem}"
    )


async def serve(
    app: FastAPI,
    options: UpOptions,
    operator: SignedIn,
    hold: asyncio.Event,
    started: asyncio.Event,
) -> None:
    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_config=None, log_level="warning"
    )
    server = uvicorn.Server(config)
    url = f"http://{options.host}:{options.port}/"
    serving = asyncio.create_task(server.serve())
    try:
        signed_in = await sign_in_and_wait_for_credentials(options, operator, serving)
    except ConfigurationError:
        server.should_exit = True
        await serving
        raise
    if signed_in:
        hold.set()  # auth serves credentials now: the workers may start
        ready = asyncio.create_task(started.wait())
        await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
    if serving.done():
        await serving
        return
    auth = SignedInAuth(operator)
    async with httpx.AsyncClient(base_url=local_url(options), auth=auth, timeout=10) as client:
        await bake_first_image(client)
        summary = (
            asyncio.create_task(live_summary(client, Console(), url)) if options.live else None
        )
        try:
            await serving
        finally:
            if summary is not None:
                summary.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await summary
