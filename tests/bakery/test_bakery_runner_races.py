"""Two races a build runner must not lose to, found by CI: log lines written at the same time, and a
take-over task ending after the build it handed back has started again."""

from __future__ import annotations

import asyncio

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.bakery.recipes import load_recipes
from services.bakery.runner import LOG_LIMIT, BuildRunner, DbProgress
from services.bakery.settings import BakerySettings
from services.bakery.tables import MAILBOX, builds
from shared.clock import ManualClock
from shared.outbox import Mailbox


async def a_runner(
    engine: AsyncEngine, settings: BakerySettings, clock: ManualClock
) -> BuildRunner:
    async with engine.begin() as conn:
        await conn.execute(
            insert(builds).values(
                build_id="b-1",
                recipe="linux",
                reason="test",
                status="running",
                requested_at=clock.now(),
                updated_at=clock.now(),
            )
        )
    return BuildRunner(
        Mailbox(MAILBOX, engine, clock), load_recipes(settings.recipes), settings, clock, aws=None
    )


async def the_log(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        log = (await conn.execute(select(builds.c.log))).scalar_one()
    return str(log)


async def test_log_lines_written_at_once_are_all_kept(
    engine: AsyncEngine, settings: BakerySettings, clock: ManualClock
) -> None:
    progress = DbProgress(await a_runner(engine, settings, clock), "b-1")
    await asyncio.gather(*(progress.log(f"line {n}") for n in range(20)))
    log = await the_log(engine)
    assert sorted(line.split(" ", 1)[1] for line in log.splitlines()) == sorted(
        f"line {n}" for n in range(20)
    )


async def test_the_log_keeps_its_tail(
    engine: AsyncEngine, settings: BakerySettings, clock: ManualClock
) -> None:
    progress = DbProgress(await a_runner(engine, settings, clock), "b-1")
    for n in range(3):
        await progress.log(f"{n}" * (LOG_LIMIT // 2))
    log = await the_log(engine)
    assert len(log) == LOG_LIMIT and log.endswith("2" * (LOG_LIMIT // 2) + "\n")


async def test_an_ending_task_never_forgets_its_successor(
    sqlite_engine: AsyncEngine, settings: BakerySettings, clock: ManualClock
) -> None:
    runner = await a_runner(sqlite_engine, settings, clock)
    release = asyncio.Event()
    runner._spawn("b-1", release.wait())  # the take-over, about to end
    first = runner.tasks["b-1"]
    runner._spawn("b-1", asyncio.sleep(3600))  # the build, started again
    second = runner.tasks["b-1"]
    release.set()
    await first
    await asyncio.sleep(0)  # the done callbacks run
    assert runner.tasks == {"b-1": second}  # still renewed, still not an orphan to take over
    second.cancel()
