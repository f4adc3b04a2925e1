"""autogrow: power decisions. This module wires its API, handlers and loops together."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select, update

from services.autogrow.tables import MAILBOX, nodes
from shared.bus import Handler
from shared.events import Message, NodePowerChanged, NodeProvisioned, NodeRetired, PowerState
from shared.outbox import Mailbox
from shared.service import Runtime, Service
from shared.store import upsert

CONSUMER = "autogrow"


class NodeView(BaseModel):
    node_id: str
    scheduler_node_name: str | None
    instance_id: str | None
    image_id: str | None
    power_state: str
    since: datetime
    billing: str
    retired_at: datetime | None


def make_router(mailbox: Mailbox) -> APIRouter:
    router = APIRouter(prefix="/autogrow", tags=["autogrow"])

    @router.get("/nodes", summary="The pool's nodes as autogrow knows them.")
    async def list_nodes() -> list[NodeView]:
        async with mailbox.engine.connect() as conn:
            rows = await conn.execute(select(nodes).order_by(nodes.c.node_id))
            return [NodeView.model_validate(row._mapping) for row in rows]

    return router


def make_handlers(mailbox: Mailbox) -> dict[str, Handler]:
    async def on_node_provisioned(message: Message) -> None:
        assert isinstance(message, NodeProvisioned)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            await upsert(
                tx.conn,
                nodes,
                {
                    "node_id": message.node_id,
                    "scheduler_node_name": message.scheduler_node_name,
                    "instance_id": message.instance_id,
                    "image_id": message.image_id,
                    "power_state": PowerState.STOPPED.value,
                    "since": message.occurred_at,
                    "billing": "per-second",
                    "retired_at": None,
                },
                keys=["node_id"],
            )

    async def on_node_power_changed(message: Message) -> None:
        assert isinstance(message, NodePowerChanged)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            await upsert(
                tx.conn,
                nodes,
                {
                    "node_id": message.node_id,
                    "scheduler_node_name": message.scheduler_node_name,
                    "power_state": message.state.value,
                    "since": message.since,
                    "billing": message.billing.value,
                },
                keys=["node_id"],
            )

    async def on_node_retired(message: Message) -> None:
        assert isinstance(message, NodeRetired)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            await tx.conn.execute(
                update(nodes).where(nodes.c.node_id == message.node_id).values(retired_at=tx.now)
            )

    return {
        NodeProvisioned.name(): on_node_provisioned,
        NodePowerChanged.name(): on_node_power_changed,
        NodeRetired.name(): on_node_retired,
    }


def build(runtime: Runtime) -> Service:
    mailbox = runtime.mailbox(MAILBOX)
    return Service.create(
        CONSUMER, runtime, mailbox, router=make_router(mailbox), handlers=make_handlers(mailbox)
    )
