"""The decision loop and Slurm's power hooks: decide on autogrow's view, act, record.

A pass reads the stored queue (refusing a view that failed or went stale), autogrow's own table of
the pool's nodes and each pool's policy (`policy_store`), calls the pure `decide()` once per pool,
with that pool's policy and the clock's time, and acts on each pool's decision:

1. drain and resume (and, where Slurm decides, power-down) go to the scheduler first. They cannot
   join a database transaction, and each is idempotent, so a crash before step 2 only repeats them;
2. one transaction then records the decision (its inputs, every action with its reason and outcome),
   updates the nodes (`drain_requested`, the command the pool has yet to act on) and emits
   `PowerOn` / `PowerOff`, which are published only if it commits.

Pools share the queue: a pool whose policy names no partitions counts the waiting jobs of every
partition. With several pools, such a pool counts only the partitions its own nodes serve in the
snapshot, so that two pools do not both power on for the same job (pools serving one partition
still do: name each pool's partitions). A pool's billing override replaces its nodes' image billing
in the views `decide()` gets.

A command is remembered on the node (`requested_power`) until the pool reports the node moving that
way, or for `command_timeout_seconds`: meanwhile the policy sees the node starting or stopping and
does not ask again. After a pass that changed the scheduler, the next pass first re-reads it, so
that no decision is made on a view that predates autogrow's own changes.

A pool whose policy has a warm reserve (`warm_window_seconds` and `warm_max_nodes`) also gets the
`QueueOutlook` of the jobs submitted lately, which the decider gathers from the snapshots'
`submissions` (`RecentArrivals`); without one, `decide()` gets no outlook, as before.

Where Slurm decides (power saving with ResumeProgram / SuspendProgram): Slurm picks the nodes to
power on and calls the resume hook, so the policy's power-ons are not acted on; autogrow still
chooses when idle nodes go down, and asks Slurm to power down a node Slurm counts as up (drained by
then), so Slurm knows it is off and will resume it for the next job. Slurm's SuspendProgram then
calls the suspend hook, which emits the `PowerOff`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import hostlist
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.autogrow.billing import BillingRules
from services.autogrow.policy import (
    Decision,
    NodeAction,
    PolicySettings,
    PoolNodeView,
    QueueOutlook,
    decide,
    warm_reserve,
)
from services.autogrow.policy_store import DEFAULT_POOL, PoolPolicy, default_policy, load_policies
from services.autogrow.settings import AutogrowSettings
from services.autogrow.slurm import SlurmScheduler
from services.autogrow.tables import decisions, images, nodes
from services.autogrow.watcher import QueueState, QueueWatcher, load_queue, queue_problem
from shared.events import BillingModel, PowerOff, PowerOn, PowerState
from shared.outbox import Mailbox, Transaction
from shared.scheduler import JobSubmission, NodeActivity, QueueSnapshot, Scheduler

log = logging.getLogger(__name__)

# what autogrow asked of a node that the pool has not reported acting on yet
ON, OFF, SLURM_OFF = "on", "off", "slurm-off"  # slurm-off: Slurm asked to power it down

ActionKind = Literal["power_on", "resume", "drain", "power_off", "slurm_power_down"]

# how each action done changes autogrow's record of the node
_NODE_CHANGES: dict[ActionKind, dict[str, Any]] = {
    "resume": {"drain_requested": False},
    "drain": {"drain_requested": True},
    "power_on": {"requested_power": ON},
    "power_off": {"requested_power": OFF},
    "slurm_power_down": {"requested_power": SLURM_OFF},
}


class UnknownNodes(LookupError):
    """Hook names that are not pool nodes autogrow knows (or that were retired)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(sorted(names))
        super().__init__(f"not pool nodes autogrow knows: {', '.join(self.names)}")


