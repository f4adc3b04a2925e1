"""`hpcfleet`: the one command-line entry point (run the system, run one service, migrate)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from enum import StrEnum
from pathlib import Path

import typer
import uvicorn

from services.auth.login import login_command, logout_command
from services.operator import register as register_operator_commands
from services.registry import SERVICES
from services.simulator.cli import simulate
from shared import eventloop
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
register_operator_commands(app)


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
    port: int = typer.Option(8000, help="Port of every API, the docs (/docs) and the status page."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    speed: float = typer.Option(
        1440.0, help="How much faster than real time the workload replays (1440: a day a minute)."
    ),
    nodes: int = typer.Option(64, help="Size of the warm pool."),
    trace: str = typer.Option(
        "SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz", help="Bundled workload trace to replay."
    ),
    state_dir: Path = typer.Option(
        Path(".hpcfleet"), help="Where the SQLite file, keys and build files are kept."
    ),
    postgres: str | None = typer.Option(
        None, help="Use this PostgreSQL (postgresql+asyncpg://...) instead of a SQLite file."
    ),
    rabbitmq: str | None = typer.Option(
        None, help="Use this RabbitMQ (amqp://...) instead of the in-memory bus."
    ),
    live: bool = typer.Option(True, help="Show a live summary in the terminal."),
) -> None:
    """Run the whole system in one process: every service, an in-memory bus, a SQLite file, an
    embedded moto server as AWS, a development identity provider standing in for AD FS, and a
    simulated scheduler replaying a real trace at --speed.

    Sign-in goes the production way: the operator's token and each service's AWS credentials
    come through the real AD FS client code (signed SAML, exchanged at auth, STS for the roles)
    against the development identity provider, on a loopback port of its own. It bakes an
    image, fills the pool, rolls the pool onto the image, then powers nodes on and off with the
    workload. Open the status page at http://HOST:PORT/ and the API docs at /docs. Ctrl-C stops
    it. --postgres / --rabbitmq switch to the real store and bus.
    """
    from services.up import UpOptions
    from services.up import up as run_up

    options = UpOptions(
        host=host,
        port=port,
        speed=speed,
        nodes=nodes,
        trace=trace,
        state_dir=state_dir,
        postgres=postgres,
        rabbitmq=rabbitmq,
        live=live,
    )
    configure_logging("WARNING", "console")
    try:
        asyncio.run(run_up(options))
    except ConfigurationError as exc:
        typer.echo(f"hpcfleet up: {exc}", err=True)
        raise typer.Exit(2) from None


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
        loop=eventloop.LOOP,
        host=settings.api_host,
        port=port or settings.api_port,
        log_config=None,
    )


@app.command()
def worker(service: ServiceName) -> None:
    """Run one service's worker: its handlers, reconcile loops and outbox relay."""
    from shared.process import run_worker

    settings = _settings()
    eventloop.run(run_worker(SERVICES[service.value], settings))


def _slurm_hook(
    action: str,
    hostlist: str,
    autogrow_url: str | None,
    auth_url: str | None,
    client_secret_file: Path | None,
) -> None:
    from services.autogrow.slurm_hooks import hook_main

    url = autogrow_url or os.environ.get("HPCFLEET_AUTOGROW_URL")
    if not url:
        typer.echo("hpcfleet: give --autogrow-url (Slurm runs this with no environment)", err=True)
        raise typer.Exit(2)
    status = hook_main(
        action, hostlist, url, auth_url=auth_url, client_secret_file=client_secret_file
    )
    raise typer.Exit(status)


HOOK_AUTH_URL = typer.Option(None, help="auth's API, for the hook's token (API auth on).")
HOOK_SECRET = typer.Option(None, help="File with the slurm client's secret (API auth on).")


@app.command("slurm-resume")
def slurm_resume(
    hostlist: str = typer.Argument(help="Slurm host list, e.g. node[001-004]."),
    autogrow_url: str | None = typer.Option(None, help="autogrow's API, e.g. http://host:8000"),
    auth_url: str | None = HOOK_AUTH_URL,
    client_secret_file: Path | None = HOOK_SECRET,
) -> None:
    """Slurm's ResumeProgram: ask autogrow to power these nodes on. (Slurm's wrapper script had
    better run `python -m services.autogrow.slurm_hooks resume ...`: the same, started faster.)"""
    _slurm_hook("resume", hostlist, autogrow_url, auth_url, client_secret_file)


@app.command("slurm-suspend")
def slurm_suspend(
    hostlist: str = typer.Argument(help="Slurm host list, e.g. node[001-004]."),
    autogrow_url: str | None = typer.Option(None, help="autogrow's API, e.g. http://host:8000"),
    auth_url: str | None = HOOK_AUTH_URL,
    client_secret_file: Path | None = HOOK_SECRET,
) -> None:
    """Slurm's SuspendProgram: tell autogrow these nodes may go down (it picks the moment)."""
    _slurm_hook("suspend", hostlist, autogrow_url, auth_url, client_secret_file)


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
