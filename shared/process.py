"""Running one service as its own process: the worker (bus + loops) or the API (uvicorn factory).

Both build their dependencies here from the environment, stop cleanly on SIGTERM/SIGINT (the
consumer is cancelled, in-flight handlers finish, connections close), and turn a configuration
error into one clear line and exit status 2.

A rehearsal replays a workload faster than real time (`HPCFLEET_CLOCK_SPEED`); every process of
one run then reads the same accelerated clock, anchored at the real Unix time
`HPCFLEET_CLOCK_EPOCH`, so that times one process records mean the same to the others. Tokens are
always checked against real time: they are signed and expire in real time.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import eventloop
from shared.api import ApiGuard, create_app
from shared.clock import Clock, ScaledClock, SystemClock
from shared.logs import configure_logging
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, Settings, load_settings
from shared.tokens import TokenVerifier

ServiceBuilder = Callable[[Runtime], Service]


class ClockSettings(BaseSettings):
    """`HPCFLEET_CLOCK_`: the clock of a rehearsal that replays a workload faster than real time."""

    model_config = SettingsConfigDict(env_prefix="HPCFLEET_CLOCK_", extra="ignore")

    speed: float = Field(
        default=1.0, gt=0, description="How much faster than real time the clock runs (1: real)."
    )
    epoch: float | None = Field(
        default=None,
        description="Real Unix time at which the accelerated clock reads the same as real time; "
        "give every process of one run the same value (default: when the process starts).",
    )


def process_clock(settings: ClockSettings) -> Clock:
    """The system clock, or the accelerated clock every process of the run agrees on."""
    if settings.speed == 1.0:
        return SystemClock()
    real_now = time.time()
    epoch = settings.epoch if settings.epoch is not None else real_now
    origin = datetime.fromtimestamp(epoch, UTC) + timedelta(
        seconds=(real_now - epoch) * settings.speed
    )
    return ScaledClock(settings.speed, origin)


def accelerated_loops(speed: float) -> dict[str, str]:
    """The services' loop periods for a run whose clock goes `speed` times real time.

    Given in real seconds times `speed`, so that at any speed the loops run a few times a second
    of real time instead of spinning (`hpcfleet up`, the chaos run)."""

    def every(real_seconds: float) -> str:
        return str(real_seconds * speed)

    return {
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


def _clock_or_exit() -> Clock:
    try:
        return process_clock(load_settings(ClockSettings))
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _settings_or_exit() -> Settings:
    try:
        settings = load_settings(Settings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


async def run_worker(build: ServiceBuilder, settings: Settings, clock: Clock | None = None) -> None:
    runtime = Runtime.from_settings(settings, clock=clock or _clock_or_exit())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start()
    service = build(runtime)
    # Everything alive now (the imported libraries: ~170,000 objects) lives as long as the process;
    # frozen, a full garbage collection no longer walks it, which took a 100-300 ms pause out of
    # autogrow's decisions (tests/benchmarks/bench_autogrow.py).
    gc.freeze()
    try:
        await service.start_worker(runtime.bus)
        await stop.wait()
    finally:
        await runtime.bus.stop()
        await service.stop()
        await runtime.close()


def worker_main(build: ServiceBuilder) -> None:
    """Entry point of `python -m services.<name>.worker` (on uvloop: `shared.eventloop`)."""
    settings = _settings_or_exit()
    eventloop.run(run_worker(build, settings))


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
    runtime = Runtime.from_settings(settings, clock=_clock_or_exit())
    try:
        guard = api_guard(settings, SystemClock())  # tokens live in real time
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return api_app(title, runtime, build(runtime), guard)


def api_app(
    title: str,
    runtime: Runtime,
    service: Service,
    guard: ApiGuard | None,
    *,
    prepare: Callable[[FastAPI], Awaitable[None]] | None = None,
) -> FastAPI:
    """One service's API on `runtime`, relaying the service's outbox while it runs; `prepare`
    runs once the bus is up and before the relay starts (tests migrate and seed there)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            if prepare is not None:
                await prepare(app)
            service.start_relay()
            gc.freeze()  # as run_worker does: the API process relays the outbox
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
