"""A reconcile loop: a pass every N seconds, or at once when kicked; a failing pass never kills it.

Level-triggered: events only `kick()` the loop, the pass itself reads the real state, so a lost or
repeated kick can delay the system but never corrupt it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shared.clock import Clock

log = logging.getLogger(__name__)


class ReconcileLoop:
    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[Any]],
        *,
        interval: float,
        clock: Clock,
        fixed_rate: bool = False,
    ) -> None:
        """`fixed_rate`: a pass every `interval` from the start of the last one, not its end (a
        poll whose reader waits for what it sees: however long a pass takes, nothing waits more
        than `interval` for the next one to begin)."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.name = name
        self.interval = interval
        self.fixed_rate = fixed_rate
        self._began = clock.now()
        self._step = step
        self._clock = clock
        self._kicked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        self.failures = 0
        self.last_error: str | None = None

    def kick(self) -> None:
        """Run the next pass now instead of at the next tick."""
        self._kicked.set()

    async def run_once(self) -> bool:
        """One pass; returns False (and logs) if it failed."""
        self._kicked.clear()
        self._began = self._clock.now()
        try:
            await self._step()
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("reconcile pass of %s failed; retrying next tick", self.name)
            return False
        finally:
            self.passes += 1
        self.last_error = None
        return True

    async def run(self) -> None:
        while True:
            await self.run_once()
            await self._wait()

    async def _wait(self) -> None:
        if self._kicked.is_set():
            return
        kicked = asyncio.ensure_future(self._kicked.wait())
        delay = self.interval
        if self.fixed_rate:
            delay -= (self._clock.now() - self._began).total_seconds()
        tick = asyncio.ensure_future(self._clock.sleep(max(0.0, delay)))
        try:
            await asyncio.wait({kicked, tick}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Gather rather than await each: a cancel of this task that lands here must not be
            # swallowed along with the waiters' own CancelledError, or stop() would hang.
            kicked.cancel()
            tick.cancel()
            await asyncio.gather(kicked, tick, return_exceptions=True)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"loop:{self.name}")
        return self._task

    async def stop(self) -> None:
        """Cancel the loop; a pass in progress is interrupted at its next await."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