@dataclass(frozen=True)
class HookOutcome:
    decision_id: uuid.UUID
    acted: list[str]  # scheduler names powered on (resume) or off (suspend)
    unchanged: list[str]  # already that way
    kept: list[str] = field(default_factory=list)  # suspend: busy in the scheduler, left running


# ---- the view -----------------------------------------------------------------------------------


def node_view(
    row: Mapping[Any, Any],
    built_at: datetime | None,
    now: datetime,
    command_timeout_seconds: float,
) -> PoolNodeView | None:
    """A pool node as the policy sees it, or None if it cannot be powered (retired, or no
    scheduler name yet). A command the pool has not acted on counts as under way until it times
    out, so the policy neither repeats it nor counts the node twice."""
    if row["retired_at"] is not None or not row["scheduler_node_name"]:
        return None
    power, since = PowerState(row["power_state"]), row["since"]
    requested, at = row["requested_power"], row["requested_at"]
    if requested and at is not None and (now - at).total_seconds() < command_timeout_seconds:
        if requested == ON and power in (PowerState.STOPPED, PowerState.STOPPING):
            power, since = PowerState.STARTING, at
        elif requested != ON and power in (PowerState.STARTING, PowerState.RUNNING):
            power, since = PowerState.STOPPING, at
    return PoolNodeView(
        node_id=row["node_id"],
        scheduler_name=row["scheduler_node_name"],
        power=power,
        since=since,
        billing=BillingModel(row["billing"]),
        image_built_at=built_at,
        retiring=bool(row["retiring"]),
        drain_requested=bool(row["drain_requested"]),
    )


def held_back(row: Mapping[Any, Any], now: datetime, backoff_seconds: float) -> bool:
    """Whether the pool refused to start the node so recently that the policy should pick
    another (it keeps a refused node out of its view; Slurm's hooks may still name it)."""
    refused = row["refused_at"]
    return refused is not None and (now - refused).total_seconds() < backoff_seconds


def settles(requested: str | None, state: PowerState) -> bool:
    """Whether a reported power state shows the pool acting on the command autogrow sent."""
    if requested == ON:
        return state in (PowerState.STARTING, PowerState.RUNNING)
    if requested in (OFF, SLURM_OFF):
        return state in (PowerState.STOPPING, PowerState.STOPPED)
    return False


async def load_pool(
    conn: AsyncConnection,
    now: datetime,
    command_timeout_seconds: float,
    *,
    names: Sequence[str] = (),
) -> dict[str, tuple[Mapping[Any, Any], PoolNodeView | None]]:
    """autogrow's nodes (all, or those with these scheduler names) by scheduler name, each with its
    policy view."""
    query = select(nodes).where(nodes.c.scheduler_node_name.is_not(None)).order_by(nodes.c.node_id)
    if names:
        query = query.where(nodes.c.scheduler_node_name.in_(names))
    rows = (await conn.execute(query)).mappings().all()
    built = {
        row.image_id: row.built_at
        for row in await conn.execute(select(images.c.image_id, images.c.built_at))
    }
    return {
        row["scheduler_node_name"]: (
            row,
            node_view(row, built.get(row["image_id"]), now, command_timeout_seconds),
        )
        for row in rows
    }


def group_by_pool(
    pool: Mapping[str, tuple[Mapping[Any, Any], PoolNodeView | None]],
) -> dict[str, list[tuple[Mapping[Any, Any], PoolNodeView]]]:
    """The nodes the policy can power, by pool (sorted by name); with none, the default pool with
    no nodes, so that a pass still decides (and says so) as it did before pools had policies."""
    grouped: dict[str, list[tuple[Mapping[Any, Any], PoolNodeView]]] = {}
    for row, view in pool.values():
        if view is not None:
            grouped.setdefault(row["pool"] or DEFAULT_POOL, []).append((row, view))
    return {name: grouped[name] for name in sorted(grouped)} or {DEFAULT_POOL: []}


