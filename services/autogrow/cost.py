"""What the pool's nodes have cost so far: running intervals from the pool's power events, billed
by each node's image billing model with the same rule the simulator uses (`billing.py`)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.autogrow.billing import billed_seconds
from services.autogrow.tables import power_intervals
from shared.events import BillingModel, PowerState
from shared.store import upsert


class Cost(BaseModel):
    at: datetime = Field(description="The time the figures are for.")
    billed_node_hours: float = Field(description="Node-hours billed, minimums and hours included.")
    running_node_hours: float = Field(description="Node-hours the nodes actually ran.")
    billed_by_model: dict[str, float] = Field(description="Billed node-hours per billing model.")
    starts: int = Field(description="Times a node was started (each start is billed anew).")
    running_now: int = Field(description="Nodes running at `at`.")


async def record_power(
    conn: AsyncConnection, node_id: str, state: PowerState, since: datetime, billing: BillingModel
) -> None:
    """Open an interval when a node starts running, close it when it stops; idempotent."""
    if state is PowerState.RUNNING:
        values = {"node_id": node_id, "started_at": since, "billing": billing.value}
        await upsert(conn, power_intervals, values, ["node_id", "started_at"])
    elif state in (PowerState.STOPPING, PowerState.STOPPED):
        await close_intervals(conn, node_id, since)


async def close_intervals(conn: AsyncConnection, node_id: str, at: datetime) -> None:
    await conn.execute(
        update(power_intervals)
        .where(
            power_intervals.c.node_id == node_id,
            power_intervals.c.ended_at.is_(None),
            power_intervals.c.started_at <= at,
        )
        .values(ended_at=at)
    )


async def cost_so_far(conn: AsyncConnection, now: datetime) -> Cost:
    billed: dict[str, float] = defaultdict(float)
    ran = 0.0
    starts = running = 0
    for row in await conn.execute(select(power_intervals)):
        seconds = max(0.0, ((row.ended_at or now) - row.started_at).total_seconds())
        billed[row.billing] += billed_seconds(BillingModel(row.billing), seconds) / 3600
        ran += seconds / 3600
        starts += 1
        running += row.ended_at is None
    return Cost(
        at=now,
        billed_node_hours=sum(billed.values()),
        running_node_hours=ran,
        billed_by_model=dict(billed),
        starts=starts,
        running_now=running,
    )
