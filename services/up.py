"""`hpcfleet up`: the whole system in one process on embedded defaults.

Every service runs through its production code: one in-memory bus and one SQLite file (or the
given PostgreSQL and RabbitMQ), an embedded moto server standing in for AWS, and the simulated
scheduler replaying a bundled real trace on an accelerated clock. Bakery bakes an image, pool fills
and rolls onto it, autogrow powers nodes on and off with the workload; the status page at `/` and
a live summary in the terminal show it. Everything it writes stays in `--state-dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import boto3
import httpx
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.console.router import make_router as console_router
from services.single import single_process_app
from shared.api import ApiGuard
from shared.clock import ScaledClock, SystemClock
from shared.cloud.moto_server import MotoServer
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, Settings, load_settings
from shared.tokens import TokenIssuer, TokenVerifier, generate_signing_key, public_key_pem

DAY_PER_MINUTE = 1440.0


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
        iam.create_instance_profile(InstanceProfileName=recipe["iam_instance_profile"])
    recipe["base"] = {"image_id": base["ImageId"]}
    for step in recipe["steps"]:
        step["script"] = str(examples / step["script"])
    recipe["first_boot"]["template"] = str(examples / recipe["first_boot"]["template"])
    recipe["validation"]["smoke_check"] = str(examples / recipe["validation"]["smoke_check"])
    recipe["regions"] = [region]
    path = state_dir / "recipes.json"
    path.write_text(json.dumps({"recipes": {"linux": recipe}}, indent=2))
    return path


def environment(options: UpOptions, moto: str, key_file: Path, recipes: Path) -> dict[str, str]:
    """The settings every service reads, for this run (set in this process's environment).

    Loop periods are given in real seconds times `speed`, so that at any speed the loops run a
    few times a second of real time instead of spinning."""
    state = options.state_dir
    surge = options.nodes + max(1, -(-options.nodes // 10))

    def every(real_seconds: float) -> str:
        return str(real_seconds * options.speed)

    return {
        "HPCFLEET_DATABASE_URL": options.postgres or f"sqlite+aiosqlite:///{state / 'hpcfleet.db'}",
        "HPCFLEET_BUS_URL": options.rabbitmq or "memory://",
        "HPCFLEET_AWS_ENDPOINT_URL": moto,
        "HPCFLEET_AUTH_ENVIRONMENT": "development",
        "HPCFLEET_AUTH_SIGNING_KEY": f"file:{key_file}",
        "HPCFLEET_AUTOGROW_SCHEDULER": "simulated",
        "HPCFLEET_AUTOGROW_SIMULATED_TRACE": options.trace,
        "HPCFLEET_AUTOGROW_SIMULATED_NODES": f"node[001-{surge:03d}]",
        "HPCFLEET_BAKERY_WORK_DIR": str(state / "bakery"),
        "HPCFLEET_BAKERY_RECIPES": str(recipes),
        "HPCFLEET_RELAY_INTERVAL": every(0.25),
        "HPCFLEET_POOL_RECONCILE_INTERVAL": every(0.5),
        "HPCFLEET_AUTOGROW_POLL_INTERVAL": every(0.25),
        "HPCFLEET_AUTOGROW_STALE_SECONDS": every(3.0),
        "HPCFLEET_AUTOGROW_COMMAND_TIMEOUT_SECONDS": every(5.0),
        "HPCFLEET_AUTOGROW_POLICY__BOOT_TIMEOUT_SECONDS": every(10.0),
        "HPCFLEET_BAKERY_POLL_SECONDS": every(0.1),
        "HPCFLEET_BAKERY_BUILD_INTERVAL": every(0.5),
        "HPCFLEET_BAKERY_LEASE_SECONDS": every(5.0),
        "HPCFLEET_BAKERY_SCHEDULE_INTERVAL": every(5.0),
    }


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
    key_file = options.state_dir / "token-signing-key.pem"
    key = generate_signing_key()
    from cryptography.hazmat.primitives import serialization

    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    (options.state_dir / "token-public-keys.pem").write_text(public_key_pem(key.public_key()))

    with MotoServer() as moto:
        region = Settings().aws_region
        recipes = rehearsal_recipes(options.state_dir, moto.endpoint, region)
        os.environ.update(environment(options, moto.endpoint, key_file, recipes))
        settings = load_settings(Settings)
        runtime = Runtime.from_settings(settings, clock=ScaledClock(options.speed))
        services = build_services(runtime, options, moto)
        issuer = TokenIssuer(key)
        guard = ApiGuard(TokenVerifier([key.public_key()]), SystemClock())

        started = asyncio.Event()
        app = single_process_app(
            runtime,
            services,
            extra_routers=[console_router(issuer, SystemClock())],
            guard=guard,
            started=started,
        )
        await serve(app, options, issuer, started)


async def serve(
    app: FastAPI, options: UpOptions, issuer: TokenIssuer, started: asyncio.Event
) -> None:
    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_config=None, log_level="warning"
    )
    server = uvicorn.Server(config)
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again; with handlers of
    # our own in place that second signal is a no-op, so Ctrl-C ends `up` cleanly (status 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: None)
    url = f"http://{options.host}:{options.port}/"
    operator = issuer.issue(
        "up",
        "operator",
        [
            "pool:read",
            "pool:write",
            "bakery:read",
            "bakery:write",
            "autogrow:read",
            "autogrow:write",
            "audit:read",
        ],
        SystemClock().now(),
    )
    serving = asyncio.create_task(server.serve())
    ready = asyncio.create_task(started.wait())
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        ready.cancel()
        await serving
        return
    headers = {"authorization": f"Bearer {operator}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
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