def partitions_served(snapshot: QueueSnapshot, names: Sequence[str]) -> frozenset[str]:
    """The partitions these scheduler nodes serve in the snapshot."""
    wanted = set(names)
    return frozenset(p for n in snapshot.nodes if n.name in wanted for p in n.partitions)


def billed(view: PoolNodeView, override: BillingModel | None) -> PoolNodeView:
    """The view with the pool's billing override in place of its image's billing model."""
    if override is None or view.billing is override:
        return view
    return dataclasses.replace(view, billing=override)


def together(decisions: Iterable[Decision], now: datetime) -> Decision:
    """Several pools' decisions as one (the only one, when there is one pool)."""
    parts = list(decisions)
    if len(parts) == 1:
        return parts[0]
    rechecks = [d.recheck_at for d in parts if d.recheck_at is not None]
    return Decision(
        at=now,
        demand_nodes=sum(d.demand_nodes for d in parts),
        supply_nodes=sum(d.supply_nodes for d in parts),
        recheck_at=min(rechecks, default=None),
        power_on=tuple(a for d in parts for a in d.power_on),
        resume=tuple(a for d in parts for a in d.resume),
        drain=tuple(a for d in parts for a in d.drain),
        power_off=tuple(a for d in parts for a in d.power_off),
    )


# ---- the warm reserve's outlook -----------------------------------------------------------------


def warms(policy: PolicySettings) -> bool:
    """Whether the policy has a warm reserve at all (it needs the outlook)."""
    return policy.warm_window_seconds > 0 and policy.warm_max_nodes > 0


