"""What a service is made of, and how a process runs one or several of them.

A service = its API router, its bus handlers, its reconcile loops and its mailbox (inbox, outbox
and relay). The composition roots (one process per service, or everything in one process) build
a `Runtime` from settings and hand it to each service's `build()`; nothing connects at import time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.api import ReadinessCheck
from shared.bus import Bus, Handler, create_bus
from shared.clock import Clock, SystemClock
from shared.loop import ReconcileLoop
from shared.outbox import Mailbox, MailboxTables, OutboxRelay
from shared.settings import Settings
from shared.store import create_engine, ping

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The process's connections and clock, built once by the composition root."""

    settings: Settings
    engine: AsyncEngine
    bus: Bus
    clock: Clock

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Clock | None = None, bus: Bus | None = None
    ) -> Runtime:
        return cls(
            settings=settings,
            engine=create_engine(settings.database_url),
            bus=bus
            or create_bus(
                settings.bus_url,
                exchange=settings.exchange,
                prefetch=settings.prefetch,
                delivery_limit=settings.delivery_limit,
            ),
            clock=clock or SystemClock(),
        )

    async def start(self) -> None:
        await self.bus.start()

    async def close(self) -> None:
        await self.bus.stop()
        await self.engine.dispose()

    def mailbox(self, tables: MailboxTables) -> Mailbox:
        return Mailbox(tables, self.engine, self.clock)

    def readiness(self) -> list[ReadinessCheck]:
        return [("database", lambda: ping(self.engine)), ("bus", self.bus.ping)]


@dataclass
class Service:
    """One service's parts; `start_worker` subscribes and runs its loops, `stop` drains them."""

    name: str
    router: APIRouter
    mailbox: Mailbox
    relay: OutboxRelay
    relay_loop: ReconcileLoop
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    loops: Sequence[ReconcileLoop] = ()
    readiness: Sequence[ReadinessCheck] = ()  # beyond the database and the bus

    @classmethod
    def create(
        cls,
        name: str,
        runtime: Runtime,
        mailbox: Mailbox,
        router: APIRouter,
        handlers: Mapping[str, Handler] | None = None,
        loops: Sequence[ReconcileLoop] = (),
        readiness: Sequence[ReadinessCheck] = (),
    ) -> Service:
        relay = OutboxRelay(
            mailbox.tables,
            runtime.engine,
            runtime.bus,
            runtime.clock,
            batch=runtime.settings.relay_batch,
        )
        relay_loop = ReconcileLoop(
            f"{name}.relay",
            relay.relay,
            interval=runtime.settings.relay_interval,
            clock=runtime.clock,
        )
        mailbox.on_emit = relay_loop.kick
        return cls(name, router, mailbox, relay, relay_loop, handlers or {}, loops, readiness)

    def start_relay(self) -> None:
        self.relay_loop.start()

    async def start_worker(self, bus: Bus) -> None:
        if self.handlers:
            await bus.subscribe(self.name, self.handlers)
        self.start_relay()
        for loop in self.loops:
            loop.start()
        log.info("worker %s started: handles %s", self.name, sorted(self.handlers))

    async def stop(self) -> None:
        await asyncio.gather(*(loop.stop() for loop in self.loops))
        await self.relay_loop.stop()
