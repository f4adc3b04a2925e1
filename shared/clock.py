"""Injected clocks: the system clock, a manual one for tests, a scaled one for accelerated runs.

Everything that reads the time or sleeps takes a `Clock`, so a test can step time by hand and the
single-process mode can replay a day of workload in a minute through the same code.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """Time moves only when `advance` is called; sleepers wake in deadline order."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + timedelta(seconds=seconds)
        heapq.heappush(self._sleepers, (deadline, next(self._seq), future))
        await future

    def set(self, when: datetime) -> None:
        """Jump to `when` (never backwards), waking every sleeper whose deadline passed."""
        if when < self._now:
            raise ValueError("a manual clock never goes backwards")
        self._now = when
        while self._sleepers and self._sleepers[0][0] <= when:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def advance(self, seconds: float) -> None:
        self.set(self._now + timedelta(seconds=seconds))

    async def run_for(self, seconds: float, step: float = 1.0) -> None:
        """Advance in steps, yielding to the event loop between them so woken tasks run."""
        end = self._now + timedelta(seconds=seconds)
        await settle()
        while self._now < end:
            self.set(min(end, self._now + timedelta(seconds=step)))
            await settle()


async def settle(rounds: int = 20) -> None:
    """Let ready tasks run (several hops each) before the manual clock moves again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class ScaledClock:
    """Real time multiplied by `speed` from a chosen origin: at speed 1440 a day lasts a minute."""

    def __init__(self, speed: float, origin: datetime | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._origin = origin or datetime.now(UTC)
        self._started = time.monotonic()

    def now(self) -> datetime:
        elapsed = (time.monotonic() - self._started) * self.speed
        return self._origin + timedelta(seconds=elapsed)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)
