"""Every service in one process: one API on one port, the workers beside it, one bus and store.

`hpcfleet up` (services/up.py) runs the system this way. It goes through the same services,
handlers, loops and outbox relays as the distributed mode; only the runtime differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from deploy.migrations import upgrade
from services.registry import SERVICES
from shared.api import ApiGuard, create_app
from shared.service import Runtime, Service

log = logging.getLogger(__name__)


@asynccontextmanager
async def running(
    runtime: Runtime,
    services: Sequence[Service],
    *,
    hold: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
) -> AsyncIterator[None]:
    """Migrate, start the bus and every service's worker; stop them all on exit.

    With `hold`, the workers start only once it is set, in the background: the app can then serve
    (auth first of all) before workers need it, e.g. for their AWS credentials. `started` is set
    once every worker runs."""

    async def start_workers() -> None:
        if hold is not None:
            await hold.wait()
        for service in services:
            await service.start_worker(runtime.bus)
        if started is not None:
            started.set()

    await upgrade(runtime.engine)
    await runtime.start()
    waiting: asyncio.Task[None] | None = None
    try:
        if hold is None:
            await start_workers()
        else:
            waiting = asyncio.create_task(start_workers(), name="start-workers")
        yield
    finally:
        if waiting is not None:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        await runtime.bus.stop()
        await asyncio.gather(*(service.stop() for service in services))
        await runtime.close()


def single_process_app(
    runtime: Runtime,
    services: Sequence[Service] | None = None,
    *,
    extra_routers: Sequence[APIRouter] = (),
    guard: ApiGuard | None = None,
    started: asyncio.Event | None = None,
    hold: asyncio.Event | None = None,
) -> FastAPI:
    """One app over `services` (default: every service built from the registry); `started` is
    set once their workers run, which, with `hold`, is only after `hold` is set."""
    chosen = list(services) if services is not None else [b(runtime) for b in SERVICES.values()]

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with running(runtime, chosen, hold=hold, started=started):
            yield

    return create_app(
        title="hpcfleet",
        description="Every hpcfleet service in one process.",
        routers=[*(service.router for service in chosen), *extra_routers],
        readiness=[*runtime.readiness(), *(c for s in chosen for c in s.readiness)],
        lifespan=lifespan,
        guard=guard,
    )
