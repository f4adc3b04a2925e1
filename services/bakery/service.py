"""bakery: builds machine images. This module wires its settings, API, handlers and loops together.

Three loops: the schedule (emits `BuildImage` when a recipe's cron slot passes), the builds (runs
them; see `runner`), and retention (see `retire`). `POST /bakery/builds` and the schedule both go
through `BuildImage`, and at most one unfinished build per recipe exists (a unique index backs the
check): a request for a recipe already being built is refused (API, 409) or recorded as skipped
(schedule and other senders), never queued behind it.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from services.bakery.aws import BakeryAws
from services.bakery.ec2_backend import Ec2Backend
from services.bakery.packer import PackerBackend
from services.bakery.pipeline import Backend, Machines
from services.bakery.recipes import Recipe, Recipes, load_recipes
from services.bakery.retention import ImageStatus
from services.bakery.retire import Retirer
from services.bakery.runner import BuildLoop, BuildRunner
from services.bakery.schedule import due_slot, next_slot
from services.bakery.settings import BakerySettings
from services.bakery.tables import (
    ACTIVE,
    MAILBOX,
    BuildStatus,
    build_steps,
    builds,
    images,
    schedule,
)
from shared.bus import Handler
from shared.credentials import service_aws_access
from shared.events import BillingModel, BuildImage, Message
from shared.loop import ReconcileLoop
from shared.outbox import Mailbox
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, Settings, load_settings
from shared.store import upsert

CONSUMER = "bakery"
LOG_LINES = 200


class BuildRequest(BaseModel):
    recipe: str = Field(min_length=1, max_length=100, description="Recipe to build.")
    reason: str = Field(default="on demand", min_length=1, max_length=500, description="Why.")


class BuildAccepted(BaseModel):
    build_id: str = Field(description="Id of the build (the BuildImage command's message id).")


class StepView(BaseModel):
    name: str
    script: str
    timeout_seconds: int


class RecipeView(BaseModel):
    name: str
    description: str
    platform: str
    backend: str
    base: dict[str, Any]
    instance_type: str
    regions: list[str]
    billing: BillingModel
    schedule: str | None = Field(description="Cron, UTC; null: on demand only.")
    next_run: datetime | None = Field(description="Next scheduled build.")
    steps: list[StepView]
    first_boot: str | None = Field(description="cloud-init or ec2launch, if any.")
    smoke_check: str
    retention: dict[str, Any]
    tags: dict[str, str]


class Build(BaseModel):
    build_id: str
    recipe: str
    reason: str
    status: BuildStatus
    phase: str | None = Field(description="The step under way.")
    version: str | None
    image_id: str | None = Field(description="The image in the recipe's home region.")
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    waiting: str | None = Field(description="Why a queued build has not started.")
    error: str | None


class BuildStep(BaseModel):
    seq: int
    name: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    seconds: float | None
    detail: str | None


class BuildDetail(Build):
    backend: str | None
    base_image: str | None
    images: dict[str, str] | None = Field(description="Image id per region.")
    attempt: int
    builder_id: str | None
    validator_id: str | None
    steps: list[BuildStep]
    log_tail: list[str] = Field(description=f"The last {LOG_LINES} lines of the build's log.")


class ImageView(BaseModel):
    image_id: str
    region: str
    recipe: str
    version: str
    build_id: str
    base_image: str
    billing: BillingModel
    built_at: datetime
    status: ImageStatus
    published_at: datetime
    deprecated_at: datetime | None
    deprecation: str | None = Field(description="ec2, or tag where the endpoint lacks it.")
    deregistered_at: datetime | None
    retire_reason: str | None


async def active_build(conn: AsyncConnection, recipe: str) -> Any:
    return (
        await conn.execute(
            select(builds.c.build_id, builds.c.status).where(
                builds.c.recipe == recipe, builds.c.status.in_(ACTIVE)
            )
        )
    ).first()


def _recipe_view(recipe: Recipe, anchor: datetime | None, now: datetime) -> RecipeView:
    base = recipe.base.model_dump(mode="json", exclude_none=True)
    return RecipeView(
        name=recipe.name,
        description=recipe.description,
        platform=recipe.platform,
        backend=recipe.backend,
        base=base,
        instance_type=recipe.instance_type,
        regions=list(recipe.regions),
        billing=recipe.billing,
        schedule=recipe.schedule,
        next_run=next_slot(recipe.schedule, anchor or now) if recipe.schedule else None,
        steps=[
            StepView(name=s.name, script=s.script.name, timeout_seconds=s.timeout_seconds)
            for s in recipe.steps
        ],
        first_boot=recipe.first_boot.kind if recipe.first_boot else None,
        smoke_check=recipe.validation.smoke_check.name,
        retention=recipe.retention.model_dump(),
        tags=dict(recipe.tags),
    )


def make_router(mailbox: Mailbox, recipes: Recipes, kick: Callable[[], None]) -> APIRouter:
    router = APIRouter(prefix="/bakery", tags=["bakery"])

    @router.get("/recipes", summary="Configured recipes, with their next scheduled build.")
    async def list_recipes() -> list[RecipeView]:
        async with mailbox.engine.connect() as conn:
            rows = await conn.execute(select(schedule.c.recipe, schedule.c.anchor))
            anchors = {row.recipe: row.anchor for row in rows}
        now = mailbox.clock.now()
        return [_recipe_view(recipes.recipes[n], anchors.get(n), now) for n in recipes.names()]

    @router.post(
        "/builds",
        status_code=status.HTTP_202_ACCEPTED,
        summary="Ask for a build now.",
        responses={
            404: {"description": "Unknown recipe."},
            409: {"description": "Already building."},
        },
    )
    async def request_build(request: BuildRequest) -> BuildAccepted:
        if recipes.get(request.recipe) is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"unknown recipe {request.recipe!r}; known recipes: "
                f"{', '.join(recipes.names()) or 'none'}",
            )
        try:
            async with mailbox.transaction() as tx:
                running = await active_build(tx.conn, request.recipe)
                if running is not None:
                    raise _already(request.recipe, running.build_id, running.status)
                command = BuildImage(
                    recipe=request.recipe, reason=request.reason, occurred_at=tx.now
                )
                await tx.conn.execute(insert(builds).values(**_queued_row(command, tx.now)))
                tx.emit(command)
        except IntegrityError:  # another request won the race for the one active build
            raise _already(request.recipe, "another", BuildStatus.QUEUED) from None
        kick()
        return BuildAccepted(build_id=str(command.message_id))

    @router.get("/builds", summary="Builds, newest first.")
    async def list_builds(
        recipe: str | None = None,
        state: Annotated[BuildStatus | None, Query(alias="status")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[Build]:
        query = select(builds).order_by(builds.c.requested_at.desc()).limit(limit)
        if recipe is not None:
            query = query.where(builds.c.recipe == recipe)
        if state is not None:
            query = query.where(builds.c.status == state)
        async with mailbox.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [Build.model_validate(dict(row)) for row in rows]

    @router.get(
        "/builds/{build_id}",
        summary="One build: state, steps with timings, log tail, error.",
        responses={404: {"description": "No such build."}},
    )
    async def get_build(build_id: uuid.UUID) -> BuildDetail:
        async with mailbox.engine.connect() as conn:
            row = (
                (await conn.execute(select(builds).where(builds.c.build_id == str(build_id))))
                .mappings()
                .first()
            )
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no build {build_id}")
            steps = (
                (
                    await conn.execute(
                        select(build_steps)
                        .where(build_steps.c.build_id == str(build_id))
                        .order_by(build_steps.c.seq)
                    )
                )
                .mappings()
                .all()
            )
        return BuildDetail.model_validate(
            {
                **row,
                "steps": [
                    {
                        **s,
                        "seconds": (s["finished_at"] - s["started_at"]).total_seconds()
                        if s["finished_at"]
                        else None,
                    }
                    for s in steps
                ],
                "log_tail": (row["log"] or "").splitlines()[-LOG_LINES:],
            }
        )

    @router.get("/images", summary="Images bakery published, newest first.")
    async def list_images(
        recipe: str | None = None,
        state: Annotated[ImageStatus | None, Query(alias="status")] = None,
    ) -> list[ImageView]:
        query = select(images).order_by(images.c.built_at.desc(), images.c.region)
        if recipe is not None:
            query = query.where(images.c.recipe == recipe)
        if state is not None:
            query = query.where(images.c.status == state)
        async with mailbox.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [ImageView.model_validate(dict(row)) for row in rows]

    return router


def _already(recipe: str, build_id: str, state: str) -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        f"recipe {recipe!r} already has {state} build {build_id}; at most one build per recipe "
        "runs at a time",
    )


def _queued_row(command: BuildImage, now: datetime) -> dict[str, Any]:
    return {
        "build_id": str(command.message_id),
        "recipe": command.recipe,
        "reason": command.reason,
        "status": BuildStatus.QUEUED,
        "requested_at": command.occurred_at,
        "updated_at": now,
    }


def make_handlers(
    mailbox: Mailbox, recipes: Recipes, kick: Callable[[], None]
) -> dict[str, Handler]:
    async def on_build_image(message: Message) -> None:
        """Record the build (unless the API already did) as queued, skipped or failed."""
        assert isinstance(message, BuildImage)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            known = (
                await tx.conn.execute(
                    select(builds.c.build_id).where(builds.c.build_id == str(message.message_id))
                )
            ).first()
            if known is None:
                row = _queued_row(message, tx.now)
                running = await active_build(tx.conn, message.recipe)
                if recipes.get(message.recipe) is None:
                    row.update(
                        status=BuildStatus.FAILED,
                        finished_at=tx.now,
                        error=f"unknown recipe {message.recipe!r}; known: "
                        f"{', '.join(recipes.names())}",
                    )
                elif running is not None:
                    row.update(
                        status=BuildStatus.SKIPPED,
                        finished_at=tx.now,
                        error=f"{running.status} build {running.build_id} of this recipe covers it",
                    )
                await tx.conn.execute(insert(builds).values(**row))
        kick()

    return {BuildImage.name(): on_build_image}


class ScheduleKeeper:
    """Emits `BuildImage` for each recipe whose cron slot passed since the slot last handled."""

    def __init__(self, mailbox: Mailbox, recipes: Recipes) -> None:
        self.mailbox = mailbox
        self.recipes = recipes

    async def reconcile(self) -> None:
        for recipe in self.recipes.recipes.values():
            if recipe.schedule is None:
                continue
            async with self.mailbox.transaction() as tx:
                anchor = (
                    await tx.conn.execute(
                        select(schedule.c.anchor).where(schedule.c.recipe == recipe.name)
                    )
                ).scalar_one_or_none()
                if anchor is None:  # first seen: count from now, do not build for the past
                    values = {"recipe": recipe.name, "anchor": tx.now, "updated_at": tx.now}
                    # another process may see the recipe first: its anchor stands
                    await upsert(tx.conn, schedule, values, ["recipe"], update=False)
                    continue
                slot = due_slot(recipe.schedule, anchor, tx.now)
                if slot is None:
                    continue
                moved = await tx.conn.execute(
                    update(schedule)
                    .where(schedule.c.recipe == recipe.name, schedule.c.anchor == anchor)
                    .values(anchor=slot, updated_at=tx.now)
                )
                if moved.rowcount == 1:  # else another worker handled this slot
                    tx.emit(
                        BuildImage(
                            recipe=recipe.name,
                            reason=f"schedule {recipe.schedule!r}, slot {slot:%Y-%m-%d %H:%M} UTC",
                            occurred_at=tx.now,
                        )
                    )


@dataclass
class Bakery:
    """The service and its parts, for tests and composition roots that drive them directly."""

    service: Service
    runner: BuildRunner
    keeper: ScheduleKeeper
    retirer: Retirer
    recipes: Recipes


def make_aws(runtime: Settings, settings: BakerySettings) -> tuple[BakeryAws | None, str]:
    """bakery's AWS access from settings, or None and the reason builds will wait."""
    access = service_aws_access(
        "bakery",
        endpoint_url=runtime.aws_endpoint_url,
        auth_url=settings.auth_url,
        client_id=settings.auth_client_id,
        client_secret=settings.auth_client_secret,
        role=settings.aws_role,
    )
    if access.session is None:
        return None, access.unavailable
    return BakeryAws(access.session, endpoint_url=access.endpoint_url), ""


