"""`hpcfleet`: the one command-line entry point (run the system, run one service, migrate)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from enum import StrEnum

import typer
import uvicorn

from services.auth.login import login_command, logout_command
from services.registry import SERVICES
from services.simulator.cli import simulate
from shared.logs import configure_logging
from shared.settings import ConfigurationError, Settings, load_settings

app = typer.Typer(
    help="hpcfleet runs an HPC cluster's compute nodes on AWS EC2.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

app.command("login")(login_command)
app.command("logout")(logout_command)
app.command("simulate")(simulate)


class ServiceName(StrEnum):
    auth = "auth"
    bakery = "bakery"
    pool = "pool"
    autogrow = "autogrow"
    audit = "audit"


def _settings() -> Settings:
    try:
        settings = load_settings(Settings)
    except ConfigurationError as exc:
        typer.echo(f"hpcfleet: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


@app.command()
def up(
    port: int = typer.Option(8000, help="Port of the API, the docs (/docs) and the status page."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    postgres: str | None = typer.Option(
        None, help="Use this PostgreSQL (postgresql+asyncpg://...) instead of a SQLite file."
    ),
    rabbitmq: str | None = typer.Option(
        None, help="Use this RabbitMQ (amqp://...) instead of the in-memory bus."
    ),
) -> None:
    """Run every service in one process on embedded defaults (SQLite file, in-memory bus)."""
    from services.single import serve
    from shared.service import Runtime

    if postgres:
        os.environ["HPCFLEET_DATABASE_URL"] = postgres
    if rabbitmq:
        os.environ["HPCFLEET_BUS_URL"] = rabbitmq
    settings = _settings()
    typer.echo(f"hpcfleet is up: http://{host}:{port}/docs  (Ctrl-C stops it)")
    asyncio.run(serve(Runtime.from_settings(settings), host, port))


@app.command()
def serve(service: ServiceName, port: int | None = typer.Option(None, help="Port.")) -> None:
    """Run one service's API (uvicorn)."""
    settings = _settings()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; with a handler of our
    # own in place that second SIGTERM is a no-op and the process exits 0 like the workers do.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    uvicorn.run(
        f"services.{service.value}.app:create_app",
        factory=True,
        host=settings.api_host,
        port=port or settings.api_port,
        log_config=None,
    )


@app.command()
def worker(service: ServiceName) -> None:
    """Run one service's worker: its handlers, reconcile loops and outbox relay."""
    from shared.process import run_worker

    settings = _settings()
    asyncio.run(run_worker(SERVICES[service.value], settings))


@app.command()
def migrate() -> None:
    """Create or upgrade every service's tables (alembic)."""
    from deploy.migrations import upgrade
    from shared.store import create_engine

    settings = _settings()

    async def run() -> None:
        engine = create_engine(settings.database_url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    typer.echo("migrated")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
