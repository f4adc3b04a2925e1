"""Group commit of `Mailbox.handle_once` on PostgreSQL: handlers that run at once share one
transaction, each in a savepoint of its own, and still have exactly-once effects."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.bakery.tables import MAILBOX as BAKERY
from services.pool.tables import MAILBOX as POOL
from shared.clock import ManualClock
from shared.events import BuildImage, Message
from shared.outbox import GroupCommitFailed, Mailbox

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CONSUMER = "group-test"
effects_metadata = MetaData()
effects = Table(
    "group_commit_effects",
    effects_metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(36), nullable=False),
)


class Boom(Exception):
    pass


def command(n: int) -> BuildImage:
    return BuildImage(recipe=f"recipe-{n}", reason="test", occurred_at=NOW)


@pytest.fixture
async def db(pg_engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    async with pg_engine.begin() as conn:
        await conn.run_sync(effects_metadata.drop_all)
        await conn.run_sync(effects_metadata.create_all)
    yield pg_engine
    async with pg_engine.begin() as conn:  # the session database's tables are the services'
        await conn.run_sync(effects_metadata.drop_all)


async def committed_effects(engine: AsyncEngine) -> Counter[str]:
    """What another connection sees: only committed rows."""
    async with engine.connect() as conn:
        return Counter(row.message_id for row in await conn.execute(select(effects.c.message_id)))


async def inbox_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(POOL.inbox.c.message_id))
        return {row.message_id for row in rows}


async def handle(
    mailbox: Mailbox, message: Message, *, fail: bool = False, seen: list[str] | None = None
) -> bool:
    """A handler with one effect; returns whether it took effect. Records, right after its
    `handle_once` returns, what another connection sees of its effect."""
    async with mailbox.handle_once(CONSUMER, message) as tx:
        if tx is None:
            return False
        await tx.conn.execute(effects.insert(), {"message_id": str(message.message_id)})
        if fail:
            raise Boom(f"handler of {message.message_id} failed")
    if seen is not None:
        seen.extend((await committed_effects(mailbox.engine)).elements())
    return True


async def test_concurrent_handlers_share_a_commit_and_return_once_it_is_durable(
    db: AsyncEngine,
) -> None:
    mailbox = Mailbox(POOL, db, ManualClock(NOW))
    assert mailbox.group_commit
    messages = [command(n) for n in range(40)]
    seen: list[list[str]] = [[] for _ in messages]
    results = await asyncio.gather(
        *(handle(mailbox, m, seen=s) for m, s in zip(messages, seen, strict=True))
    )
    assert results == [True] * 40
    assert await committed_effects(db) == {str(m.message_id): 1 for m in messages}
    assert mailbox.grouped == 40
    assert mailbox.groups < 10, f"{mailbox.groups} commits for 40 concurrent handlers"
    for message, visible in zip(messages, seen, strict=True):
        assert str(message.message_id) in visible  # committed before handle_once returned


async def test_a_failing_handler_rolls_back_only_itself_and_its_retry_takes_effect(
    db: AsyncEngine,
) -> None:
    mailbox = Mailbox(POOL, db, ManualClock(NOW))
    messages = [command(n) for n in range(12)]
    poison = {0, 5, 11}  # the first member (no savepoint), one in the middle, the last
    results = await asyncio.gather(
        *(handle(mailbox, m, fail=n in poison) for n, m in enumerate(messages)),
        return_exceptions=True,
    )
    assert [isinstance(r, Boom) for r in results] == [n in poison for n in range(12)]
    good = {str(m.message_id) for n, m in enumerate(messages) if n not in poison}
    assert await committed_effects(db) == dict.fromkeys(good, 1)
    assert await inbox_ids(db) == good  # the failed ones left no inbox row: they are retried
    retried = await asyncio.gather(*(handle(mailbox, messages[n]) for n in sorted(poison)))
    assert retried == [True, True, True]
    assert await committed_effects(db) == {str(m.message_id): 1 for m in messages}


async def test_a_duplicate_within_one_group_has_one_effect(db: AsyncEngine) -> None:
    mailbox = Mailbox(POOL, db, ManualClock(NOW))
    message = command(1)
    others = [command(n) for n in range(2, 6)]
    batch = [others[0], message, others[1], message, others[2], message, others[3]]
    results = await asyncio.gather(*(handle(mailbox, m) for m in batch))
    assert mailbox.groups == 1
    assert results.count(False) == 2
    assert await committed_effects(db) == {str(m.message_id): 1 for m in [message, *others]}


async def test_a_duplicate_of_a_failed_handler_in_the_same_group_takes_effect(
    db: AsyncEngine,
) -> None:
    """The first delivery's inbox row went with its savepoint, so the second is not a duplicate."""
    mailbox = Mailbox(POOL, db, ManualClock(NOW))
    message, other = command(1), command(2)
    results = await asyncio.gather(
        handle(mailbox, other),
        handle(mailbox, message, fail=True),
        handle(mailbox, message),
        return_exceptions=True,
    )
    assert results[0] is True and isinstance(results[1], Boom) and results[2] is True
    assert mailbox.groups == 1
    assert await committed_effects(db) == {str(message.message_id): 1, str(other.message_id): 1}


