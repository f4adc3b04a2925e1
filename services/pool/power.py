"""`PowerOn` / `PowerOff` from autogrow: start or stop exactly the named nodes, or say why not.

Each pool's nodes are handled under the pool's lock (the reconcile pass's), against EC2's current
view of them. What is done:

* PowerOn of a stopped node starts it; of one already starting or running, reports its state.
  Refused: a node that is not (or no longer) a provisioned pool node, one still stopping, and an
  old node (retiring, outdated or expired) while fresh nodes of its pool are stopped.
* PowerOff of a running node stops it; of one already stopping or stopped, reports its state.
  Refused: a node with jobs in the latest scheduler snapshot (autogrow drains before it powers
  off), and one still starting. An old node is terminated instead, and so replaced, when the
  pool's availability budget allows; otherwise it is stopped and the reconcile pass terminates it
  as soon as the budget does.

Starts and stops are recorded after EC2 accepts them (a lost record shows up as a state change in
the next pass); a termination too, since a row marked terminated over a running instance would be
left alone by the planner. A redelivered command finds the nodes already moving and only reports.
`NodePowerChanged.since` is when the instance entered the state; for `running` the pass reports it
once EC2 says so, with EC2's time: billing starts there.

A job waits on PowerOn, so its common case asks EC2 one thing: a node whose row says stopped is
started without describing it first. The row is only ever behind EC2 by a state change the next
pass records, and EC2 checks the state itself: starting a running or pending instance does
nothing, and an instance that cannot start (stopping, gone) is refused with an error, after which
that node is described and decided on as it really is. Every other case, and every PowerOff (which
may terminate), describes first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select

from services.pool.ec2 import Ec2
from services.pool.locks import PoolLocks
from services.pool.plan import NodeState
from services.pool.records import (
    GONE,
    POWER,
    Node,
    billing_by_image,
    busy_names,
    load_nodes,
    load_nodes_by_id,
    load_spec,
    update_rows,
)
from services.pool.spec import PoolSpec
from services.pool.tables import MAILBOX
from shared.cloud import CloudError, Throttled
from shared.events import (
    BillingModel,
    Event,
    NodePowerChanged,
    NodeRetired,
    PowerOff,
    PowerOn,
    PowerRefused,
    PowerState,
    RetireReason,
)
from shared.outbox import Mailbox

Verb = Literal["start", "stop", "terminate"]


@dataclass(frozen=True)
class _Decision:
    node: Node
    verb: Verb | None  # None: nothing to do, report `state`
    state: NodeState | None = None
    since: datetime | None = None
    refusal: str | None = None
    reason: RetireReason | None = None


def old_reason(spec: PoolSpec, node: Node, now: datetime) -> RetireReason | None:
    """Why a node is to be replaced (as the planner judges it), or None if it is fresh."""
    record = node.record
    if record.retiring is not None:
        return record.retiring
    if record.image_id != spec.image_id:
        return RetireReason.OUTDATED
    born = record.launched_at or record.since
    if spec.max_node_age is not None and born <= now - spec.max_node_age:
        return RetireReason.EXPIRED
    return None


class PowerDesk:
    """Handles the power commands; `kick` runs the reconcile pass after one left it work.

    A PowerOn that only started nodes (or found them starting or running) leaves the pass nothing
    to do until EC2 says running, tens of seconds later on EC2: its periodic pass reports that,
    with EC2's time. Kicking it at once would only describe the whole pool again (and once more
    for the follow-up), whose answer this process parses for longer than a start takes (some
    100 ms for 50 instances), while the next PowerOn waits. Every other command kicks it: a
    stop, a termination (its replacement), a refusal (a node gone, say)."""

    def __init__(
        self,
        mailbox: Mailbox,
        ec2: Ec2 | None,
        locks: PoolLocks,
        consumer: str,
        *,
        lock_wait: float,
        unavailable: str = "",
    ) -> None:
        self.mailbox = mailbox
        self.ec2 = ec2
        self.locks = locks
        self.consumer = consumer
        self.lock_wait = lock_wait
        self.unavailable = unavailable
        self.kick: Callable[[], None] = lambda: None

    async def handle(self, message: PowerOn | PowerOff) -> None:
        inbox = MAILBOX.inbox
        async with self.mailbox.engine.connect() as conn:
            seen = await conn.scalar(
                select(inbox.c.message_id).where(
                    inbox.c.consumer == self.consumer,
                    inbox.c.message_id == str(message.message_id),
                )
            )
            if seen is not None:
                return
            rows = await load_nodes_by_id(conn, message.node_ids)
        by_pool: dict[str, list[str]] = defaultdict(list)
        for node_id in dict.fromkeys(message.node_ids):
            if node_id in rows:
                by_pool[rows[node_id].pool].append(node_id)
        unknown = {n: "unknown node: not in any pool" for n in message.node_ids if n not in rows}
        started_only = True
        for pool in sorted(by_pool):
            async with self.locks.hold(pool, wait=self.lock_wait):
                forgotten, decisions = await self._pool(pool, message, by_pool[pool])
            for node_id in forgotten:
                unknown[node_id] = "no longer in the pool: its instance is gone"
            started_only &= all(d.refusal is None and d.verb in (None, "start") for d in decisions)
        async with self.mailbox.handle_once(self.consumer, message) as tx:
            if tx is None:
                return
            for node_id, why in unknown.items():
                tx.emit(_refused(message, node_id, None, why, tx.now))
        if not (isinstance(message, PowerOn) and started_only and not unknown):
            self.kick()

    async def _pool(
        self, pool: str, message: PowerOn | PowerOff, node_ids: list[str]
    ) -> tuple[list[str], list[_Decision]]:
        """Act on the nodes of one pool; returns those forgotten since the command arrived, and
        what was decided for the others."""
        now = self.mailbox.clock.now()
        async with self.mailbox.engine.connect() as conn:
            spec = await load_spec(conn, pool)
            rows = await load_nodes(conn, pool)
            taken_at, busy = await busy_names(conn)
        assert spec is not None  # a pool is never deleted while it has nodes
        targets = [rows[n] for n in node_ids if n in rows]
        if self.ec2 is None:
            decisions = [_Decision(n, None, refusal=self.unavailable) for n in targets]
        else:
            trusted = {n.record.node_id for n in targets if _startable(message, n)}
            ask = [n for n in targets if n.record.node_id not in trusted]
            seen = _as_recorded(rows[n] for n in trusted) | await self._observe(ask)
            decisions = _decide(message, spec, rows, targets, seen, busy, taken_at, now)
            decisions = await self._act(decisions)
            doubted = [
                d.node
                for d in decisions
                if d.refusal is not None and d.node.record.node_id in trusted
            ]
            if doubted:  # refused what the rows said was stopped: look, and decide again
                for node in doubted:
                    del seen[_instance_of(node)]  # absent from EC2's answer: gone
                seen |= await self._observe(doubted)
                again = {n.record.node_id for n in doubted}
                redo = _decide(message, spec, rows, targets, seen, busy, taken_at, now)
                redo = [d for d in redo if d.node.record.node_id in again]
                redone = {d.node.record.node_id: d for d in await self._act(redo)}
                decisions = [redone.get(d.node.record.node_id, d) for d in decisions]
        await self._record(message, decisions)
        return [n for n in node_ids if n not in rows], decisions

    async def _observe(self, targets: Sequence[Node]) -> dict[str, Observed]:
        assert self.ec2 is not None
        live = [n.record.instance_id for n in targets if n.record.state not in GONE]
        if not live:
            return {}
        seen = await self.ec2.instances([i for i in live if i is not None])
        return {i: (NodeState(s.state.value), s.state_since) for i, s in seen.items()}

    async def _act(self, decisions: list[_Decision]) -> list[_Decision]:
        """Ask EC2; a batch it refuses is asked node by node, and who still fails is refused."""
        assert self.ec2 is not None
        calls = {"start": self.ec2.start, "stop": self.ec2.stop, "terminate": self.ec2.terminate}
        failed: dict[str, str] = {}
        for verb, call in calls.items():
            ids = [_instance(d) for d in decisions if d.verb == verb]
            if not ids:
                continue
            try:
                await call(ids)
            except Throttled:
                raise  # redelivered later: what was done by then is only reported
            except CloudError:
                for instance_id in ids:
                    try:
                        await call([instance_id])
                    except CloudError as error:
                        failed[instance_id] = f"EC2 refused to {verb} it: {error}"
        return [
            _Decision(d.node, None, refusal=failed[_instance(d)])
            if d.verb is not None and _instance(d) in failed
            else d
            for d in decisions
        ]

    async def _record(self, message: PowerOn | PowerOff, decisions: Sequence[_Decision]) -> None:
        async with self.mailbox.transaction() as tx:
            billing = await billing_by_image(tx.conn)
            changes = []
            for d in decisions:
                node = d.node
                name = node.scheduler_node_name
                bill = billing.get(node.record.image_id, BillingModel.PER_SECOND)
                if d.refusal is not None:
                    tx.emit(_refused(message, node.record.node_id, name, d.refusal, tx.now))
                    continue
                if d.verb in ("stop", "terminate") and _unannounced_run(node, d):
                    # started, and stopped before any pass saw it running: EC2 billed that run
                    assert d.since is not None
                    tx.emit(_power(message, node, PowerState.RUNNING, d.since, bill, tx.now))
                if d.verb == "terminate":
                    changes.append(
                        {
                            "node_id": node.record.node_id,
                            "state": NodeState.SHUTTING_DOWN.value,
                            "since": tx.now,
                            "retiring": (d.reason or RetireReason.OUTDATED).value,
                        }
                    )
                    tx.emit(
                        NodeRetired(
                            occurred_at=tx.now,
                            correlation_id=message.correlation_id,
                            node_id=node.record.node_id,
                            instance_id=node.record.instance_id,
                            reason=d.reason or RetireReason.OUTDATED,
                            scheduler_node_name=name,
                        )
                    )
                    continue
                if d.verb is None:
                    state, since = d.state, d.since or tx.now
                else:
                    state = NodeState.PENDING if d.verb == "start" else NodeState.STOPPING
                    since = tx.now
                    changes.append(
                        {"node_id": node.record.node_id, "state": state.value, "since": since}
                    )
                assert state is not None
                tx.emit(_power(message, node, POWER[state], since, bill, tx.now))
            await update_rows(tx.conn, changes)


Observed = tuple[NodeState, datetime | None]
"""An instance's state and since when, as EC2 said or as its row says."""