class RecentArrivals:
    """The jobs submitted lately, gathered from the snapshots the decider reads, by job id.

    Why gathered, not read from the latest snapshot alone: a snapshot lists only the jobs the
    scheduler still shows (Slurm: waiting, running, and finished for a few minutes), at most
    `MAX_SUBMISSIONS` of them; a short job that came and went between two reads, or a burst
    larger than that, is part of the arrival pattern all the same, so each snapshot's
    `submissions` are merged into what earlier ones showed (a job is counted once, under the
    submit time the scheduler gives, not when it was first seen).

    Why bounded: only jobs submitted within the longest `warm_window_seconds` of any pool can
    count, and of those only the newest `warm_max_nodes` (the largest of any pool) per partition:
    each asks for at least one node, so if more of them are in a window the reserve is at its cap
    anyway, and the older ones leave the window first. With no pool warming nothing is kept.

    Why in memory only: after a restart the next snapshot lists again every job the scheduler
    still shows, with its submit time, so only the jobs that came and went meanwhile are missed,
    and the reserve is a little smaller for at most one window. That is a guess about the future
    off by a little for a few minutes, not a wrong action; a table would cost more than it saves.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, JobSubmission] = {}
        self._seen: QueueSnapshot | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def observe(self, snapshot: QueueSnapshot, now: datetime, window: float, most: int) -> None:
        """Merge the snapshot's submissions (once per snapshot), then forget what is older than
        `window` seconds or beyond the newest `most` of its partition."""
        if window <= 0 or most <= 0:
            self._jobs.clear()
            self._seen = None
            return
        jobs = self._jobs
        if snapshot is not self._seen:
            self._seen = snapshot
            for job in snapshot.submissions:
                if (now - job.submitted_at).total_seconds() >= window:
                    continue  # listed, but too old to count
                known = jobs.get(job.job_id)
                if known is None:
                    jobs[job.job_id] = job
                elif job.nodes > known.nodes or job.cores > known.cores:  # an array grew
                    nodes, cores = max(job.nodes, known.nodes), max(job.cores, known.cores)
                    jobs[job.job_id] = known.model_copy(update={"nodes": nodes, "cores": cores})
        by_partition: dict[str, list[JobSubmission]] = {}
        for job in jobs.values():
            if (now - job.submitted_at).total_seconds() < window:
                by_partition.setdefault(job.partition, []).append(job)
        kept: dict[str, JobSubmission] = {}
        for listed in by_partition.values():
            listed.sort(key=lambda j: j.submitted_at, reverse=True)
            kept.update((j.job_id, j) for j in listed[:most])
        self._jobs = kept

    def outlook(self, policy: PolicySettings) -> QueueOutlook | None:
        """The arrivals in the pool's partitions, in whole nodes of its size; None if the policy
        has no warm reserve (then `decide()` decides exactly as without one)."""
        if not warms(policy):
            return None
        wanted, per_node = policy.partitions, policy.cores_per_node
        return QueueOutlook(
            tuple(
                (job.submitted_at, max(job.nodes, math.ceil(job.cores / per_node)))
                for job in self._jobs.values()
                if wanted is None or job.partition in wanted
            )
        )


# ---- the loop -----------------------------------------------------------------------------------


@dataclass
class _Act:
    """One action of a pass and how it went."""

    kind: ActionKind
    action: NodeAction
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "action": self.kind,
            "node_id": self.action.node_id,
            "scheduler_name": self.action.scheduler_name,
            "reason": self.action.reason,
            "error": self.error,
        }


class Decider:
    """The decision loop's pass (`step`) and the hooks; one at a time, so they never race."""

    def __init__(
        self,
        mailbox: Mailbox,
        scheduler: Scheduler,
        watcher: QueueWatcher,
        settings: AutogrowSettings,
        billing: BillingRules,
        *,
        on_hook: Callable[[], None] = lambda: None,
    ) -> None:
        if settings.mode == "slurm-decides" and not isinstance(scheduler, SlurmScheduler):
            raise ValueError("mode slurm-decides needs the Slurm scheduler")
        self.mailbox = mailbox
        self.scheduler = scheduler
        self.watcher = watcher
        self.settings = settings
        self.billing = billing
        self.on_hook = on_hook
        self.default = default_policy(settings)  # of a pool with no policy of its own
        self.lock = asyncio.Lock()
        self.last: Decision | None = None  # the latest pass's decisions together, acted on or not
        self.by_pool: dict[str, Decision] = {}  # the latest pass's decision of each pool
        self.blocked: str | None = None  # why the latest pass decided nothing
        self._policy_problems: dict[str, str | None] = {}
        self._reread = False
        self._parsed: tuple[datetime | None, QueueSnapshot] | None = None
        self.arrivals = RecentArrivals()  # for the pools with a warm reserve

    async def step(self) -> Decision | None:
        """One pass: decide and act for each pool, or explain (in `blocked`) why not. Returns the
        pools' decisions together (`by_pool` has each)."""
        async with self.lock:
            fresh: QueueSnapshot | None = None
            if self._reread:  # the last pass changed the scheduler: see the result first
                fresh = await self.watcher.poll()
                self._reread = False
            now = self.mailbox.clock.now()
            async with self.mailbox.engine.connect() as conn:
                state = await load_queue(conn, with_snapshot=False)
                why = queue_problem(state, now, self.settings.stale_seconds)
                if state is None or why is not None:
                    if why != self.blocked:  # once per cause; before the first read it is normal
                        log.log(
                            logging.INFO if state is None else logging.WARNING,
                            "autogrow decides nothing: %s",
                            why,
                        )
                    self.blocked = why
                    return None
                if fresh is not None:
                    self._parsed = (state.changed_at, fresh)
                snapshot = await self._snapshot(conn, state)
                pool = await load_pool(conn, now, self.settings.command_timeout_seconds)
                rows = group_by_pool(pool)
                policies = await load_policies(conn, self.default, rows)
            self.blocked = None
            warming = [r.policy for r in policies.values() if warms(r.policy)]
            self.arrivals.observe(
                snapshot,
                now,
                max((p.warm_window_seconds for p in warming), default=0.0),
                max((p.warm_max_nodes for p in warming), default=0),
            )
            backoff = self.settings.refusal_backoff_seconds
            decisions: dict[str, Decision] = {}
            touched = False
            for name, members in rows.items():
                resolved = policies[name]
                self._note_policy_problem(name, resolved.problem)
                policy = resolved.policy
                if len(rows) > 1 and policy.partitions is None:
                    served = partitions_served(snapshot, [v.scheduler_name for _, v in members])
                    if served:
                        policy = policy.model_copy(update={"partitions": served})
                views = [
                    billed(view, policy.billing)
                    for row, view in members
                    if not held_back(row, now, backoff)
                ]
                outlook = self.arrivals.outlook(policy)
                decision = decide(snapshot, views, self.billing, now, policy, outlook)
                decisions[name] = decision
                acts = self._plan(decision, snapshot)
                if acts:
                    touched |= await self._act(
                        name, policy, decision, snapshot, views, acts, outlook
                    )
            self._reread = touched
            self.by_pool = decisions
            self.last = together(decisions.values(), now)
            return self.last

    def _note_policy_problem(self, pool: str, problem: str | None) -> None:
        """Log a pool's unusable policy once per cause, not on every pass."""
        if self._policy_problems.get(pool) != problem and problem is not None:
            log.warning("autogrow pool %s: %s", pool, problem)
        self._policy_problems[pool] = problem

    async def _snapshot(self, conn: AsyncConnection, state: QueueState) -> QueueSnapshot:
        """The stored snapshot, parsed only when it changed since the last pass."""
        if self._parsed is None or self._parsed[0] != state.changed_at:
            full = await load_queue(conn)
            assert full is not None and full.snapshot is not None
            self._parsed = (full.changed_at, QueueSnapshot.model_validate(full.snapshot))
        return self._parsed[1]

    def _plan(self, decision: Decision, snapshot: QueueSnapshot) -> list[_Act]:
        acts = [_Act("resume", a) for a in decision.resume] + [
            _Act("drain", a) for a in decision.drain
        ]
        if self.settings.mode == "hpcfleet-decides":
            acts += [_Act("power_on", a) for a in decision.power_on]
            acts += [_Act("power_off", a) for a in decision.power_off]
            return acts
        up = {n.name for n in snapshot.nodes if n.activity is not NodeActivity.DOWN}
        for action in decision.power_off:  # Slurm powers down what it counts as up
            acts.append(
                _Act("slurm_power_down" if action.scheduler_name in up else "power_off", action)
            )
        return acts

    async def _act(
        self,
        pool: str,
        policy: PoolPolicy,
        decision: Decision,
        snapshot: QueueSnapshot,
        views: Sequence[PoolNodeView],
        acts: list[_Act],
        outlook: QueueOutlook | None = None,
    ) -> bool:
        """Act on one pool's decision; True if anything was asked of the scheduler."""
        decision_id = uuid.uuid4()
        touched = await self._tell_scheduler(decision_id, acts)
        async with self.mailbox.transaction() as tx:
            await self._record(
                tx,
                decision_id,
                "policy",
                f"pool {pool}: {decision.summary}",
                _inputs(pool, policy, decision, snapshot, views, self.settings, outlook),
                acts,
            )
            for kind, change in _NODE_CHANGES.items():
                done = [a.action.node_id for a in acts if a.kind == kind and a.error is None]
                if done:
                    values = dict(change)
                    if "requested_power" in values:
                        values["requested_at"] = decision.at
                    await tx.conn.execute(
                        update(nodes).where(nodes.c.node_id.in_(done)).values(**values)
                    )
            _emit(tx, decision_id, acts)
        return touched

    async def _tell_scheduler(self, decision_id: uuid.UUID, acts: list[_Act]) -> bool:
        """Drain, resume and power down in the scheduler; True if anything was asked of it."""
        asked = False
        for kind in ("resume", "drain", "slurm_power_down"):
            batch = [act for act in acts if act.kind == kind]
            if not batch:
                continue
            names = [act.action.scheduler_name for act in batch]
            asked = True
            try:
                if kind == "resume":
                    await self.scheduler.resume(names)
                elif kind == "drain":
                    await self.scheduler.drain(names, f"hpcfleet autogrow {decision_id}: idle")
                else:
                    assert isinstance(self.scheduler, SlurmScheduler)
                    await self.scheduler.power_down(names)
            except Exception as exc:
                log.warning("autogrow could not %s %s: %s", kind, names, exc)
                for act in batch:
                    act.error = f"{type(exc).__name__}: {exc}"
        return asked

    async def _record(
        self,
        tx: Transaction,
        decision_id: uuid.UUID,
        trigger: str,
        summary: str,
        inputs: dict[str, Any],
        acts: Sequence[_Act],
    ) -> None:
        await tx.conn.execute(
            insert(decisions).values(
                decision_id=str(decision_id),
                decided_at=tx.now,
                trigger=trigger,
                summary=summary,
                inputs=inputs,
                actions=[act.record() for act in acts],
            )
        )

    # ---- Slurm's hooks --------------------------------------------------------------------------

    async def resume_hook(self, names: Sequence[str]) -> HookOutcome:
        """Slurm's ResumeProgram: power these nodes on at once (Slurm has put jobs on them)."""
        async with self.lock, self.mailbox.transaction() as tx:
            pool = await self._hook_nodes(tx, names)
            listed = hostlist.collect_hostlist(list(names))
            reason = f"Slurm's ResumeProgram asked for {listed}: jobs wait for them"
            acts, unchanged = [], []
            for name in names:
                _, view = pool[name]
                if view.power in (PowerState.STOPPED, PowerState.STOPPING):
                    acts.append(_Act("power_on", NodeAction(view.node_id, name, reason)))
                else:
                    unchanged.append(name)
            decision_id = uuid.uuid4()
            summary = f"resume hook for {listed}: on {len(acts)}, already on {len(unchanged)}"
            inputs = {"mode": self.settings.mode, "nodes": list(names), "unchanged": unchanged}
            await self._record(tx, decision_id, "slurm-resume", summary, inputs, acts)
            await self._set_power(tx, acts, ON)
            _emit(tx, decision_id, acts)
        self.on_hook()
        return HookOutcome(decision_id, [a.action.scheduler_name for a in acts], unchanged)

    async def suspend_hook(self, names: Sequence[str]) -> HookOutcome:
        """Slurm's SuspendProgram: these nodes are off as far as Slurm knows, so power them off.

        Either autogrow asked for it (it chose the moment, billing-aware, and drained them first),
        or Slurm suspended them on its own (SuspendTime, an operator's power_down). Either way
        Slurm places no job on them until it resumes them, and a resumed node must boot to
        register again, so keeping one up would only cost. A node the latest snapshot shows busy
        is left running: powering it off would kill its jobs."""
        async with self.lock, self.mailbox.transaction() as tx:
            pool = await self._hook_nodes(tx, names)
            busy = await _busy_nodes(tx.conn)
            acts, unchanged, kept = [], [], []
            for name in names:
                row, view = pool[name]
                asked = row["requested_power"] == SLURM_OFF
                if view.power in (PowerState.STOPPED, PowerState.STOPPING) and not asked:
                    unchanged.append(name)
                elif name in busy:
                    kept.append(name)
                else:
                    reason = (
                        "Slurm's SuspendProgram powered it down as autogrow asked"
                        if asked
                        else "Slurm's SuspendProgram powered it down on its own (SuspendTime or "
                        "an operator); it takes no job until it boots again"
                    )
                    acts.append(_Act("power_off", NodeAction(view.node_id, name, reason)))
            decision_id = uuid.uuid4()
            listed = hostlist.collect_hostlist(list(names))
            summary = (
                f"suspend hook for {listed}: off {len(acts)}, already off {len(unchanged)}, "
                f"busy {len(kept)}"
            )
            inputs = {
                "mode": self.settings.mode,
                "nodes": list(names),
                "unchanged": unchanged,
                "busy": kept,
            }
            await self._record(tx, decision_id, "slurm-suspend", summary, inputs, acts)
            await self._set_power(tx, acts, OFF)
            _emit(tx, decision_id, acts)
        self.on_hook()
        return HookOutcome(decision_id, [a.action.scheduler_name for a in acts], unchanged, kept)

    async def _hook_nodes(
        self, tx: Transaction, names: Sequence[str]
    ) -> dict[str, tuple[Mapping[Any, Any], PoolNodeView]]:
        """The named nodes' rows and views; raises `UnknownNodes` naming those autogrow cannot
        power (never heard of, retired)."""
        pool = await load_pool(tx.conn, tx.now, self.settings.command_timeout_seconds, names=names)
        found = {name: (row, view) for name, (row, view) in pool.items() if view is not None}
        unknown = [name for name in names if name not in found]
        if unknown:
            raise UnknownNodes(unknown)
        return found

    async def _set_power(self, tx: Transaction, acts: Sequence[_Act], requested: str) -> None:
        if acts:
            await tx.conn.execute(
                update(nodes)
                .where(nodes.c.node_id.in_([a.action.node_id for a in acts]))
                .values(requested_power=requested, requested_at=tx.now)
            )


