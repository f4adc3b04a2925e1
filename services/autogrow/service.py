"""autogrow: power decisions. This module wires its settings, API, handlers and loops together.

Two loops: the watcher reads the scheduler every `poll_interval` (or when kicked: by Slurm's hooks,
by the decision loop after it changed the scheduler) and publishes `QueueDepthChanged` when the
queue changed; the decision loop runs `decide()` on the latest queue and autogrow's view of the
pool whenever the queue or the pool changed, and every `poll_interval` for what time alone changes
(idle limits, paid hours, boot timeouts). autogrow also consumes `QueueDepthChanged` itself, so a
queue published by another watcher (the trace simulator, the benchmark) is decided on the same way.

Each pool decides with its own policy (`GET/PUT /autogrow/policies/{pool}`): the service's settings
with the knobs the operator set for that pool on top. A PUT kicks the decision loop of its process
(in the single-process mode, the one that decides; a separate worker sees it on its next pass).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.autogrow.billing import DEFAULT_RULES, BillingRules
from services.autogrow.cluster import SimulatedCluster
from services.autogrow.cost import Cost, close_intervals, cost_so_far, record_power
from services.autogrow.decisions import OFF, ON, SLURM_OFF, Decider, UnknownNodes, settles
from services.autogrow.policy_store import (
    DEFAULT_POOL,
    PoolPolicy,
    billing_of,
    combine,
    default_policy,
    describe,
    known_pools,
    load_stored,
    overrides_of,
    resolve,
    save_policy,
)
from services.autogrow.settings import AutogrowSettings
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.slurm import SlurmScheduler
from services.autogrow.swf import bundled_trace, open_swf
from services.autogrow.tables import MAILBOX, decisions, images, nodes
from services.autogrow.watcher import QueueWatcher, load_queue, queue_problem, store_snapshot
from shared.api import ReadinessCheck, route_scope
from shared.bus import Handler
from shared.clock import Clock
from shared.events import (
    BillingModel,
    ImageReady,
    Message,
    NodePowerChanged,
    NodeProvisioned,
    NodeRetired,
    NodeRetiring,
    PowerOn,
    PowerRefused,
    PowerState,
    QueueDepthChanged,
)
from shared.loop import ReconcileLoop
from shared.outbox import Mailbox
from shared.scheduler import NodeActivity, QueueSnapshot, Scheduler
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, load_settings
from shared.store import upsert
from shared.tokens import TokenClaims

CONSUMER = "autogrow"
HOOK_SCOPE = "autogrow:hook"
"""What Slurm's hooks need (auth's `slurm` client gets only this): not autogrow:write."""
log = logging.getLogger(__name__)


# ---- the API ------------------------------------------------------------------------------------


class QueueView(BaseModel):
    ready: bool = Field(description="The last read succeeded and is recent: decisions are made.")
    problem: str | None = Field(description="Why no decision is made on this queue, if so.")
    snapshot: QueueSnapshot | None = Field(description="The last queue read successfully.")
    changed_at: datetime | None = Field(description="When the queue last changed.")
    read_at: datetime | None = Field(description="When the scheduler was last read successfully.")
    error_at: datetime | None = Field(description="When the last failed read happened, if so.")


class ActionView(BaseModel):
    action: str = Field(description="power_on, power_off, drain, resume or slurm_power_down.")
    node_id: str
    scheduler_name: str
    reason: str
    error: str | None = Field(description="Why the scheduler refused it; None if it was done.")


class DecisionView(BaseModel):
    decision_id: str
    decided_at: datetime
    trigger: str = Field(description="policy, slurm-resume or slurm-suspend.")
    summary: str
    inputs: dict[str, Any] = Field(description="The numbers it was decided on.")
    actions: list[ActionView]


class NodeView(BaseModel):
    node_id: str
    pool: str
    scheduler_node_name: str | None
    instance_id: str | None
    image_id: str | None
    power_state: str = Field(description="As the pool last reported it.")
    since: datetime
    billing: str
    retired_at: datetime | None
    drain_requested: bool = Field(description="autogrow drained it and has not resumed it.")
    requested_power: str | None = Field(description="A command the pool has not acted on yet.")
    requested_at: datetime | None
    retiring: bool = Field(description="The pool will replace it: off first, on last.")
    refused_at: datetime | None = Field(description="When the pool last refused to start it.")
    refusal: str | None = Field(description="Why.")
    activity: NodeActivity | None = Field(description="In the latest snapshot, if it is there.")


NodeName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class HookRequest(BaseModel):
    """What `hpcfleet slurm-resume` / `slurm-suspend` send: Slurm's host list, expanded."""

    model_config = ConfigDict(extra="forbid")
    nodes: list[NodeName] = Field(
        min_length=1, max_length=10_000, description="Scheduler node names, e.g. ['node001']."
    )


