"""Reading and writing pool's tables: node rows as the planner's `NodeRecord`s, specs, back-offs,
scheduler names, billing by image. Shared by the reconcile pass, the power commands and the API."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.pool.plan import NodeRecord, NodeState, Placement
from services.pool.spec import PoolSpec
from services.pool.tables import backoffs, images, nodes, pools, scheduler
from shared.events import BillingModel, PowerState, RetireReason
from shared.store import upsert

POWER = {
    NodeState.PENDING: PowerState.STARTING,
    NodeState.RUNNING: PowerState.RUNNING,
    NodeState.STOPPING: PowerState.STOPPING,
    NodeState.STOPPED: PowerState.STOPPED,
}
"""The power state autogrow hears for an instance state (the rest are not power states)."""

LIVE = frozenset(POWER)
GONE = frozenset({NodeState.SHUTTING_DOWN, NodeState.TERMINATED})


# Enum lookups by value are slow on Python 3.11 (gh-93910), and a pass makes one per row.
_STATES = {state.value: state for state in NodeState}
_REASONS = {reason.value: reason for reason in RetireReason}
# every column but `launch`, which only a retried launch needs (decoding it costs a third of a load)
_ROW = [column for column in nodes.c if column.name != "launch"]


@dataclass(frozen=True, slots=True)
class Node:
    """A node row: the planner's record plus the name only the service keeps."""

    record: NodeRecord
    scheduler_node_name: str


def _record(row: Any) -> NodeRecord:
    return NodeRecord(
        node_id=row.node_id,
        client_token=row.client_token,
        image_id=row.image_id,
        instance_type=row.instance_type,
        subnet_id=row.subnet_id,
        zone=row.zone,
        state=_STATES[row.state],
        since=row.since,
        instance_id=row.instance_id,
        launched_at=row.launched_at,
        provisioned=row.provisioned,
        retiring=_REASONS[row.retiring] if row.retiring else None,
        last_error=row.last_error,
    )


async def load_nodes(conn: AsyncConnection, pool: str) -> dict[str, Node]:
    rows = await conn.execute(select(*_ROW).where(nodes.c.pool == pool))
    return {row.node_id: Node(_record(row), row.scheduler_node_name) for row in rows}


async def load_launches(conn: AsyncConnection, node_ids: Iterable[str]) -> dict[str, Any]:
    """The first RunInstances' tags and template of these rows (for a retry to repeat them)."""
    rows = await conn.execute(
        select(nodes.c.node_id, nodes.c.launch).where(nodes.c.node_id.in_(list(node_ids)))
    )
    return {row.node_id: row.launch for row in rows if row.launch is not None}


async def load_nodes_by_id(conn: AsyncConnection, node_ids: Iterable[str]) -> dict[str, Any]:
    """Rows (with their pool) for these ids; unknown ids are absent."""
    rows = await conn.execute(select(nodes).where(nodes.c.node_id.in_(list(node_ids))))
    return {row.node_id: row for row in rows}


async def load_spec(conn: AsyncConnection, pool: str) -> PoolSpec | None:
    spec = await conn.scalar(select(pools.c.spec).where(pools.c.name == pool))
    return None if spec is None else PoolSpec.model_validate(spec)


async def load_specs(conn: AsyncConnection) -> list[PoolSpec]:
    rows = await conn.execute(select(pools.c.spec).order_by(pools.c.name))
    return [PoolSpec.model_validate(row.spec) for row in rows]


async def save_spec(conn: AsyncConnection, spec: PoolSpec, now: datetime) -> None:
    """Update a pool's spec (it must exist)."""
    await conn.execute(
        update(pools)
        .where(pools.c.name == spec.name)
        .values(spec=spec.model_dump(mode="json"), updated_at=now)
    )


async def load_backoffs(
    conn: AsyncConnection, pool: str, now: datetime
) -> dict[Placement, datetime]:
    rows = await conn.execute(
        select(backoffs.c.instance_type, backoffs.c.zone, backoffs.c.until).where(
            backoffs.c.pool == pool, backoffs.c.until > now
        )
    )
    return {Placement(row.instance_type, row.zone): row.until for row in rows}


async def back_off(
    conn: AsyncConnection, pool: str, where: Placement, until: datetime, reason: str
) -> None:
    await upsert(
        conn,
        backoffs,
        {
            "pool": pool,
            "instance_type": where.instance_type,
            "zone": where.zone,
            "until": until,
            "reason": reason,
        },
        ["pool", "instance_type", "zone"],
    )


async def drop_expired_backoffs(conn: AsyncConnection, now: datetime) -> None:
    await conn.execute(delete(backoffs).where(backoffs.c.until <= now))


async def billing_by_image(conn: AsyncConnection) -> dict[str, BillingModel]:
    rows = await conn.execute(select(images.c.image_id, images.c.billing))
    return {row.image_id: BillingModel(row.billing) for row in rows}


async def busy_names(conn: AsyncConnection) -> tuple[datetime | None, frozenset[str]]:
    """Scheduler nodes with jobs on them in the latest queue snapshot, and when it was taken."""
    row = (await conn.execute(select(scheduler).where(scheduler.c.id == 1))).first()
    if row is None:
        return None, frozenset()
    return row.taken_at, frozenset(row.busy)


async def update_rows(conn: AsyncConnection, changes: list[dict[str, Any]]) -> None:
    """Apply per-row changes (each a dict with `node_id` and the columns to set): one executemany
    per set of columns, since one statement cannot set a column for some rows only (a PowerOff
    that stops one node and terminates another failed on that, found by the chaos run)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for change in changes:
        keys = tuple(sorted(k for k in change if k != "node_id"))
        groups.setdefault(keys, []).append({f"b_{k}": v for k, v in change.items()})
    for keys, rows in groups.items():
        statement = (
            update(nodes)
            .where(nodes.c.node_id == bindparam("b_node_id"))
            .values({k: bindparam(f"b_{k}") for k in keys})
        )
        await conn.execute(statement, rows)


def record_values(record: NodeRecord) -> dict[str, Any]:
    """The planner-visible columns of a row."""
    return {
        "node_id": record.node_id,
        "client_token": record.client_token,
        "image_id": record.image_id,
        "instance_type": record.instance_type,
        "subnet_id": record.subnet_id,
        "zone": record.zone,
        "state": record.state.value,
        "since": record.since,
        "instance_id": record.instance_id,
        "launched_at": record.launched_at,
        "provisioned": record.provisioned,
        "retiring": record.retiring.value if record.retiring else None,
        "last_error": record.last_error,
    }


class SchedulerNames:
    """Hands out `<prefix><number>` names, lowest free number first, three digits at least."""

    def __init__(self, prefix: str, taken: Iterable[str]) -> None:
        self.prefix = prefix
        self._taken = {self._number(name) for name in taken} - {None}
        self._next = 1

    def _number(self, name: str) -> int | None:
        digits = name[len(self.prefix) :]
        return int(digits) if name.startswith(self.prefix) and digits.isdigit() else None

    def release(self, name: str) -> None:
        """A name whose node is gone (its row forgotten) may be handed out again."""
        number = self._number(name)
        if number is not None:
            self._taken.discard(number)
            self._next = min(self._next, number)

    def take(self) -> str:
        while self._next in self._taken:
            self._next += 1
        self._taken.add(self._next)
        return f"{self.prefix}{self._next:03d}"
