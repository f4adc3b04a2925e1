"""The reconcile pass: observe each pool in EC2, `plan()`, act idempotently, record and announce.

One pass per pool holds the pool's lock (see `locks`), so it never interleaves with a power
command or another worker. EC2's view is read before the lock is taken, so that a power command
(a job waits on it) waits for a pass's book-keeping, not its describe; under the lock the pass
uses that view only if the pool's rows are as they were when it was read (nobody acted since) and
only for book-keeping: a plan that asks anything of EC2 is made again on a view read under the
lock. Its steps, in the order that makes a crash anywhere safe:

1. Observe: every instance with the pool's tag (and, for new nodes, whether they booted). A failed
   describe ends the pool's pass before anything is decided: a partial view reads as vanished nodes.
2. Plan with the pure `plan()`.
3. Book-keeping in one transaction, with the events it causes: bindings, recorded states,
   adoptions, forgotten rows, retire marks, provisioned nodes, and terminations *before* EC2 is
   asked (a row marked shutting-down whose call was lost is terminated again by the next plan).
4. EC2: terminate, then stop (recorded after the call: a lost record is seen as a state change).
5. Launch: the intent rows (with their client tokens) commit first, then RunInstances, then the
   outcome. A crash between the two leaves rows the next plan binds to their instances by token.
   Insufficient capacity fails the row and backs the type/zone off; a throttle is retried and then
   left for the next pass with the same token; a refusal fails the row with EC2's reason.

A pass that acted cleanly is followed at once by another (up to `followups`), so a rollout moves
at EC2's pace rather than a step per interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from prometheus_client import Counter as MetricCounter
from prometheus_client import Gauge, Histogram
from sqlalchemy import delete, insert, select, update

from services.pool.ec2 import Ec2
from services.pool.locks import PoolBusy, PoolLocks
from services.pool.plan import (
    Action,
    Adopt,
    Bind,
    Forget,
    Launch,
    MarkRetiring,
    NodeRecord,
    NodeState,
    ObservedInstance,
    Placement,
    Plan,
    Provision,
    RecordState,
    Stop,
    Terminate,
    TerminateUntracked,
    plan,
)
from services.pool.records import (
    GONE,
    POWER,
    Node,
    SchedulerNames,
    back_off,
    billing_by_image,
    drop_expired_backoffs,
    load_backoffs,
    load_launches,
    load_nodes,
    load_specs,
    record_values,
    update_rows,
)
from services.pool.settings import PoolSettings
from services.pool.spec import PoolSpec
from services.pool.tables import nodes, pools
from shared.cloud import (
    CloudError,
    Instance,
    InstanceState,
    InsufficientCapacity,
    LaunchSpec,
    LaunchTemplateRef,
    Throttled,
)
from shared.events import (
    BillingModel,
    NodePowerChanged,
    NodeProvisioned,
    NodeRetired,
    NodeRetiring,
    PowerState,
    RetireReason,
)
from shared.outbox import Mailbox, Transaction

log = logging.getLogger(__name__)

NODES = Gauge("hpcfleet_pool_nodes", "Nodes by state, as the last pass saw them", ["pool", "state"])
OUTDATED = Gauge("hpcfleet_pool_outdated_nodes", "Nodes not on the pool's current image", ["pool"])
PROBLEMS = Gauge(
    "hpcfleet_pool_problems", "What kept the last pass from doing more (count)", ["pool"]
)
ACTIONS = MetricCounter("hpcfleet_pool_actions_total", "Actions applied", ["pool", "action"])
PASS_SECONDS = Histogram("hpcfleet_pool_pass_seconds", "Duration of a pool's pass", ["pool"])

# EC2 codes that may mean the launch happened after all: the row stays launching and the next
# pass retries with the same client token (EC2 answers with the instance if there is one).
_MAYBE_LAUNCHED = frozenset(
    {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout"}
)


@dataclass
class PassReport:
    """What one pool's pass did and what stopped it doing more."""

    pool: str
    actions: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    clean: bool = True  # no call failed unexpectedly: acting again at once is worthwhile


@dataclass(frozen=True)
class Sighting:
    """EC2's view of a pool read without its lock, and the pool's rows as they were just before."""

    rows: dict[str, Node]
    instances: list[Instance]
    booted: set[str]