async def _busy_nodes(conn: AsyncConnection) -> set[str]:
    """Nodes with jobs on them in the latest stored snapshot."""
    state = await load_queue(conn)
    if state is None or state.snapshot is None:
        return set()
    return {
        n.name
        for n in QueueSnapshot.model_validate(state.snapshot).nodes
        if n.cpus_allocated > 0 or n.activity is NodeActivity.BUSY
    }


def _emit(tx: Transaction, decision_id: uuid.UUID, acts: Sequence[_Act]) -> None:
    """PowerOn / PowerOff for the actions that stand, tied to the decision for tracing."""
    for kind, command in (("power_on", PowerOn), ("power_off", PowerOff)):
        chosen = [a.action for a in acts if a.kind == kind and a.error is None]
        if chosen:
            tx.emit(
                command(
                    occurred_at=tx.now,
                    node_ids=tuple(a.node_id for a in chosen),
                    reason="; ".join(dict.fromkeys(a.reason for a in chosen)),
                    decision_id=decision_id,
                    correlation_id=decision_id,
                )
            )


def _inputs(
    pool: str,
    policy: PoolPolicy,
    decision: Decision,
    snapshot: QueueSnapshot,
    views: Sequence[PoolNodeView],
    settings: AutogrowSettings,
    outlook: QueueOutlook | None = None,
) -> dict[str, Any]:
    """What a decision was made on, in numbers (the full snapshot is kept once, as the queue;
    with a warm reserve, the arrivals it was sized by)."""
    power: dict[str, int] = {}
    for view in views:
        power[view.power.value] = power.get(view.power.value, 0) + 1
    warm: dict[str, Any] = {}
    if outlook is not None:
        at = decision.at
        warm["warm_reserve_nodes"] = warm_reserve(outlook, at, policy)[0]
        warm["recent_arrivals"] = sorted(
            ([when.isoformat(), nodes] for when, nodes in outlook.arrivals), reverse=True
        )
    return {
        "pool": pool,
        "mode": settings.mode,
        "snapshot_taken_at": snapshot.taken_at.isoformat(),
        "pending_jobs": snapshot.pending_jobs,
        "pending_cores": snapshot.pending_cores,
        "running_jobs": snapshot.running_jobs,
        "demand_nodes": decision.demand_nodes,
        "supply_nodes": decision.supply_nodes,
        "pool_power": power,
        "recheck_at": None if decision.recheck_at is None else decision.recheck_at.isoformat(),
        "policy": policy.model_dump(mode="json"),
        **warm,
    }