async def test_emits_of_a_failed_handler_are_dropped_and_the_relay_is_kicked_after_commit(
    db: AsyncEngine,
) -> None:
    mailbox = Mailbox(BAKERY, db, ManualClock(NOW))
    kicks: list[int] = []

    async def count_outbox() -> int:
        async with db.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(BAKERY.outbox)) or 0)

    async def kicked() -> None:
        kicks.append(await count_outbox())

    mailbox.on_emit = lambda: kicks.append(-1)

    async def emitter(n: int, *, fail: bool) -> None:
        async with mailbox.handle_once(CONSUMER, command(n)) as tx:
            assert tx is not None
            tx.emit(command(100 + n))
            if fail:
                raise Boom("after emitting")
        await kicked()  # what the relay would find when kicked

    results = await asyncio.gather(
        emitter(1, fail=False),
        emitter(2, fail=True),
        emitter(3, fail=False),
        return_exceptions=True,
    )
    assert isinstance(results[1], Boom)
    assert await count_outbox() == 2
    assert kicks.count(-1) == 2  # on_emit once per committed handler that emitted
    assert all(count == 2 for count in kicks if count >= 0)  # both were in the outbox by then


async def test_a_swallowed_database_error_fails_the_group_rather_than_losing_its_effects(
    db: AsyncEngine,
) -> None:
    """COMMIT of an aborted transaction silently rolls back: the group must raise instead, or
    its members' messages would be acknowledged with no effect."""
    mailbox = Mailbox(POOL, db, ManualClock(NOW))

    async def swallower(message: Message) -> None:
        async with mailbox.handle_once(CONSUMER, message) as tx:
            assert tx is not None
            await tx.conn.execute(effects.insert(), {"message_id": str(message.message_id)})
            # wrong: the transaction is aborted, and this handler goes on as if it were not
            with contextlib.suppress(DBAPIError):
                await tx.conn.execute(text("SELECT 1/0"))

    messages = [command(n) for n in range(4)]
    results = await asyncio.gather(
        handle(mailbox, messages[0]),
        swallower(messages[1]),
        handle(mailbox, messages[2]),
        return_exceptions=True,
    )
    assert all(isinstance(r, BaseException) for r in results), results
    assert await committed_effects(db) == Counter()
    assert await inbox_ids(db) == set()
    # The mailbox carries on: the redeliveries take effect.
    assert await asyncio.gather(*(handle(mailbox, m) for m in messages[:3])) == [True] * 3


async def test_a_connection_lost_mid_group_fails_every_member_and_commits_nothing(
    db: AsyncEngine,
) -> None:
    mailbox = Mailbox(POOL, db, ManualClock(NOW))

    async def killer(message: Message) -> None:
        async with mailbox.handle_once(CONSUMER, message) as tx:
            assert tx is not None
            await tx.conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    messages = [command(n) for n in range(5)]
    results = await asyncio.gather(
        handle(mailbox, messages[0]),
        handle(mailbox, messages[1]),
        killer(messages[2]),
        handle(mailbox, messages[3]),
        return_exceptions=True,
    )
    assert isinstance(results[0], GroupCommitFailed)
    assert isinstance(results[1], GroupCommitFailed)
    assert isinstance(results[2], DBAPIError)
    assert results[3] is True  # it came after: a new group, on a new connection
    assert await committed_effects(db) == {str(messages[3].message_id): 1}
    assert await asyncio.gather(*(handle(mailbox, m) for m in messages)) == [True] * 3 + [
        False,
        True,
    ]
    assert await committed_effects(db) == {str(m.message_id): 1 for m in messages}


async def test_a_nested_handle_once_runs_on_its_own_instead_of_waiting_for_its_own_turn(
    db: AsyncEngine,
) -> None:
    mailbox = Mailbox(POOL, db, ManualClock(NOW))
    outer, inner = command(1), command(2)
    async with asyncio.timeout(10):
        async with mailbox.handle_once(CONSUMER, outer) as tx:
            assert tx is not None
            assert await handle(mailbox, inner) is True
    assert await inbox_ids(db) == {str(outer.message_id), str(inner.message_id)}


async def test_sqlite_keeps_a_transaction_a_message(sqlite_engine: AsyncEngine) -> None:
    assert not Mailbox(POOL, sqlite_engine, ManualClock(NOW)).group_commit
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        Mailbox(POOL, sqlite_engine, ManualClock(NOW), group_commit=True)


async def test_a_member_failing_before_it_reaches_the_database_leaves_the_group_alone(
    db: AsyncEngine,
) -> None:
    mailbox = Mailbox(POOL, db, ManualClock(NOW))
    good, bad = command(1), command(2)

    async def odd_consumer() -> None:
        async with mailbox.handle_once("back\\slash", bad):
            raise AssertionError("not reached: the inbox row cannot be written")

    results = await asyncio.gather(handle(mailbox, good), odd_consumer(), return_exceptions=True)
    assert results[0] is True
    assert isinstance(results[1], ValueError)
    assert await committed_effects(db) == {str(good.message_id): 1}
