"""The clocks and the reconcile loop, on a manual clock so nothing waits for real time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from shared.clock import ManualClock, ScaledClock, settle
from shared.loop import ReconcileLoop

START = datetime(2026, 1, 1, tzinfo=UTC)


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = ManualClock(START)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 30)), asyncio.create_task(sleeper("soon", 10))]
    await asyncio.sleep(0)
    clock.advance(15)
    await asyncio.sleep(0)
    assert woke == ["soon"]
    clock.advance(15)
    await asyncio.gather(*tasks)
    assert woke == ["soon", "late"]
    assert clock.now() == START + timedelta(seconds=30)


def test_manual_clock_never_goes_back() -> None:
    clock = ManualClock(START)
    with pytest.raises(ValueError):
        clock.set(START - timedelta(seconds=1))


async def test_scaled_clock_runs_faster() -> None:
    clock = ScaledClock(speed=1000, origin=START)
    await clock.sleep(50)  # 50 ms of real time
    assert clock.now() - START >= timedelta(seconds=50)


async def test_loop_runs_every_interval_and_at_once_when_kicked() -> None:
    clock = ManualClock(START)
    runs: list[datetime] = []

    async def step() -> None:
        runs.append(clock.now())

    loop = ReconcileLoop("test", step, interval=30, clock=clock)
    loop.start()
    await clock.run_for(0)
    assert runs == [START]
    await clock.run_for(29)
    assert len(runs) == 1
    await clock.run_for(1)
    assert len(runs) == 2
    loop.kick()
    await settle()
    assert len(runs) == 3
    assert runs[-1] == START + timedelta(seconds=30)
    await loop.stop()


async def test_a_failing_pass_is_logged_and_retried_not_fatal() -> None:
    clock = ManualClock(START)
    attempts = 0

    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("EC2 said no")

    loop = ReconcileLoop("flaky", flaky, interval=10, clock=clock)
    loop.start()
    await clock.run_for(0)
    assert loop.failures == 1
    assert loop.last_error == "RuntimeError: EC2 said no"
    await clock.run_for(10)
    assert attempts == 2
    assert loop.last_error is None
    await loop.stop()


@pytest.mark.parametrize(("fixed_rate", "starts"), [(False, [0, 14, 28]), (True, [0, 10, 20])])
async def test_a_fixed_rate_loop_counts_its_interval_from_the_start_of_a_pass(
    fixed_rate: bool, starts: list[int]
) -> None:
    clock = ManualClock(START)
    runs: list[datetime] = []

    async def slow() -> None:  # a pass that takes 4 s, as a read of the scheduler may
        runs.append(clock.now())
        await clock.sleep(4)

    loop = ReconcileLoop("poll", slow, interval=10, clock=clock, fixed_rate=fixed_rate)
    loop.start()
    await clock.run_for(29)
    assert runs == [START + timedelta(seconds=s) for s in starts]
    await loop.stop()