PoolName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="A pool's name, as its nodes' NodeProvisioned events give it.",
    ),
]


class PolicyView(BaseModel):
    pool: str
    policy: PoolPolicy = Field(
        description="What the pool's decisions use: the service's default policy with the "
        "pool's own settings on top."
    )
    overrides: dict[str, Any] = Field(
        description="The settings given for this pool (PUT); the others follow the service's "
        "default. Empty: the pool follows the default."
    )
    updated_at: datetime | None = Field(description="When they were last set; None: never.")
    updated_by: str | None = Field(description="Who set them (the token's subject), if known.")
    problem: str | None = Field(
        description="Why the pool's settings are not (all) used, e.g. a stored min_running above "
        "a max_running the default got since; None: they are."
    )


class HookResponse(BaseModel):
    decision_id: str = Field(description="The recorded decision (GET /autogrow/decisions).")
    acted: list[str] = Field(description="Nodes powered on (resume) or off (suspend) now.")
    unchanged: list[str] = Field(description="Nodes already on (resume) or off (suspend).")
    kept: list[str] = Field(description="suspend: nodes left running because jobs run on them.")


def make_router(
    engine: AsyncEngine,
    decider: Decider,
    settings: AutogrowSettings,
    on_policy_change: Callable[[], None] = lambda: None,
) -> APIRouter:
    router = APIRouter(prefix="/autogrow", tags=["autogrow"])
    clock = decider.mailbox.clock
    default = decider.default

    @router.get(
        "/queue",
        summary="The latest queue snapshot; 503 while no decision can be made on it.",
        response_model=QueueView,
        responses={503: {"description": "No sound view of the queue: `detail` says why."}},
    )
    async def get_queue() -> QueueView | JSONResponse:
        async with engine.connect() as conn:
            state = await load_queue(conn)
        problem = queue_problem(state, clock.now(), settings.stale_seconds)
        view = QueueView(
            ready=problem is None,
            problem=problem,
            snapshot=None if state is None else state.snapshot,
            changed_at=None if state is None else state.changed_at,
            read_at=None if state is None else state.read_at,
            error_at=None if state is None else state.error_at,
        )
        if not view.ready:
            body = {"detail": view.problem, **view.model_dump(mode="json")}
            return JSONResponse(body, status_code=503)
        return view

    @router.get(
        "/decisions", summary="Recent decisions with their inputs and reasons, newest first."
    )
    async def list_decisions(
        limit: Annotated[int, Query(ge=1, le=1000, description="How many.")] = 50,
    ) -> list[DecisionView]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(decisions).order_by(decisions.c.id.desc()).limit(limit)
            )
            return [DecisionView.model_validate(row._mapping) for row in rows]

    @router.get("/cost", summary="Node-hours billed so far, by the nodes' billing models.")
    async def get_cost() -> Cost:
        async with engine.connect() as conn:
            return await cost_so_far(conn, clock.now())

    @router.get("/nodes", summary="The pool's nodes as autogrow knows them.")
    async def list_nodes() -> list[NodeView]:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(nodes).order_by(nodes.c.node_id))).mappings().all()
            state = await load_queue(conn)
        activity: dict[str, NodeActivity] = {}
        if state is not None and state.snapshot is not None:
            snapshot = QueueSnapshot.model_validate(state.snapshot)
            activity = {n.name: n.activity for n in snapshot.nodes}
        return [
            NodeView.model_validate(
                {**row, "activity": activity.get(row["scheduler_node_name"] or "")}
            )
            for row in rows
        ]

    async def policy_views(conn: AsyncConnection, pools: list[str]) -> list[PolicyView]:
        stored = await load_stored(conn, pools)
        views = []
        for pool in pools:
            row = stored.get(pool)
            resolved = resolve(default, row.overrides if row is not None else None)
            views.append(
                PolicyView(
                    pool=pool,
                    policy=resolved.policy,
                    overrides=row.overrides if row is not None else {},
                    updated_at=row.updated_at if row is not None else None,
                    updated_by=row.updated_by if row is not None else None,
                    problem=resolved.problem,
                )
            )
        return views

    async def known(conn: AsyncConnection, pool: str) -> None:
        pools = await known_pools(conn)
        if pool not in pools:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"autogrow knows no pool {pool!r}: it learns a pool from its nodes' events "
                f"(known: {', '.join(sorted(pools)) or 'none yet'})",
            )

    @router.get(
        "/policies",
        summary="Every pool's power policy: the service's default with the pool's own settings.",
    )
    async def list_policies() -> list[PolicyView]:
        async with engine.connect() as conn:
            return await policy_views(conn, sorted(await known_pools(conn)))

    @router.get(
        "/policies/{pool}",
        summary="One pool's power policy and which of its settings are its own.",
        responses={404: {"description": "autogrow knows no such pool."}},
    )
    async def get_policy(pool: PoolName) -> PolicyView:
        async with engine.connect() as conn:
            await known(conn, pool)
            return (await policy_views(conn, [pool]))[0]

    @router.put(
        "/policies/{pool}",
        summary="Set a pool's own policy settings; decisions use them at once.",
        description="The body names the settings the pool has of its own (an explicit null "
        "included, e.g. `max_running: null` for no cap); every setting it leaves out follows the "
        "service's default. `{}` returns the pool to the default. Unknown settings are refused.",
        responses={
            404: {"description": "autogrow knows no such pool."},
            422: {"description": "Invalid settings, or ones that do not fit the default."},
        },
    )
    async def put_policy(pool: PoolName, body: PoolPolicy, request: Request) -> PolicyView:
        overrides = overrides_of(body)
        try:
            combine(default, overrides)
        except ValidationError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"with the service's default for the settings not given: {describe(exc)}",
            ) from None
        claims = getattr(request.state, "claims", None)
        by = claims.subject if isinstance(claims, TokenClaims) else None
        async with decider.mailbox.transaction() as tx:
            await known(tx.conn, pool)
            await save_policy(tx.conn, pool, overrides, tx.now, by)
        log.info("autogrow pool %s: policy set by %s: %s", pool, by or "-", overrides)
        on_policy_change()
        async with engine.connect() as conn:
            return (await policy_views(conn, [pool]))[0]

    async def hook(action: str, request: HookRequest) -> HookResponse:
        names = list(dict.fromkeys(request.nodes))
        try:
            if action == "resume":
                outcome = await decider.resume_hook(names)
            else:
                outcome = await decider.suspend_hook(names)
        except UnknownNodes as exc:
            raise HTTPException(404, detail=str(exc)) from None
        return HookResponse(
            decision_id=str(outcome.decision_id),
            acted=outcome.acted,
            unchanged=outcome.unchanged,
            kept=outcome.kept,
        )

    @router.post(
        "/hooks/resume",
        summary="Slurm's ResumeProgram: power these nodes on now (scope autogrow:hook).",
        responses={404: {"description": "Some nodes are not pool nodes autogrow knows."}},
        openapi_extra=route_scope(HOOK_SCOPE),
    )
    async def resume_hook(request: HookRequest) -> HookResponse:
        return await hook("resume", request)

    @router.post(
        "/hooks/suspend",
        summary="Slurm's SuspendProgram: power these nodes off, busy ones kept (autogrow:hook).",
        responses={404: {"description": "Some nodes are not pool nodes autogrow knows."}},
        openapi_extra=route_scope(HOOK_SCOPE),
    )
    async def suspend_hook(request: HookRequest) -> HookResponse:
        return await hook("suspend", request)

    return router