def _asks_ec2(result: Plan) -> bool:
    asks = Launch | Stop | Terminate | TerminateUntracked
    return any(isinstance(action, asks) for action in result.actions)


_OBSERVED = {state: NodeState(state.value) for state in InstanceState}  # no enum call per instance
# A new node's first boot, as autogrow hears of it for the cost: up, and down again (see `_boot`)
_BOOT_POWER = frozenset({PowerState.RUNNING, PowerState.STOPPING, PowerState.STOPPED})
# Row states in which a new node's instance may be running, so that its going ends a billed boot
_BOOTING = frozenset({NodeState.PENDING, NodeState.RUNNING, NodeState.STOPPING})


def observe(instance: Instance, booted: set[str]) -> ObservedInstance:
    return ObservedInstance(
        instance_id=instance.instance_id,
        state=_OBSERVED[instance.state],
        image_id=instance.image_id,
        instance_type=instance.instance_type,
        zone=instance.zone,
        launch_time=instance.launch_time,
        booted=instance.instance_id in booted,
        tags=instance.tags,
        client_token=instance.client_token,
        subnet_id=instance.subnet_id,
        state_since=instance.state_since,
    )


def launch_spec(record: NodeRecord, launch: dict[str, Any]) -> LaunchSpec:
    template = launch.get("launch_template")
    return LaunchSpec(
        image_id=record.image_id,
        instance_type=record.instance_type,
        subnet_id=record.subnet_id,
        zone=record.zone,
        tags=dict(launch["tags"]),
        launch_template=LaunchTemplateRef(template) if template else None,
    )


