"""pool: the warm pool of compute nodes. This module wires its API, handlers and loops together."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select

from services.pool.tables import MAILBOX, images
from shared.bus import Handler
from shared.events import ImageReady, Message
from shared.outbox import Mailbox
from shared.service import Runtime, Service
from shared.store import upsert

CONSUMER = "pool"


class KnownImage(BaseModel):
    image_id: str
    region: str
    recipe: str
    version: str
    base_image: str
    billing: str
    built_at: datetime
    received_at: datetime


def make_router(mailbox: Mailbox) -> APIRouter:
    router = APIRouter(prefix="/pool", tags=["pool"])

    @router.get("/images", summary="Images announced by bakery, newest first.")
    async def list_images() -> list[KnownImage]:
        async with mailbox.engine.connect() as conn:
            rows = await conn.execute(select(images).order_by(images.c.built_at.desc()))
            return [KnownImage.model_validate(row._mapping) for row in rows]

    return router


def make_handlers(mailbox: Mailbox) -> dict[str, Handler]:
    async def on_image_ready(message: Message) -> None:
        assert isinstance(message, ImageReady)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            for region, image_id in message.images.items():
                await upsert(
                    tx.conn,
                    images,
                    {
                        "image_id": image_id,
                        "region": region,
                        "recipe": message.recipe,
                        "version": message.version,
                        "base_image": message.base_image,
                        "billing": message.billing.value,
                        "built_at": message.built_at,
                        "received_at": tx.now,
                    },
                    keys=["image_id"],
                )

    return {ImageReady.name(): on_image_ready}


def build(runtime: Runtime) -> Service:
    mailbox = runtime.mailbox(MAILBOX)
    return Service.create(
        CONSUMER, runtime, mailbox, router=make_router(mailbox), handlers=make_handlers(mailbox)
    )
