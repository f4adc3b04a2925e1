"""The cost so far: power events become running intervals, billed by the image's model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from services.autogrow.cost import close_intervals, cost_so_far, record_power
from shared.events import BillingModel, PowerState

T0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


async def test_intervals_are_billed_by_their_model(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        # per second: 30 s run billed as the 60 s minimum, then a 10-minute run
        await record_power(conn, "a", PowerState.RUNNING, at(0), BillingModel.PER_SECOND)
        await record_power(conn, "a", PowerState.STOPPING, at(0.5), BillingModel.PER_SECOND)
        await record_power(conn, "a", PowerState.RUNNING, at(60), BillingModel.PER_SECOND)
        await record_power(conn, "a", PowerState.STOPPED, at(70), BillingModel.PER_SECOND)
        # hourly: 61 minutes are two hours; a redelivered start changes nothing
        await record_power(conn, "b", PowerState.RUNNING, at(0), BillingModel.HOURLY)
        await record_power(conn, "b", PowerState.RUNNING, at(0), BillingModel.HOURLY)
        await close_intervals(conn, "b", at(61))
        # still running: billed up to now
        await record_power(conn, "c", PowerState.RUNNING, at(100), BillingModel.PER_SECOND)
    async with engine.connect() as conn:
        cost = await cost_so_far(conn, at(130))
    assert cost.starts == 4
    assert cost.running_now == 1
    assert cost.billed_by_model["hourly"] == 2.0
    assert abs(cost.billed_by_model["per-second"] - (60 + 600 + 1800) / 3600) < 1e-9
    assert abs(cost.running_node_hours - (30 + 600 + 3660 + 1800) / 3600) < 1e-9