def _unannounced_run(node: Node, decision: _Decision) -> bool:
    """Whether EC2 shows the node running while its row never said so (a PowerOn recorded it
    starting, and no pass has seen it running since): the run must be announced before the stop
    that ends it, or its billing is never opened."""
    return (
        decision.state is NodeState.RUNNING
        and decision.since is not None
        and node.record.state is not NodeState.RUNNING
    )


def _startable(message: PowerOn | PowerOff, node: Node) -> bool:
    """Whether the row alone may decide: a PowerOn of a provisioned node recorded as stopped."""
    record = node.record
    return (
        isinstance(message, PowerOn)
        and record.provisioned
        and record.state is NodeState.STOPPED
        and record.instance_id is not None
    )


def _as_recorded(nodes: Iterable[Node]) -> dict[str, Observed]:
    return {
        n.record.instance_id: (n.record.state, n.record.since)
        for n in nodes
        if n.record.instance_id is not None
    }


def _instance(decision: _Decision) -> str:
    return _instance_of(decision.node)


def _instance_of(node: Node) -> str:
    instance_id = node.record.instance_id
    assert instance_id is not None
    return instance_id


def _decide(
    message: PowerOn | PowerOff,
    spec: PoolSpec,
    rows: dict[str, Node],
    targets: list[Node],
    seen: dict[str, Observed],
    busy: frozenset[str],
    taken_at: datetime | None,
    now: datetime,
) -> list[_Decision]:
    asked = {n.record.node_id for n in targets}
    fresh_stopped = sum(
        1
        for n in rows.values()
        if n.record.provisioned
        and n.record.state is NodeState.STOPPED
        and n.record.node_id not in asked
        and old_reason(spec, n, now) is None
    )
    available = sum(1 for n in rows.values() if n.record.provisioned and n.record.state in POWER)
    floor = spec.size - spec.max_unavailable
    decisions = []
    for node in targets:
        record = node.record
        state, since = seen.get(record.instance_id or "", (None, None))
        since = since or record.since
        old = old_reason(spec, node, now)
        if not record.provisioned:
            decisions.append(_Decision(node, None, refusal="not provisioned yet"))
        elif state is None or state in GONE or record.state in GONE:
            why = "its instance is gone or being terminated; the pool replaces it"
            decisions.append(_Decision(node, None, refusal=why))
        elif isinstance(message, PowerOn):
            if state in (NodeState.PENDING, NodeState.RUNNING):
                decisions.append(_Decision(node, None, state, since))
            elif state is NodeState.STOPPING:
                why = "still stopping; ask again once it is stopped"
                decisions.append(_Decision(node, None, refusal=why))
            elif old is not None and fresh_stopped:
                why = (
                    f"{old.value}, to be replaced, while {fresh_stopped} fresh node(s) of pool "
                    f"{spec.name} are stopped: power one of those on instead"
                )
                decisions.append(_Decision(node, None, refusal=why))
            else:
                decisions.append(_Decision(node, "start"))
        elif state in (NodeState.STOPPING, NodeState.STOPPED):
            decisions.append(_Decision(node, None, state, since))
        elif state is NodeState.PENDING:
            why = "still starting; ask again once it is running"
            decisions.append(_Decision(node, None, refusal=why))
        elif node.scheduler_node_name in busy:
            why = (
                f"{node.scheduler_node_name} has jobs in the scheduler snapshot of {taken_at}: "
                "drain it first"
            )
            decisions.append(_Decision(node, None, refusal=why))
        elif old is not None and available - 1 >= floor:
            available -= 1
            decisions.append(_Decision(node, "terminate", state, since, reason=old))
        else:
            decisions.append(_Decision(node, "stop", state, since))  # as EC2 says: running
    return decisions


def _power(
    message: PowerOn | PowerOff,
    node: Node,
    state: PowerState,
    since: datetime,
    billing: BillingModel,
    now: datetime,
) -> Event:
    return NodePowerChanged(
        occurred_at=now,
        correlation_id=message.correlation_id,
        node_id=node.record.node_id,
        state=state,
        since=since,
        scheduler_node_name=node.scheduler_node_name,
        billing=billing,
    )


def _refused(
    message: PowerOn | PowerOff, node_id: str, name: str | None, why: str, now: datetime
) -> Event:
    return PowerRefused(
        occurred_at=now,
        correlation_id=message.correlation_id,
        node_id=node_id,
        command="PowerOn" if isinstance(message, PowerOn) else "PowerOff",
        reason=why,
        decision_id=message.decision_id,
        scheduler_node_name=name,
    )
