"""pool: the warm pool of compute nodes, and the only writer of their EC2 instances.

This module wires settings, the API, the handlers and the reconcile loop together. The loop
(`reconcile`) does the work; events and API calls only change what it aims at (a pool's spec, its
image) and kick it. `PowerOn` / `PowerOff` act at once (`power`), under the same per-pool lock.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.pool.ec2 import Ec2
from services.pool.locks import PoolLocks
from services.pool.plan import NodeState
from services.pool.power import PowerDesk
from services.pool.reconcile import Reconciler
from services.pool.records import GONE, LIVE, load_spec, load_specs, save_spec
from services.pool.settings import PoolSettings
from services.pool.spec import PoolSpec
from services.pool.tables import MAILBOX, backoffs, images, nodes, pools, scheduler
from shared.api import ApiError
from shared.bus import Handler
from shared.cloud import Cloud, CloudError
from shared.cloud.aws import AwsCloud, instance_types
from shared.credentials import service_aws_access
from shared.events import (
    BillingModel,
    ImageReady,
    ImageRetired,
    Message,
    PowerOff,
    PowerOn,
    QueueDepthChanged,
    RetireReason,
)
from shared.loop import ReconcileLoop
from shared.outbox import Mailbox
from shared.scheduler import NodeActivity
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, Settings, load_settings
from shared.store import upsert

CONSUMER = "pool"


# ---- API models ---------------------------------------------------------------------------------


class KnownImage(BaseModel):
    image_id: str
    region: str
    recipe: str
    version: str
    base_image: str
    billing: BillingModel
    built_at: datetime
    received_at: datetime
    retired_at: datetime | None
    retire_reason: str | None


class Replacement(BaseModel):
    """How far the pool is on its way to every node fresh on the current image."""

    image_id: str | None = Field(description="The pool's current image.")
    fresh: int = Field(description="Provisioned nodes on the current image, not retiring.")
    old: int = Field(description="Live nodes still to be replaced (other image, or retiring).")
    retiring: int = Field(description="Of those, the ones marked and announced as retiring.")
    warming: int = Field(description="New nodes launched or booting, not provisioned yet.")
    complete: bool = Field(description="No old node left.")


class Backoff(BaseModel):
    instance_type: str
    zone: str
    until: datetime
    reason: str


class PoolView(BaseModel):
    name: str
    spec: PoolSpec
    problems: list[str] = Field(
        description="What keeps the pool from doing more: its spec's problems and the last pass's."
    )
    passed_at: datetime | None = Field(description="When the last reconcile pass ran.")
    last_actions: dict[str, int] = Field(description="What that pass did, by action.")
    nodes: int = Field(description="Node rows, launching and terminating ones included.")
    available: int = Field(description="Provisioned nodes the scheduler can use.")
    by_state: dict[str, int]
    by_image: dict[str, int]
    replacement: Replacement
    backoffs: list[Backoff] = Field(description="Instance types backed off for capacity.")


class NodeView(BaseModel):
    node_id: str
    scheduler_node_name: str
    instance_id: str | None
    image_id: str
    instance_type: str
    zone: str
    subnet_id: str | None
    state: NodeState
    since: datetime = Field(description="When the node entered `state`.")
    age_seconds: float | None = Field(description="Since the pool launched it.")
    billing_since: datetime | None = Field(description="When billing started, while running.")
    provisioned: bool
    retiring: RetireReason | None
    outdated: bool = Field(description="Its image is not the pool's current one.")
    last_error: str | None


class NodePage(BaseModel):
    nodes: list[NodeView]
    next: str | None = Field(description="Pass as `after` for the next page; null at the end.")


# ---- API ----------------------------------------------------------------------------------------


async def _pool_view(conn: AsyncConnection, row: Any, now: datetime) -> PoolView:
    spec = PoolSpec.model_validate(row.spec)
    groups = await conn.execute(
        select(
            nodes.c.state,
            nodes.c.image_id,
            nodes.c.provisioned,
            nodes.c.retiring,
            func.count().label("n"),
        )
        .where(nodes.c.pool == spec.name)
        .group_by(nodes.c.state, nodes.c.image_id, nodes.c.provisioned, nodes.c.retiring)
    )
    by_state: Counter[str] = Counter()
    by_image: Counter[str] = Counter()
    available = fresh = old = retiring = warming = 0
    for g in groups:
        state = NodeState(g.state)
        by_state[g.state] += g.n
        by_image[g.image_id] += g.n
        if state in GONE:
            continue
        current = g.image_id == spec.image_id and g.retiring is None
        if g.provisioned and state in LIVE:
            available += g.n
        if not current:
            old += g.n
            retiring += g.n if g.retiring else 0
        elif g.provisioned:
            fresh += g.n
        else:
            warming += g.n
    held = await conn.execute(
        select(backoffs).where(backoffs.c.pool == spec.name, backoffs.c.until > now)
    )
    return PoolView(
        name=spec.name,
        spec=spec,
        problems=list(dict.fromkeys([*spec.problems(), *(row.problems or [])])),
        passed_at=row.passed_at,
        last_actions=row.actions or {},
        nodes=sum(by_state.values()),
        available=available,
        by_state=dict(by_state),
        by_image=dict(by_image),
        replacement=Replacement(
            image_id=spec.image_id,
            fresh=fresh,
            old=old,
            retiring=retiring,
            warming=warming,
            complete=old == 0,
        ),
        backoffs=[
            Backoff(instance_type=b.instance_type, zone=b.zone, until=b.until, reason=b.reason)
            for b in held
        ],
    )


def _unprocessable(problem: str, problems: Sequence[str] = ()) -> ApiError:
    """422 with the answer every 422 has (`shared.api.InvalidRequest`): `detail`, and each of the
    spec's `problems` beside it."""
    return ApiError(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        problem,
        problems=[{"where": "body", "problem": p} for p in problems],
    )


