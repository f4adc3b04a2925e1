"""bakery: builds machine images. This module wires its API, handlers and loops together."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from services.bakery.tables import MAILBOX, builds
from shared.bus import Handler
from shared.events import BuildImage, Message
from shared.outbox import Mailbox
from shared.service import Runtime, Service
from shared.store import upsert

CONSUMER = "bakery"


class BuildRequest(BaseModel):
    recipe: str = Field(min_length=1, max_length=100, description="Recipe to build.")
    reason: str = Field(default="on demand", min_length=1, max_length=500, description="Why.")


class BuildAccepted(BaseModel):
    build_id: str = Field(description="Id of the build (the BuildImage command's message id).")


class Build(BaseModel):
    build_id: str
    recipe: str
    reason: str
    status: str
    requested_at: datetime
    updated_at: datetime


def make_router(mailbox: Mailbox) -> APIRouter:
    router = APIRouter(prefix="/bakery", tags=["bakery"])

    @router.post("/builds", status_code=status.HTTP_202_ACCEPTED, summary="Ask for a build now.")
    async def request_build(request: BuildRequest) -> BuildAccepted:
        async with mailbox.transaction() as tx:
            command = BuildImage(recipe=request.recipe, reason=request.reason, occurred_at=tx.now)
            tx.emit(command)
        return BuildAccepted(build_id=str(command.message_id))

    @router.get("/builds", summary="Builds, newest first.")
    async def list_builds() -> list[Build]:
        async with mailbox.engine.connect() as conn:
            rows = await conn.execute(select(builds).order_by(builds.c.requested_at.desc()))
            return [Build.model_validate(row._mapping) for row in rows]

    return router


def make_handlers(mailbox: Mailbox) -> dict[str, Handler]:
    async def on_build_image(message: Message) -> None:
        assert isinstance(message, BuildImage)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            await upsert(
                tx.conn,
                builds,
                {
                    "build_id": str(message.message_id),
                    "recipe": message.recipe,
                    "reason": message.reason,
                    "status": "queued",
                    "requested_at": message.occurred_at,
                    "updated_at": tx.now,
                },
                keys=["build_id"],
            )

    return {BuildImage.name(): on_build_image}


def build(runtime: Runtime) -> Service:
    mailbox = runtime.mailbox(MAILBOX)
    return Service.create(
        CONSUMER, runtime, mailbox, router=make_router(mailbox), handlers=make_handlers(mailbox)
    )