# ---- the handlers -------------------------------------------------------------------------------


def make_handlers(
    mailbox: Mailbox, on_change: Callable[[], None], default: PoolPolicy | None = None
) -> dict[str, Handler]:
    """The pool's and bakery's events, and queues from any watcher; each kicks the decision loop
    once its change is committed. `default` is the policy of a pool without its own, for the
    billing a run is costed with."""
    default = default or PoolPolicy()

    async def on_node_provisioned(message: Message) -> None:
        assert isinstance(message, NodeProvisioned)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            row = await _node_row(tx.conn, message.node_id)
            values: dict[str, Any] = {
                "scheduler_node_name": message.scheduler_node_name,
                "instance_id": message.instance_id,
                "image_id": message.image_id,
                "pool": message.pool,
                "retired_at": None,
            }
            if _newer(message, row, strictly=True):  # a new, stopped instance
                values |= {
                    "power_state": PowerState.STOPPED.value,
                    "since": message.occurred_at,
                    "billing": message.billing.value,
                    "reported_at": message.occurred_at,
                }
            await _save_node(tx.conn, message.node_id, values, exists=row is not None)
        on_change()

    async def on_node_power_changed(message: Message) -> None:
        assert isinstance(message, NodePowerChanged)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            row = await _node_row(tx.conn, message.node_id)
            if message.provisioning:  # a new node's first boot: billed, but no node for jobs
                await record_boot(tx.conn, message, row, default)
                return  # its NodeProvisioned makes it one (stopped); the policy is not changed
            if not _newer(message, row):
                return  # older news than what is recorded
            values: dict[str, Any] = {
                "power_state": message.state.value,
                "since": message.since,
                "billing": message.billing.value,
                "reported_at": message.occurred_at,
                "refused_at": None,  # news since any refusal
                "refusal": None,
            }
            if message.scheduler_node_name is not None:
                values["scheduler_node_name"] = message.scheduler_node_name
            if row is not None and settles(row["requested_power"], message.state):
                values |= {"requested_power": None, "requested_at": None}
            await _save_node(tx.conn, message.node_id, values, exists=row is not None)
            pool = row["pool"] if row is not None else DEFAULT_POOL
            billing = await billing_of(tx.conn, pool, default) or message.billing
            await record_power(tx.conn, message.node_id, message.state, message.since, billing)
        on_change()

    async def on_node_retiring(message: Message) -> None:
        """Mark the node; if it overtook the node's NodeProvisioned, record it stopped until the
        pool says more, so that the mark is not lost."""
        assert isinstance(message, NodeRetiring)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            values: dict[str, Any] = {"retiring": True}
            exists = await _node_row(tx.conn, message.node_id) is not None
            if not exists:
                values |= {
                    "scheduler_node_name": message.scheduler_node_name,
                    "instance_id": message.instance_id,
                    "power_state": PowerState.STOPPED.value,
                    "since": message.occurred_at,
                    "billing": BillingModel.PER_SECOND.value,
                }
            await _save_node(tx.conn, message.node_id, values, exists=exists)
        on_change()

    async def on_power_refused(message: Message) -> None:
        """The pool would not act: forget the command and note why on the decision. A node it
        would not start is held back (`refusal_backoff_seconds`) so that another is powered on;
        a refused power-off is asked again on the next pass, if the policy still wants it."""
        assert isinstance(message, PowerRefused)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            row = await _node_row(tx.conn, message.node_id)
            asked = (ON,) if message.command == PowerOn.name() else (OFF, SLURM_OFF)
            if row is not None and row["requested_power"] in asked:
                values: dict[str, Any] = {"requested_power": None, "requested_at": None}
                if message.command == PowerOn.name():
                    values |= {"refused_at": tx.now, "refusal": message.reason}
                await tx.conn.execute(
                    update(nodes).where(nodes.c.node_id == message.node_id).values(**values)
                )
            await note_refusal(tx.conn, message)
        on_change()

    async def on_node_retired(message: Message) -> None:
        assert isinstance(message, NodeRetired)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            await tx.conn.execute(
                update(nodes).where(nodes.c.node_id == message.node_id).values(retired_at=tx.now)
            )
            await close_intervals(tx.conn, message.node_id, message.occurred_at)
        on_change()

    async def on_image_ready(message: Message) -> None:
        assert isinstance(message, ImageReady)
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            for image_id in message.images.values():
                values = {"image_id": image_id, "built_at": message.built_at}
                await upsert(tx.conn, images, values, ["image_id"])

    async def on_queue_depth_changed(message: Message) -> None:
        assert isinstance(message, QueueDepthChanged)
        snapshot = message.snapshot
        async with mailbox.handle_once(CONSUMER, message) as tx:
            if tx is None:
                return
            state = await load_queue(tx.conn, with_snapshot=False)
            if state is None or state.taken_at is None or snapshot.taken_at > state.taken_at:
                await store_snapshot(tx.conn, snapshot, tx.now, read_at=snapshot.taken_at)
        on_change()

    return {
        NodeProvisioned.name(): on_node_provisioned,
        NodePowerChanged.name(): on_node_power_changed,
        NodeRetiring.name(): on_node_retiring,
        NodeRetired.name(): on_node_retired,
        PowerRefused.name(): on_power_refused,
        ImageReady.name(): on_image_ready,
        QueueDepthChanged.name(): on_queue_depth_changed,
    }