def make_router(
    mailbox: Mailbox, ec2: Ec2 | None, region: str, kick: Callable[[], None]
) -> APIRouter:
    router = APIRouter(prefix="/pool", tags=["pool"])

    async def one_pool(conn: AsyncConnection, name: str) -> Any:
        row = (await conn.execute(select(pools).where(pools.c.name == name))).first()
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no pool {name!r}")
        return row

    @router.get("/pools", summary="Every pool, with its counts and problems.")
    async def list_pools() -> list[PoolView]:
        async with mailbox.engine.connect() as conn:
            rows = (await conn.execute(select(pools).order_by(pools.c.name))).all()
            return [await _pool_view(conn, row, mailbox.clock.now()) for row in rows]

    @router.get(
        "/pools/{name}",
        summary="One pool: spec, counts by state and image, replacement progress, problems.",
        responses={404: {"description": "No such pool."}},
    )
    async def get_pool(name: str) -> PoolView:
        async with mailbox.engine.connect() as conn:
            return await _pool_view(conn, await one_pool(conn, name), mailbox.clock.now())

    @router.put(
        "/pools/{name}",
        summary="Create or change a pool; the reconcile loop then brings it about.",
        responses={
            409: {"description": "Another pool uses a clashing node name prefix."},
            422: {"description": "Invalid spec: each problem is named."},
            503: {"description": "The image could not be checked with EC2."},
        },
    )
    async def put_pool(name: str, spec: PoolSpec) -> PoolView:
        if spec.name != name:
            raise _unprocessable(f"the body names pool {spec.name!r}, the path {name!r}")
        known_types = await asyncio.to_thread(instance_types)
        unknown = [t for t in spec.instance_types if t not in known_types]
        if unknown:
            raise _unprocessable(f"unknown instance type(s): {', '.join(unknown)}")
        problems = spec.model_copy(update={"image_id": spec.image_id or "-"}).problems()
        if problems:
            raise _unprocessable("the pool could not act on this spec", problems)
        async with mailbox.engine.connect() as conn:
            current = await load_spec(conn, name)
            others = [s for s in await load_specs(conn) if s.name != name]
            image_id = await _image_for(conn, ec2, spec, current, region)
        for other in others:
            a, b = spec.node_name_prefix, other.node_name_prefix
            if a.startswith(b) or b.startswith(a):
                raise HTTPException(
                    status.HTTP_409_CONFLICT,
                    f"node name prefix {a!r} clashes with {b!r} of pool {other.name!r}: "
                    "scheduler node names must stay unique",
                )
        spec = spec.model_copy(update={"image_id": image_id})
        async with mailbox.transaction() as tx:
            if current is None:
                await tx.conn.execute(
                    insert(pools).values(
                        name=name,
                        spec=spec.model_dump(mode="json"),
                        created_at=tx.now,
                        updated_at=tx.now,
                    )
                )
            else:
                await save_spec(tx.conn, spec, tx.now)
        kick()
        async with mailbox.engine.connect() as conn:
            return await _pool_view(conn, await one_pool(conn, name), mailbox.clock.now())

    @router.get(
        "/pools/{name}/nodes",
        summary="A pool's nodes, by node id, filtered and paged.",
        responses={404: {"description": "No such pool."}},
    )
    async def list_nodes(
        name: str,
        state: NodeState | None = None,
        image_id: str | None = None,
        retiring: bool | None = None,
        provisioned: bool | None = None,
        after: Annotated[
            str | None, Query(description="The last node id of the page before.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> NodePage:
        now = mailbox.clock.now()
        query = select(nodes).where(nodes.c.pool == name).order_by(nodes.c.node_id)
        if state is not None:
            query = query.where(nodes.c.state == state.value)
        if image_id is not None:
            query = query.where(nodes.c.image_id == image_id)
        if retiring is not None:
            column = nodes.c.retiring
            query = query.where(column.is_not(None) if retiring else column.is_(None))
        if provisioned is not None:
            query = query.where(nodes.c.provisioned.is_(provisioned))
        if after is not None:
            query = query.where(nodes.c.node_id > after)
        async with mailbox.engine.connect() as conn:
            spec = PoolSpec.model_validate((await one_pool(conn, name)).spec)
            rows = (await conn.execute(query.limit(limit + 1))).all()
        page = [
            NodeView(
                node_id=r.node_id,
                scheduler_node_name=r.scheduler_node_name,
                instance_id=r.instance_id,
                image_id=r.image_id,
                instance_type=r.instance_type,
                zone=r.zone,
                subnet_id=r.subnet_id,
                state=NodeState(r.state),
                since=r.since,
                age_seconds=(now - r.launched_at).total_seconds() if r.launched_at else None,
                billing_since=r.since if r.state == NodeState.RUNNING.value else None,
                provisioned=r.provisioned,
                retiring=RetireReason(r.retiring) if r.retiring else None,
                outdated=r.image_id != spec.image_id,
                last_error=r.last_error,
            )
            for r in rows[:limit]
        ]
        return NodePage(nodes=page, next=page[-1].node_id if len(rows) > limit else None)

    @router.get("/images", summary="Images announced by bakery, newest first.")
    async def list_images() -> list[KnownImage]:
        async with mailbox.engine.connect() as conn:
            rows = await conn.execute(select(images).order_by(images.c.built_at.desc()))
            return [KnownImage.model_validate(row._mapping) for row in rows]

    return router


async def _newest_image(
    conn: AsyncConnection, region: str, recipe: str | None, *, besides: str | None = None
) -> str | None:
    """The newest image bakery announced for `recipe` (any, if None) that is not retired."""
    query = (
        select(images.c.image_id)
        .where(images.c.region == region, images.c.retired_at.is_(None))
        .order_by(images.c.built_at.desc())
        .limit(1)
    )
    if recipe is not None:
        query = query.where(images.c.recipe == recipe)
    if besides is not None:
        query = query.where(images.c.image_id != besides)
    image_id: str | None = await conn.scalar(query)
    return image_id


async def _image_for(
    conn: AsyncConnection, ec2: Ec2 | None, spec: PoolSpec, current: PoolSpec | None, region: str
) -> str | None:
    """The image a PUT leaves the pool on: the one asked for if it exists and is not retired,
    else the pool's current one, else the newest announced for its recipe."""
    if spec.image_id is None:
        if current is not None and current.image_id is not None:
            return current.image_id
        return await _newest_image(conn, region, spec.recipe)
    row = (await conn.execute(select(images).where(images.c.image_id == spec.image_id))).first()
    if row is not None:
        if row.retired_at is not None:
            raise _unprocessable(f"image {spec.image_id} is retired: {row.retire_reason}")
        return spec.image_id
    if ec2 is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "cannot check the image: AWS is not configured"
        )
    try:
        exists = await ec2.image_exists(spec.image_id)
    except CloudError as error:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"cannot check image {spec.image_id}: {error}"
        ) from None
    if not exists:
        raise _unprocessable(f"image {spec.image_id} does not exist or is not available")
    return spec.image_id


# ---- handlers -----------------------------------------------------------------------------------


def make_handlers(
    mailbox: Mailbox, desk: PowerDesk, region: str, kick: Callable[[], None]
) -> dict[str, Handler]:
    async def on_image_ready(message: Message) -> None:
        """Record the image; pools following its recipe move to it (a newer image only)."""
        assert isinstance(message, ImageReady)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            for image_region, regional in message.images.items():
                await upsert(
                    tx.conn,
                    images,
                    {
                        "image_id": regional,
                        "region": image_region,
                        "recipe": message.recipe,
                        "version": message.version,
                        "base_image": message.base_image,
                        "billing": message.billing.value,
                        "built_at": message.built_at,
                        "received_at": tx.now,
                    },
                    keys=["image_id"],
                )
            image_id = message.images.get(region)
            if image_id is None:
                return
            for spec in await load_specs(tx.conn):
                if spec.recipe not in (None, message.recipe) or spec.image_id == image_id:
                    continue
                built = await tx.conn.scalar(
                    select(images.c.built_at).where(images.c.image_id == spec.image_id)
                )
                if built is not None and built > message.built_at:
                    continue  # late news of an older image
                await save_spec(tx.conn, spec.model_copy(update={"image_id": image_id}), tx.now)
        kick()

    async def on_image_retired(message: Message) -> None:
        """Never launch the image again: pools on it fall back to the newest one left."""
        assert isinstance(message, ImageRetired)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            await tx.conn.execute(
                update(images)
                .where(images.c.image_id == message.image_id)
                .values(retired_at=tx.now, retire_reason=message.reason)
            )
            recipe = await tx.conn.scalar(
                select(images.c.recipe).where(images.c.image_id == message.image_id)
            )
            for spec in await load_specs(tx.conn):
                if spec.image_id != message.image_id:
                    continue
                fallback = await _newest_image(
                    tx.conn, region, spec.recipe or recipe, besides=message.image_id
                )
                await save_spec(tx.conn, spec.model_copy(update={"image_id": fallback}), tx.now)
        kick()

    async def on_queue_depth_changed(message: Message) -> None:
        """Keep the names of the nodes with jobs on them: those are never powered off."""
        assert isinstance(message, QueueDepthChanged)
        snapshot = message.snapshot
        busy = sorted(
            n.name
            for n in snapshot.nodes
            if n.cpus_allocated > 0 or n.activity is NodeActivity.BUSY
        )
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            taken = await tx.conn.scalar(select(scheduler.c.taken_at).where(scheduler.c.id == 1))
            if taken is None or snapshot.taken_at > taken:
                values = {"id": 1, "taken_at": snapshot.taken_at, "busy": busy}
                await upsert(tx.conn, scheduler, values, ["id"])

    async def on_power(message: Message) -> None:
        assert isinstance(message, PowerOn | PowerOff)
        await desk.handle(message)

    return {
        ImageReady.name(): on_image_ready,
        ImageRetired.name(): on_image_retired,
        PowerOn.name(): on_power,
        PowerOff.name(): on_power,
        QueueDepthChanged.name(): on_queue_depth_changed,
    }


# ---- composition --------------------------------------------------------------------------------


class _Loop(ReconcileLoop):
    """The reconcile loop; stopping it also closes the EC2 client, its last user."""

    def __init__(self, reconciler: Reconciler, interval: float, runtime: Runtime) -> None:
        super().__init__(
            "pool.reconcile", reconciler.reconcile, interval=interval, clock=runtime.clock
        )
        self._ec2 = reconciler.ec2

    async def stop(self) -> None:
        await super().stop()
        if self._ec2 is not None:
            await self._ec2.close()


@dataclass
class Pool:
    """The service and its parts, for tests and composition roots that drive them directly."""

    service: Service
    reconciler: Reconciler
    desk: PowerDesk
    loop: ReconcileLoop
    ec2: Ec2 | None


def make_cloud(runtime: Settings, settings: PoolSettings) -> tuple[AwsCloud | None, str]:
    """pool's EC2 from settings, or None and the reason the pool cannot act."""
    access = service_aws_access(
        "pool",
        endpoint_url=runtime.aws_endpoint_url,
        auth_url=settings.auth_url,
        client_id=settings.auth_client_id,
        client_secret=settings.auth_client_secret,
        role=settings.aws_role,
    )
    if access.session is None:
        return None, access.unavailable
    cloud = AwsCloud(runtime.aws_region, endpoint_url=access.endpoint_url, session=access.session)
    return cloud, ""


def assemble(
    runtime: Runtime,
    settings: PoolSettings,
    cloud: Cloud | None,
    *,
    unavailable: str = "",
) -> Pool:
    """pool on `cloud` (an `AwsCloud` is started on first use and closed with the loop)."""
    mailbox = runtime.mailbox(MAILBOX)
    ec2 = None
    if cloud is not None:
        aws = cloud if isinstance(cloud, AwsCloud) else None
        ec2 = Ec2(
            cloud,
            attempts=settings.cloud_attempts,
            retry_seconds=settings.retry_seconds,
            opener=aws.start if aws else None,
            closer=aws.close if aws else None,
        )
    locks = PoolLocks(runtime.engine)
    reconciler = Reconciler(mailbox, ec2, settings, locks, unavailable=unavailable)
    desk = PowerDesk(
        mailbox,
        ec2,
        locks,
        CONSUMER,
        lock_wait=settings.lock_wait_seconds,
        unavailable=unavailable,
    )
    loop = _Loop(reconciler, settings.reconcile_interval, runtime)
    reconciler.kick = desk.kick = loop.kick
    region = runtime.settings.aws_region
    service = Service.create(
        CONSUMER,
        runtime,
        mailbox,
        router=make_router(mailbox, ec2, region, loop.kick),
        handlers=make_handlers(mailbox, desk, region, loop.kick),
        loops=[loop],
    )
    return Pool(service, reconciler, desk, loop, ec2)


def build(
    runtime: Runtime, settings: PoolSettings | None = None, cloud: Cloud | None = None
) -> Service:
    """pool's service; settings default to the HPCFLEET_POOL_ environment and the cloud to AWS
    as those settings and the runtime's say (pass `cloud` to choose another, e.g. a MotoServer's
    AwsCloud in the single-process mode)."""
    try:
        settings = settings or load_settings(PoolSettings)
        unavailable = ""
        if cloud is None:
            cloud, unavailable = make_cloud(runtime.settings, settings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return assemble(runtime, settings, cloud, unavailable=unavailable).service
