"""Running one service as its own process: the worker (bus + loops) or the API (uvicorn factory).

Both build their dependencies here from the environment, stop cleanly on SIGTERM/SIGINT (the
consumer is cancelled, in-flight handlers finish, connections close), and turn a configuration
error into one clear line and exit status 2.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shared.api import ApiGuard, create_app
from shared.clock import Clock
from shared.logs import configure_logging
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, Settings, load_settings
from shared.tokens import TokenVerifier

ServiceBuilder = Callable[[Runtime], Service]


def _settings_or_exit() -> Settings:
    try:
        settings = load_settings(Settings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


async def run_worker(build: ServiceBuilder, settings: Settings) -> None:
    runtime = Runtime.from_settings(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start()
    service = build(runtime)
    try:
        await service.start_worker(runtime.bus)
        await stop.wait()
    finally:
        await runtime.bus.stop()
        await service.stop()
        await runtime.close()


def worker_main(build: ServiceBuilder) -> None:
    """Entry point of `python -m services.<name>.worker`."""
    settings = _settings_or_exit()
    asyncio.run(run_worker(build, settings))


def api_guard(settings: Settings, clock: Clock) -> ApiGuard | None:
    """The token check of a service API, from settings; refuses to run open by accident."""
    if settings.api_auth == "disabled":
        return None
    if settings.token_public_keys is None:
        raise ConfigurationError(
            "invalid configuration: HPCFLEET_TOKEN_PUBLIC_KEYS: the API needs auth's public key "
            "file (or HPCFLEET_API_AUTH=disabled for a local rehearsal)"
        )
    try:
        pem = settings.token_public_keys.read_text()
        keys = [f"-----BEGIN{part}" for part in pem.split("-----BEGIN")[1:]]
        return ApiGuard(TokenVerifier(keys), clock)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"invalid configuration: HPCFLEET_TOKEN_PUBLIC_KEYS: cannot use "
            f"{settings.token_public_keys}: {exc}"
        ) from None


def service_app(build: ServiceBuilder, *, title: str) -> FastAPI:
    """A uvicorn factory for one service's API; it also relays that service's outbox."""
    settings = _settings_or_exit()
    runtime = Runtime.from_settings(settings)
    try:
        guard = api_guard(settings, runtime.clock)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    service = build(runtime)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        service.start_relay()
        try:
            yield
        finally:
            await service.stop()
            await runtime.close()

    return create_app(
        title=title,
        routers=[service.router],
        readiness=[*runtime.readiness(), *service.readiness],
        lifespan=lifespan,
        guard=guard,
    )