class Reconciler:
    """The reconcile loop's step for every pool; `kick` is the loop's, to run again at once."""

    def __init__(
        self,
        mailbox: Mailbox,
        ec2: Ec2 | None,
        settings: PoolSettings,
        locks: PoolLocks,
        *,
        unavailable: str = "",
    ) -> None:
        self.mailbox = mailbox
        self.ec2 = ec2
        self.settings = settings
        self.locks = locks
        self.unavailable = unavailable
        self.kick: Callable[[], None] = lambda: None
        self._followups = 0

    async def reconcile(self) -> None:
        """One pass over every pool; a pool that fails does not stop the others."""
        await self._seed_default_pool()
        async with self.mailbox.engine.connect() as conn:
            specs = await load_specs(conn)
        failed: list[str] = []
        again = False
        for spec in specs:
            try:
                early = await self.sight(spec.name)
                async with self.locks.hold(spec.name):
                    report = await self.reconcile_pool(spec.name, early)
            except PoolBusy:
                log.debug("pool %s is being acted on elsewhere; skipped", spec.name)
                continue
            except Exception as exc:
                log.exception("pass of pool %s failed", spec.name)
                failed.append(f"{spec.name}: {type(exc).__name__}: {exc}")
                continue
            again |= report.clean and sum(report.actions.values()) > 0
        if again and self._followups < self.settings.followups:
            self._followups += 1
            self.kick()
        elif not again:
            self._followups = 0
        if failed:
            raise RuntimeError("; ".join(failed))

    async def _seed_default_pool(self) -> None:
        spec = self.settings.default_pool
        if spec is None:
            return
        async with self.mailbox.transaction() as tx:
            known = await tx.conn.scalar(select(pools.c.name).where(pools.c.name == spec.name))
            if known is None:
                await tx.conn.execute(
                    insert(pools).values(
                        name=spec.name,
                        spec=spec.model_dump(mode="json"),
                        created_at=tx.now,
                        updated_at=tx.now,
                    )
                )

    async def sight(self, name: str) -> Sighting | None:
        """EC2's view of a pool, read without its lock; None if EC2 could not be asked (the pass
        then asks under the lock, and reports what went wrong)."""
        if self.ec2 is None:
            return None
        async with self.mailbox.engine.connect() as conn:
            rows = await load_nodes(conn, name)
        try:
            return Sighting(rows, *await self._look(name, rows))
        except CloudError:
            return None

    async def _look(self, name: str, rows: dict[str, Node]) -> tuple[list[Instance], set[str]]:
        assert self.ec2 is not None
        instances = await self.ec2.pool_instances(name)
        provisioned = {n.record.instance_id for n in rows.values() if n.record.provisioned}
        warming = [
            i.instance_id
            for i in instances
            if i.state is InstanceState.RUNNING and i.instance_id not in provisioned
        ]
        return instances, await self.ec2.booted(warming)

    async def reconcile_pool(self, name: str, early: Sighting | None = None) -> PassReport:
        """Observe, plan and act for one pool; the caller holds the pool's lock. `early` is a view
        read before the lock was taken, used if it still fits (see the module docstring)."""
        started = time.perf_counter()
        report = PassReport(name)
        async with self.mailbox.engine.connect() as conn:
            rows = await load_nodes(conn, name)
            spec_json = await conn.scalar(select(pools.c.spec).where(pools.c.name == name))
        if spec_json is None:
            return report
        spec = PoolSpec.model_validate(spec_json)
        if self.ec2 is None:
            report.problems.append(self.unavailable)
            await self._record(spec, rows, report)
            return report
        now = self.mailbox.clock.now()
        async with self.mailbox.engine.connect() as conn:
            held = await load_backoffs(conn, name, now)
        result = None
        if early is not None and early.rows == rows:
            observed = [observe(i, early.booted) for i in early.instances]
            result = plan(spec, [n.record for n in rows.values()], observed, now, backoffs=held)
            if _asks_ec2(result):
                result = None  # EC2 is asked only on a view read under the lock
        if result is None:
            try:
                instances, booted = await self._look(name, rows)
            except CloudError as error:
                report.problems.append(f"cannot observe the pool in EC2, nothing done: {error}")
                report.clean = False
                await self._record(spec, rows, report)
                raise
            now = self.mailbox.clock.now()
            observed = [observe(i, booted) for i in instances]
            result = plan(spec, [n.record for n in rows.values()], observed, now, backoffs=held)
        report.problems.extend(result.problems)
        await _Pass(self, spec, rows, held, report).apply(result)
        await self._record(spec, rows, report)
        PASS_SECONDS.labels(name).observe(time.perf_counter() - started)
        return report

    async def _record(self, spec: PoolSpec, rows: dict[str, Node], report: PassReport) -> None:
        async with self.mailbox.transaction() as tx:
            await tx.conn.execute(
                update(pools)
                .where(pools.c.name == spec.name)
                .values(
                    passed_at=tx.now,
                    problems=list(dict.fromkeys(report.problems)),
                    actions=dict(report.actions),
                )
            )
            await drop_expired_backoffs(tx.conn, tx.now)
        states = Counter(n.record.state.value for n in rows.values())
        for state in NodeState:
            NODES.labels(spec.name, state.value).set(states.get(state.value, 0))
        OUTDATED.labels(spec.name).set(
            sum(1 for n in rows.values() if n.record.image_id != spec.image_id)
        )
        PROBLEMS.labels(spec.name).set(len(set(report.problems)))
        for kind, count in report.actions.items():
            ACTIONS.labels(spec.name, kind).inc(count)