async def record_boot(
    conn: AsyncConnection,
    message: NodePowerChanged,
    row: Mapping[Any, Any] | None,
    default: PoolPolicy,
) -> None:
    """A provisioning boot's power change, for the cost alone: the interval is opened or closed
    as any run's, with the billing a run of the node's pool has, but the node's row (what the
    policy decides on) is neither made nor changed, so the policy never counts a node that is
    still booting for the pool as one jobs can run on."""
    pool = row["pool"] if row is not None else DEFAULT_POOL
    billing = await billing_of(conn, pool, default) or message.billing
    await record_power(conn, message.node_id, message.state, message.since, billing)


async def note_refusal(conn: AsyncConnection, refused: PowerRefused) -> None:
    """Mark the refused action on the decision that asked for it, so the decision log says why
    the node did not move."""
    actions = await conn.scalar(
        select(decisions.c.actions).where(decisions.c.decision_id == str(refused.decision_id))
    )
    if actions is None:
        return
    kind = "power_on" if refused.command == PowerOn.name() else "power_off"
    for action in actions:
        if action["node_id"] == refused.node_id and action["action"] == kind:
            action["error"] = f"the pool refused: {refused.reason}"
    await conn.execute(
        update(decisions)
        .where(decisions.c.decision_id == str(refused.decision_id))
        .values(actions=actions)
    )