def assemble(
    runtime: Runtime,
    settings: BakerySettings,
    recipes: Recipes,
    aws: BakeryAws | None,
    *,
    unavailable: str = "",
    backends: dict[str, Backend] | None = None,
) -> Bakery:
    mailbox = runtime.mailbox(MAILBOX)
    clock = runtime.clock
    machines = Machines(aws, settings, clock) if aws is not None else None
    retirer = Retirer(mailbox, recipes, aws, machines)
    retention_loop = ReconcileLoop(
        "bakery.retention", retirer.reconcile, interval=settings.retention_interval, clock=clock
    )
    if backends is None and aws is not None and machines is not None:
        backends = {"ec2": Ec2Backend(machines), "packer": PackerBackend(aws, settings)}
    runner = BuildRunner(
        mailbox,
        recipes,
        settings,
        clock,
        aws,
        unavailable=unavailable,
        backends=backends,
        on_published=retention_loop.kick,
    )
    build_loop = BuildLoop(runner, interval=settings.build_interval, clock=clock)
    keeper = ScheduleKeeper(mailbox, recipes)
    schedule_loop = ReconcileLoop(
        "bakery.schedule", keeper.reconcile, interval=settings.schedule_interval, clock=clock
    )
    service = Service.create(
        CONSUMER,
        runtime,
        mailbox,
        router=make_router(mailbox, recipes, build_loop.kick),
        handlers=make_handlers(mailbox, recipes, build_loop.kick),
        loops=[schedule_loop, build_loop, retention_loop],
    )
    return Bakery(service, runner, keeper, retirer, recipes)


def build(runtime: Runtime, settings: BakerySettings | None = None) -> Service:
    """bakery's service; settings default to the HPCFLEET_BAKERY_ environment."""
    try:
        settings = settings or load_settings(BakerySettings)
        recipes = load_recipes(settings.recipes)
        aws, unavailable = make_aws(runtime.settings, settings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return assemble(runtime, settings, recipes, aws, unavailable=unavailable).service