class _Pass:
    """Applies one plan for one pool (see the module docstring for the order)."""

    def __init__(
        self,
        owner: Reconciler,
        spec: PoolSpec,
        rows: dict[str, Node],
        held: dict[Placement, datetime],
        report: PassReport,
    ) -> None:
        assert owner.ec2 is not None
        self.mailbox = owner.mailbox
        self.ec2 = owner.ec2
        self.settings = owner.settings
        self.spec = spec
        self.rows = rows
        self.blocked = set(held)
        self.report = report
        self._billing: dict[str, BillingModel] = {}  # by image, as `apply` read it
        self._launched: dict[str, str] = {}  # node id -> scheduler name, of rows `_launch` wrote

    @cached_property
    def names(self) -> SchedulerNames:
        """Built only by a pass that names or forgets a node: most passes do neither."""
        return SchedulerNames(
            self.spec.node_name_prefix, (n.scheduler_node_name for n in self.rows.values())
        )

    def _count(self, action: Action) -> None:
        self.report.actions[type(action).__name__] += 1

    async def apply(self, result: Plan) -> None:
        kills: list[str] = []
        stops: list[Stop] = []
        launches: list[Launch] = []
        async with self.mailbox.transaction() as tx:
            billing = self._billing = await billing_by_image(tx.conn)
            changes: dict[str, dict[str, Any]] = {}
            for action in result.actions:
                match action:
                    case Launch():
                        launches.append(action)
                        continue
                    case Stop():
                        stops.append(action)
                        continue
                    case TerminateUntracked(instance_id=instance_id):
                        kills.append(instance_id)
                    case Terminate(instance_id=instance_id):
                        kills.append(instance_id)
                        self._terminate(tx, action, changes)
                    case _:
                        await self._book(tx, action, billing, changes)
                self._count(action)
            await self._flush(tx, changes)
        if kills:
            try:
                await self.ec2.terminate(kills)
            except CloudError as error:
                self._failed(f"terminating {len(kills)} instance(s) failed: {error}")
                return  # launching now could overshoot size + surge: the next pass retries both
        if stops:
            await self._stop(stops)
        if launches:
            await self._launch(launches)

    def _failed(self, problem: str) -> None:
        self.report.problems.append(problem)
        self.report.clean = False

    async def _flush(self, tx: Transaction, changes: dict[str, dict[str, Any]]) -> None:
        """Each row's changes merged, then grouped by the columns they touch: one executemany
        a group."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for node_id, change in changes.items():
            groups.setdefault(tuple(sorted(change)), []).append({"node_id": node_id, **change})
        for group in groups.values():
            await update_rows(tx.conn, group)

    # -- book-keeping (one transaction) -------------------------------------------------------

    async def _book(
        self,
        tx: Transaction,
        action: Action,
        billing: dict[str, BillingModel],
        changes: dict[str, dict[str, Any]],
    ) -> None:
        match action:
            case Bind(node_id=node_id, instance_id=instance_id, state=state, launched_at=at):
                changes.setdefault(node_id, {}).update(
                    instance_id=instance_id,
                    state=state.value,
                    since=tx.now,
                    launched_at=at,
                    last_error=None,
                )
                node = self.rows[node_id]
                if not node.record.provisioned and state is NodeState.RUNNING:
                    self._boot(tx, node.record, node.scheduler_node_name, PowerState.RUNNING, at)
            case RecordState(node_id=node_id, state=state, since=since):
                changes.setdefault(node_id, {}).update(state=state.value, since=since)
                node = self.rows[node_id]
                power = POWER.get(state)
                if not node.record.provisioned and power in _BOOT_POWER:
                    self._boot(tx, node.record, node.scheduler_node_name, power, since)
                elif node.record.provisioned and power is not None:
                    tx.emit(
                        NodePowerChanged(
                            occurred_at=tx.now,
                            node_id=node_id,
                            state=power,
                            since=since,
                            scheduler_node_name=node.scheduler_node_name,
                            billing=billing.get(node.record.image_id, BillingModel.PER_SECOND),
                        )
                    )
            case Adopt(node=record):
                await self._adopt(tx, record, billing)
            case Forget(node_id=node_id, retire=retire):
                node = self.rows[node_id]
                await tx.conn.execute(delete(nodes).where(nodes.c.node_id == node_id))
                self.names.release(node.scheduler_node_name)
                if node.record.provisioned and node.record.state not in GONE:
                    reason = retire or node.record.retiring or RetireReason.UNHEALTHY
                    self._retired(tx, node, reason)
                elif node.record.state in _BOOTING:  # its instance went during the first boot
                    self._boot(
                        tx, node.record, node.scheduler_node_name, PowerState.STOPPED, tx.now
                    )
            case MarkRetiring(node_id=node_id, instance_id=instance_id, retire=retire):
                node = self.rows[node_id]
                changes.setdefault(node_id, {})["retiring"] = retire.value
                tx.emit(
                    NodeRetiring(
                        occurred_at=tx.now,
                        node_id=node_id,
                        instance_id=instance_id,
                        reason=retire,
                        scheduler_node_name=node.scheduler_node_name,
                    )
                )
            case Provision(node_id=node_id, instance_id=instance_id):
                node = self.rows[node_id]
                changes.setdefault(node_id, {})["provisioned"] = True
                tx.emit(self._provisioned(tx.now, node.record, instance_id, node, billing))

    def _terminate(
        self, tx: Transaction, action: Terminate, changes: dict[str, dict[str, Any]]
    ) -> None:
        """Record a termination before EC2 is asked; announce it if autogrow knew the node."""
        node = self.rows[action.node_id]
        if node.record.state in GONE:
            return  # terminated before: this is the call again
        reason = action.retire or node.record.retiring
        if node.record.provisioned:
            self._retired(tx, node, reason or RetireReason.UNHEALTHY)
        elif node.record.state in _BOOTING:  # terminated during its first boot: the boot ends
            self._boot(tx, node.record, node.scheduler_node_name, PowerState.STOPPED, tx.now)
        changes.setdefault(action.node_id, {}).update(
            state=NodeState.SHUTTING_DOWN.value,
            since=tx.now,
            retiring=reason.value if reason else None,
        )

    def _retired(self, tx: Transaction, node: Node, reason: RetireReason) -> None:
        tx.emit(
            NodeRetired(
                occurred_at=tx.now,
                node_id=node.record.node_id,
                instance_id=node.record.instance_id,
                reason=reason,
                scheduler_node_name=node.scheduler_node_name,
            )
        )

    def _boot(
        self, tx: Transaction, record: NodeRecord, name: str, state: PowerState, since: datetime
    ) -> None:
        """A new node's first boot, before it is provisioned: EC2 bills it like any run, so
        autogrow hears of it (running when first seen up, stopped when it ends), marked
        `provisioning` so that it counts it for cost only, not as a node for jobs."""
        tx.emit(
            NodePowerChanged(
                occurred_at=tx.now,
                node_id=record.node_id,
                state=state,
                since=since,
                scheduler_node_name=name,
                billing=self._billing.get(record.image_id, BillingModel.PER_SECOND),
                provisioning=True,
            )
        )

    def _provisioned(
        self,
        now: datetime,
        record: NodeRecord,
        instance_id: str,
        node: Node | None,
        billing: dict[str, BillingModel],
    ) -> NodeProvisioned:
        return NodeProvisioned(
            occurred_at=now,
            node_id=record.node_id,
            instance_id=instance_id,
            image_id=record.image_id,
            instance_type=record.instance_type,
            zone=record.zone,
            scheduler_node_name=node.scheduler_node_name if node else self.names.take(),
            pool=self.spec.name,
            billing=billing.get(record.image_id, BillingModel.PER_SECOND),
        )

    async def _adopt(
        self, tx: Transaction, record: NodeRecord, billing: dict[str, BillingModel]
    ) -> None:
        """An untracked instance with the pool's tag becomes a provisioned node; autogrow hears
        of it as it is (running or stopped) and, if it is to be replaced, that too."""
        assert record.instance_id is not None
        announced = self._provisioned(tx.now, record, record.instance_id, None, billing)
        await tx.conn.execute(
            insert(nodes).values(
                **record_values(record),
                pool=self.spec.name,
                scheduler_node_name=announced.scheduler_node_name,
                launch=None,
            )
        )
        tx.emit(announced)
        self.rows[record.node_id] = Node(record, announced.scheduler_node_name)
        power = POWER.get(record.state)
        if power is not None and record.state is not NodeState.STOPPED:
            tx.emit(
                NodePowerChanged(
                    occurred_at=tx.now,
                    node_id=record.node_id,
                    state=power,
                    since=record.since,
                    scheduler_node_name=announced.scheduler_node_name,
                    billing=announced.billing,
                )
            )
        if record.retiring is not None:
            tx.emit(
                NodeRetiring(
                    occurred_at=tx.now,
                    node_id=record.node_id,
                    instance_id=record.instance_id,
                    reason=record.retiring,
                    scheduler_node_name=announced.scheduler_node_name,
                )
            )

    # -- EC2 ----------------------------------------------------------------------------------

    async def _stop(self, stops: Sequence[Stop]) -> None:
        try:
            await self.ec2.stop([s.instance_id for s in stops])
        except CloudError as error:
            self._failed(f"stopping {len(stops)} new node(s) failed: {error}")
            return
        async with self.mailbox.transaction() as tx:
            await update_rows(
                tx.conn,
                [
                    {"node_id": s.node_id, "state": NodeState.STOPPING.value, "since": tx.now}
                    for s in stops
                ],
            )
        for stop in stops:
            self._count(stop)

    async def _launch(self, launches: Sequence[Launch]) -> None:
        """Intents first (committed), then RunInstances, then the outcomes."""
        params: dict[str, dict[str, Any]] = {}
        retries = {a.node.node_id for a in launches if a.node.node_id in self.rows}
        async with self.mailbox.transaction() as tx:
            retried = await load_launches(tx.conn, retries) if retries else {}
            new = []
            for action in launches:
                launch = {"tags": dict(action.tags), "launch_template": self.spec.launch_template}
                if action.node.node_id in retries:  # exactly the first call's parameters
                    params[action.node.node_id] = retried.get(action.node.node_id, launch)
                    continue
                params[action.node.node_id] = launch
                name = self._launched[action.node.node_id] = self.names.take()
                new.append(
                    {
                        **record_values(action.node),
                        "pool": self.spec.name,
                        "scheduler_node_name": name,
                        "launch": launch,
                    }
                )
            if new:
                await tx.conn.execute(insert(nodes), new)
        gate = asyncio.Semaphore(self.settings.launch_concurrency)

        async def one(action: Launch) -> tuple[Launch, Instance | BaseException | None]:
            where = Placement(action.node.instance_type, action.node.zone)
            async with gate:
                if where in self.blocked and action.node.node_id not in retries:
                    return action, None  # ran out of capacity in this pass: not tried
                try:
                    return action, await self.ec2.launch(
                        launch_spec(action.node, params[action.node.node_id]),
                        action.node.client_token,
                    )
                except InsufficientCapacity as error:
                    self.blocked.add(where)
                    return action, error
                except CloudError as error:
                    return action, error

        outcomes = await asyncio.gather(*(one(a) for a in launches))
        await self._record_launches(outcomes)

    async def _record_launches(
        self, outcomes: Sequence[tuple[Launch, Instance | BaseException | None]]
    ) -> None:
        async with self.mailbox.transaction() as tx:
            done: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            backoff = timedelta(seconds=self.settings.capacity_backoff_seconds)
            for action, outcome in outcomes:
                node_id = action.node.node_id
                where = Placement(action.node.instance_type, action.node.zone)
                if isinstance(outcome, Instance):
                    self._count(action)
                    if outcome.state is InstanceState.RUNNING:  # first seen up: the boot is billed
                        since = outcome.state_since or outcome.launch_time
                        name = self._launched.get(node_id) or self.rows[node_id].scheduler_node_name
                        self._boot(tx, action.node, name, PowerState.RUNNING, since)
                    done.append(
                        {
                            "node_id": node_id,
                            "instance_id": outcome.instance_id,
                            "state": NodeState(outcome.state.value).value,
                            "since": tx.now,
                            "launched_at": outcome.launch_time,
                            "last_error": None,
                        }
                    )
                    continue
                if outcome is None:
                    why = f"not tried: {where.instance_type} in {where.zone} ran out of capacity"
                elif isinstance(outcome, InsufficientCapacity):
                    why = str(outcome)
                    await back_off(tx.conn, self.spec.name, where, tx.now + backoff, why)
                    self.report.problems.append(
                        f"insufficient capacity for {where.instance_type} in {where.zone}: "
                        f"backed off for {backoff}"
                    )
                elif isinstance(outcome, Throttled) or (
                    isinstance(outcome, CloudError) and outcome.code in _MAYBE_LAUNCHED
                ):
                    self._failed(f"launch of {node_id} left for the next pass: {outcome}")
                    continue  # still launching: the retry carries the same client token
                else:
                    why = str(outcome)
                    self.report.problems.append(f"launch of {node_id} refused: {why}")
                failed.append(
                    {
                        "node_id": node_id,
                        "state": NodeState.FAILED.value,
                        "since": tx.now,
                        "last_error": why,
                    }
                )
            await update_rows(tx.conn, done)
            await update_rows(tx.conn, failed)
