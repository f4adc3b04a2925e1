"""Every service in one process: one API on one port, the workers beside it, one bus and store.

`hpcfleet up` (services/up.py) runs the system this way. It goes through the same services,
handlers, loops and outbox relays as the distributed mode; only the runtime differs.
"""

from __future__ import annotations

import asyncio
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
async def running(runtime: Runtime, services: Sequence[Service]) -> AsyncIterator[None]:
    """Migrate, start the bus and every service's worker; stop them all on exit."""
    await upgrade(runtime.engine)
    await runtime.start()
    try:
        for service in services:
            await service.start_worker(runtime.bus)
        yield
    finally:
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
) -> FastAPI:
    """One app over `services` (default: every service built from the registry); `started` is
    set once their workers run."""
    chosen = list(services) if services is not None else [b(runtime) for b in SERVICES.values()]

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with running(runtime, chosen):
            if started is not None:
                started.set()
            yield

    return create_app(
        title="hpcfleet",
        description="Every hpcfleet service in one process.",
        routers=[*(service.router for service in chosen), *extra_routers],
        readiness=[*runtime.readiness(), *(c for s in chosen for c in s.readiness)],
        lifespan=lifespan,
        guard=guard,
    )