def _newer(message: Message, row: Mapping[Any, Any] | None, *, strictly: bool = False) -> bool:
    """Whether the pool sent `message` after the event the recorded power state comes from. A
    NodeProvisioned must be strictly newer: the pool sends it with the power of an adopted node
    in one transaction, and its "stopped" is only a guess."""
    reported = None if row is None else row["reported_at"]
    if reported is None:
        return True
    return message.occurred_at > reported if strictly else message.occurred_at >= reported


async def _save_node(
    conn: AsyncConnection, node_id: str, values: dict[str, Any], *, exists: bool
) -> None:
    """Insert the node's row, or update only the given columns of the existing one."""
    if exists:
        await conn.execute(update(nodes).where(nodes.c.node_id == node_id).values(**values))
    else:
        await conn.execute(insert(nodes).values(node_id=node_id, **values))


async def _node_row(conn: AsyncConnection, node_id: str) -> Mapping[Any, Any] | None:
    row = (await conn.execute(select(nodes).where(nodes.c.node_id == node_id))).mappings().first()
    return row


# ---- composition --------------------------------------------------------------------------------


@dataclass
class Autogrow:
    """The service and its parts, for tests and composition roots that drive them directly."""

    service: Service
    scheduler: Scheduler
    watcher: QueueWatcher
    decider: Decider
    watch_loop: ReconcileLoop
    decide_loop: ReconcileLoop

    def readiness(self) -> ReadinessCheck:
        """`scheduler`: fails, saying why, while no decision can be made on the queue."""
        engine, clock = self.service.mailbox.engine, self.service.mailbox.clock
        stale = self.decider.settings.stale_seconds

        async def check() -> None:
            async with engine.connect() as conn:
                state = await load_queue(conn, with_snapshot=False)
            problem = queue_problem(state, clock.now(), stale)
            if problem is not None:
                raise RuntimeError(problem)

        return ("scheduler", check)


def simulated_cluster(
    settings: AutogrowSettings, engine: AsyncEngine, clock: Clock
) -> SimulatedCluster:
    """The bundled trace replayed from now (its first job arrives at once) on simulated nodes."""
    with open_swf(bundled_trace(settings.simulated_trace)) as reader:
        jobs = list(reader)
        if reader.skipped.total:
            log.info("trace %s: %d lines skipped", settings.simulated_trace, reader.skipped.total)
    first = min((job.submit for job in jobs), default=0)
    scheduler = SimulatedScheduler(
        jobs,
        clock,
        nodes=settings.simulated_node_names,
        cores_per_node=settings.policy.cores_per_node,
        origin=clock.now() - timedelta(seconds=first),
    )
    return SimulatedCluster(scheduler, engine, clock, boot_seconds=settings.simulated_boot_seconds)


def make_scheduler(settings: AutogrowSettings, runtime: Runtime) -> Scheduler:
    if settings.scheduler == "simulated":
        return simulated_cluster(settings, runtime.engine, runtime.clock)
    env = {"SLURM_CONF": str(settings.slurm_conf)} if settings.slurm_conf is not None else None
    return SlurmScheduler(
        bin_dir=settings.slurm_bin_dir,
        env=env,
        timeout=settings.slurm_timeout,
        clock=runtime.clock,
    )


def assemble(
    runtime: Runtime,
    settings: AutogrowSettings,
    scheduler: Scheduler,
    *,
    billing: BillingRules = DEFAULT_RULES,
) -> Autogrow:
    mailbox = runtime.mailbox(MAILBOX)
    clock = runtime.clock
    interval = settings.poll_interval
    # the loops and the parts that kick them refer to each other; the lambdas bind late
    watcher = QueueWatcher(scheduler, mailbox, on_change=lambda: decide_loop.kick())
    watch_loop = ReconcileLoop(
        "autogrow.watch", watcher.poll, interval=interval, clock=clock, fixed_rate=True
    )

    def on_hook() -> None:
        watch_loop.kick()
        decide_loop.kick()

    decider = Decider(mailbox, scheduler, watcher, settings, billing, on_hook=on_hook)
    decide_loop = ReconcileLoop("autogrow.decide", decider.step, interval=interval, clock=clock)
    service = Service.create(
        CONSUMER,
        runtime,
        mailbox,
        router=make_router(
            runtime.engine, decider, settings, on_policy_change=lambda: decide_loop.kick()
        ),
        handlers=make_handlers(mailbox, decide_loop.kick, default_policy(settings)),
        loops=[watch_loop, decide_loop],
    )
    autogrow = Autogrow(service, scheduler, watcher, decider, watch_loop, decide_loop)
    service.readiness = (autogrow.readiness(),)
    return autogrow


def build(
    runtime: Runtime,
    settings: AutogrowSettings | None = None,
    scheduler: Scheduler | None = None,
) -> Service:
    """autogrow's service; settings default to the HPCFLEET_AUTOGROW_ environment, the scheduler
    to the one they name."""
    try:
        settings = settings or load_settings(AutogrowSettings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return assemble(runtime, settings, scheduler or make_scheduler(settings, runtime)).service
