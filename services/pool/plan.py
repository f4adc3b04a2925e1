"""The pool's planner: from the spec, the node table and what EC2 shows, the next actions.

`plan(spec, nodes, observed, now)` is pure (no awaits, no I/O, the clock passed in) so the reconcile
loop, the unit tests and the trace simulator run the same decisions. It keeps nothing between
calls: everything it needs is in the node rows, the instances EC2 shows with the pool's tag and the
capacity back-offs, so a lost or repeated tick delays the pool but never corrupts it. The service
applies the actions in the order given (bookkeeping, retire marks, terminations, warming,
launches: what frees capacity goes before what takes it).

Terms. A node is *provisioned* once it reached the warm state (stopped) and was announced with
`NodeProvisioned`; from then on autogrow owns its power, and the plan never starts or stops it and
terminates it only while it is stopped. A node is *old*, with a `RetireReason`, when it is marked
retiring, runs another image than the spec's, or is older than `max_node_age`; otherwise it is
*fresh*. *Live* nodes are all the pool holds or is launching; *available* ones are the provisioned
live ones (what the scheduler can use). Budgets: `max_surge` and `max_unavailable` are the spec's
percentages of `size` rounded up.

Rules, in the order they are applied:

1. Refuse: a spec with problems (no image yet, 0 % surge and 0 % unavailable) plans nothing and
   says why in `Plan.problems`.
2. Match each row to its instance by instance id; a row still launching (no instance id) by the
   instance's ClientToken or node tag, so a worker killed between RunInstances and its commit finds
   its instance again (`Bind`) instead of launching another. A state EC2 reports differently from
   the row is recorded (`RecordState`), except over a row the pool already terminated.
3. Launch intents: a row still launching with no instance is retried with the same client token
   and parameters (`Launch`, never a new token: the call may have succeeded). A row whose launch
   EC2 refused (`failed`) is forgotten at once when its type/zone is backed off for capacity (so
   the next launch falls back), else after `FAILED_LAUNCH_HOLD` (so a bad image or quota costs one
   call per slot every 10 minutes, not one per tick).
4. Gone: an instance shutting down or terminated outside the pool, or missing from EC2 for longer
   than `VISIBILITY_GRACE` after launch (EC2's describe calls are eventually consistent), is
   forgotten, announced `unhealthy` if it was provisioned; the missing node is then launched again
   by rule 10. A row the pool terminated is forgotten once EC2 shows it gone, terminated again
   while EC2 still shows it stopped or stopping, and reported (never touched) if it runs.
5. New nodes: a node not yet provisioned that is old (the image moved on while it booted) or not
   booted `boot_timeout` after launch is terminated; nobody can be using it.
6. Untracked instances with the pool's tag (garbage collection): a duplicate of a node that has its
   instance (same client token or node tag) is terminated, whatever its state: it was never handed
   out. Pending or stopping ones are left until they settle. A fresh one is adopted as provisioned
   while the pool is short of fresh nodes (it exists already, so the surge does not limit it: it
   only takes the place of a launch). Otherwise a stopped one is terminated, and a running one is
   adopted already retiring: it may be running jobs.
7. Shrink, new nodes first: fresh nodes beyond `size` are removed starting with the ones not yet
   provisioned (newest first: none is available yet, so availability does not dip).
8. Warm: a new node that finished its first boot is stopped; one that is stopped is provisioned.
   So the first boot is a provisioning boot, and the image must not let the node take jobs then
   (the bundled recipes start slurmd from the second boot on), or the stop would kill them.
9. Roll: old stopped nodes are terminated (unhealthy, then shrink, then outdated, then expired;
   oldest first) while the available nodes stay above `size - max_unavailable`; a fresh replacement
   that became available is what lets the next one go (create-before-destroy). Every other old
   node is marked retiring once (`MarkRetiring`, announced with `NodeRetired`) and waits: a running
   node is never interrupted. Then shrink provisioned fresh nodes while more than `size` remain:
   stopped ones are terminated (oldest first), running ones are marked retiring (`shrink`).
10. Launch `min(size - fresh, size + max_surge - live)` new nodes: this fills a short pool and, when
    nodes are old, launches their replacements ahead within the surge. Each new node gets a
    deterministic id (`<pool>-<hash of the plan time>-<n>`, skipping ids in use) and a ClientToken
    derived from it. Types are tried in preference order; within a type, the zone with the fewest
    live nodes among those not backed off for capacity, in its first listed subnet (subnets of one
    zone share its capacity). When every type/zone is backed off the pool keeps what it has and
    says so in `Plan.problems`.

Choices the issue leaves open: replacements for old *running* nodes may be launched ahead within
the surge, so a fresh node is warm when the old one powers off (then the old one goes at once).
Marks are sticky: raising the size again does not unmark a node retired for shrink (autogrow was
told), it is replaced when it stops. A change of instance types or subnets applies to new launches
only; it does not make existing nodes old. Age counts from the pool's recorded launch time, not
EC2's LaunchTime, which restarts at every start (adopted instances only have the latter). The plan
never judges a provisioned node's health itself: the service marks a row `retiring=unhealthy`
(failed status checks, the scheduler's verdict) and the node is then replaced like an old one.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple, TypeAlias

from services.pool.spec import NODE_TAG, POOL_TAG, PoolSpec, Subnet
from shared.events import RetireReason

VISIBILITY_GRACE = timedelta(minutes=2)
"""How long after launch a missing instance is taken for EC2's eventual consistency, not a loss."""

FAILED_LAUNCH_HOLD = timedelta(minutes=10)
"""How long a refused launch keeps its slot before the pool tries again (not for capacity)."""


class NodeState(StrEnum):
    """A node's state: EC2's instance states plus two for a launch intent with no instance."""

    LAUNCHING = "launching"  # row written, RunInstances not (yet) confirmed
    FAILED = "failed"  # RunInstances refused: no instance was made
    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SHUTTING_DOWN = "shutting-down"
    TERMINATED = "terminated"


_UNLAUNCHED = frozenset({NodeState.LAUNCHING, NodeState.FAILED})
_GONE = frozenset({NodeState.SHUTTING_DOWN, NodeState.TERMINATED})
_SETTLING = frozenset({NodeState.PENDING, NodeState.STOPPING})
_BOOTING = frozenset({NodeState.PENDING, NodeState.RUNNING})
# Enum member lookups through the class are slow on Python 3.11 (gh-93910): hot paths use these.
_LAUNCHING = NodeState.LAUNCHING
_RUNNING = NodeState.RUNNING
_OUTDATED = RetireReason.OUTDATED
_EXPIRED = RetireReason.EXPIRED


# Which old stopped node goes first: a broken one, then an unwanted one, then by staleness.
_RETIRE_FIRST = {
    RetireReason.UNHEALTHY: 0,
    RetireReason.SHRINK: 1,
    RetireReason.OUTDATED: 2,
    RetireReason.EXPIRED: 3,
}


class Placement(NamedTuple):
    """Where a launch can fail for capacity: EC2 runs out of a type one zone at a time."""

    instance_type: str
    zone: str


NO_BACKOFFS: Mapping[Placement, datetime] = MappingProxyType({})


def client_token(node_id: str) -> str:
    """The RunInstances ClientToken for a node: the same for every retry of one launch intent, so
    EC2 answers a retry with the instance it already made instead of making a second one."""
    return f"hpcfleet-{node_id}"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One row of the pool's node table: the pool's own memory of a node."""

    node_id: str
    client_token: str
    image_id: str
    instance_type: str
    subnet_id: str | None  # None only for an adopted instance whose subnet EC2 did not say
    zone: str
    state: NodeState
    since: datetime  # when the row entered `state`
    instance_id: str | None = None  # None exactly while launching or failed
    launched_at: datetime | None = None  # first launch; age counts from here
    provisioned: bool = False  # reached the warm state once and was announced
    retiring: RetireReason | None = None  # marked (and announced) to be replaced when stopped
    last_error: str | None = None

    def __post_init__(self) -> None:
        if (self.instance_id is None) != (self.state in _UNLAUNCHED):
            raise ValueError(f"{self.node_id}: state {self.state} with instance {self.instance_id}")


@dataclass(frozen=True, slots=True)
class ObservedInstance:
    """An instance as DescribeInstances shows it (with DescribeInstanceStatus for `booted`)."""

    instance_id: str
    state: NodeState
    image_id: str
    instance_type: str
    zone: str
    launch_time: datetime  # EC2's LaunchTime: restarts at every start
    booted: bool  # finished booting since this start (status checks passed); no default on purpose
    tags: Mapping[str, str] = field(default_factory=dict)
    client_token: str | None = None  # DescribeInstances' ClientToken
    subnet_id: str | None = None
    state_since: datetime | None = None  # when EC2 says it entered `state`, if it says

    def __post_init__(self) -> None:
        if self.state in _UNLAUNCHED:
            raise ValueError(f"{self.instance_id}: {self.state} is not an EC2 instance state")


@dataclass(frozen=True, slots=True)
class Launch:
    """Write `node` (a launching row) unless it exists, then RunInstances with its client token."""

    node: NodeRecord
    tags: tuple[tuple[str, str], ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Bind:
    """Record the instance a launching row turned out to have (found by client token or tag)."""

    node_id: str
    instance_id: str
    state: NodeState
    launched_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class RecordState:
    """Record the state EC2 shows; for a provisioned node this is a `NodePowerChanged`."""

    node_id: str
    state: NodeState
    since: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Adopt:
    """Insert `node` for an untracked instance with the pool's tag and announce it provisioned."""

    node: NodeRecord
    reason: str


@dataclass(frozen=True, slots=True)
class Forget:
    """Delete a row whose instance is gone or was never made; announce `retire` if it is set."""

    node_id: str
    retire: RetireReason | None
    reason: str


@dataclass(frozen=True, slots=True)
class MarkRetiring:
    """Mark a node to be replaced once stopped and announce it (`NodeRetired`) to autogrow."""

    node_id: str
    instance_id: str
    retire: RetireReason
    reason: str


@dataclass(frozen=True, slots=True)
class Terminate:
    """Terminate a node's instance; announce `retire` if set (None: unannounced or already)."""

    node_id: str
    instance_id: str
    retire: RetireReason | None
    reason: str


@dataclass(frozen=True, slots=True)
class TerminateUntracked:
    """Terminate an instance with the pool's tag that no row accounts for."""

    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop a new node that finished its first boot: the way into the warm state."""

    node_id: str
    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Provision:
    """Record a new node as provisioned and announce it (`NodeProvisioned`)."""

    node_id: str
    instance_id: str
    reason: str


Action: TypeAlias = (
    Launch
    | Bind
    | RecordState
    | Adopt
    | Forget
    | MarkRetiring
    | Terminate
    | TerminateUntracked
    | Stop
    | Provision
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do now, in order, and what stops the pool from doing more."""

    actions: tuple[Action, ...]
    problems: tuple[str, ...] = ()


def plan(
    spec: PoolSpec,
    nodes: Sequence[NodeRecord],
    observed: Sequence[ObservedInstance],
    now: datetime,
    *,
    backoffs: Mapping[Placement, datetime] = NO_BACKOFFS,
) -> Plan:
    """Plan one reconcile tick. `observed` must be every instance carrying the pool's tag (a
    partial listing would read as vanished nodes); `backoffs` maps a type/zone that returned
    InsufficientCapacity to the time it may be tried again."""
    problems = spec.problems()
    if problems or spec.image_id is None:  # no image is one of the problems; this narrows the type
        return Plan(actions=(), problems=problems)
    return _Planner(spec, spec.image_id, now, backoffs).run(nodes, observed)


_Warming: TypeAlias = tuple[NodeRecord, NodeState, str, ObservedInstance | None]


def _born(node: NodeRecord) -> datetime:
    return node.launched_at or node.since


def _oldest_first(item: tuple[NodeRecord, str]) -> tuple[datetime, str]:
    return _born(item[0]), item[0].node_id


class _Planner:
    """One pass: classifies every node once, then applies the pool-wide rules in order."""

    def __init__(
        self,
        spec: PoolSpec,
        image_id: str,
        now: datetime,
        backoffs: Mapping[Placement, datetime],
    ) -> None:
        self.spec = spec
        self.image_id = image_id
        self.now = now
        self.warm = NodeState(spec.warm_state)
        self.expired_before = None if spec.max_node_age is None else now - spec.max_node_age
        self.blocked = {where for where, until in backoffs.items() if until > now}
        self.pool_tags = (*sorted(spec.tags.items()), (POOL_TAG, spec.name))
        self.whys: dict[tuple[RetireReason, str], str] = {}
        # a zone's first subnet; per instance type in preference order, the zones not backed off
        self.subnet_in: dict[str, Subnet] = {}
        for subnet in spec.subnets:
            self.subnet_in.setdefault(subnet.zone, subnet)
        self.choices = [
            (kind, [z for z in self.subnet_in if Placement(kind, z) not in self.blocked])
            for kind in spec.instance_types
        ]
        # actions, by the group they are applied in
        self.books: list[Action] = []
        self.marks: list[Action] = []
        self.kills: list[Action] = []
        self.warms: list[Action] = []
        self.launches: list[Action] = []
        self.problems: list[str] = []
        # the pool as the rules see it, updated as they decide
        self.live = 0
        self.fresh = 0
        self.zones: Counter[str] = Counter(dict.fromkeys(self.subnet_in, 0))
        self.warming: list[_Warming] = []
        self.fresh_stopped: list[tuple[NodeRecord, str]] = []
        self.fresh_powered: list[tuple[NodeRecord, str]] = []
        self.old: list[tuple[RetireReason, NodeRecord, NodeState, str]] = []
        self.adopted: list[str] = []

    def run(self, nodes: Sequence[NodeRecord], observed: Sequence[ObservedInstance]) -> Plan:
        by_id = {obs.instance_id: obs for obs in observed}
        claimed: set[str] = set()
        unbound: list[NodeRecord] = []
        for node in nodes:
            if node.instance_id is None:
                unbound.append(node)
                continue
            obs = by_id.get(node.instance_id)
            if obs is not None:
                claimed.add(obs.instance_id)
            self._track(node, node.instance_id, obs)
        if unbound:
            self._bind(unbound, observed, claimed)
        untracked = [o for o in observed if o.instance_id not in claimed and o.state not in _GONE]
        if untracked:
            self._collect(untracked, nodes)
        self._shrink_new()
        self._warm_up()
        self._roll()
        self._launch(nodes)
        actions = (*self.books, *self.marks, *self.kills, *self.warms, *self.launches)
        return Plan(actions=actions, problems=tuple(self.problems))

    # -- per node ---------------------------------------------------------------------------

    def _bind(
        self,
        unbound: list[NodeRecord],
        observed: Sequence[ObservedInstance],
        claimed: set[str],
    ) -> None:
        """Rules 2 and 3 for rows without an instance id: find their instance or retry."""
        free = [obs for obs in observed if obs.instance_id not in claimed]
        by_token = {obs.client_token: obs for obs in free if obs.client_token}
        by_tag = {obs.tags[NODE_TAG]: obs for obs in free if NODE_TAG in obs.tags}
        for node in unbound:
            obs = by_token.get(node.client_token) or by_tag.get(node.node_id)
            if obs is None or obs.instance_id in claimed:
                self._unlaunched(node)
                continue
            claimed.add(obs.instance_id)
            if obs.state in _GONE:
                why = f"its instance {obs.instance_id} was {obs.state} before it was recorded"
                self.books.append(Forget(node.node_id, None, why))
                continue
            why = "RunInstances succeeded but was not recorded; found by client token or tag"
            self.books.append(Bind(node.node_id, obs.instance_id, obs.state, obs.launch_time, why))
            self._live(node, obs.state, obs.instance_id, obs, obs.launch_time)

    def _unlaunched(self, node: NodeRecord) -> None:
        if node.state is _LAUNCHING:
            why = "retry: RunInstances was never confirmed; same client token, same parameters"
            self.launches.append(Launch(node, self._tags(node.node_id), why))
        elif Placement(node.instance_type, node.zone) in self.blocked:
            why = (
                f"launch refused ({node.last_error}); {node.instance_type} in {node.zone} "
                "is backed off for capacity, so the node is launched elsewhere"
            )
            self.books.append(Forget(node.node_id, None, why))
            return
        elif self.now - node.since >= FAILED_LAUNCH_HOLD:
            why = f"launch refused ({node.last_error}) {FAILED_LAUNCH_HOLD} ago; trying again"
            self.books.append(Forget(node.node_id, None, why))
            return
        self.live += 1
        self.zones[node.zone] += 1
        if node.image_id == self.image_id and node.retiring is None:
            self.fresh += 1

    def _track(self, node: NodeRecord, instance_id: str, obs: ObservedInstance | None) -> None:
        """Rules 2 and 4 for a row with an instance id."""
        if node.state in _GONE:
            self._terminated(node, instance_id, obs)
            return
        born = _born(node)
        if obs is None:
            if self.now - born < VISIBILITY_GRACE:
                self._live(node, node.state, instance_id, None, born)
            else:
                self._lost(node, f"instance {instance_id} is no longer in EC2")
            return
        if obs.state in _GONE:
            self._lost(node, f"instance {instance_id} was {obs.state} outside the pool")
            return
        if obs.state is not node.state:
            why = f"EC2 shows {obs.state}, the row says {node.state}"
            self.books.append(
                RecordState(node.node_id, obs.state, obs.state_since or self.now, why)
            )
        self._live(node, obs.state, instance_id, obs, born)

    def _terminated(self, node: NodeRecord, instance_id: str, obs: ObservedInstance | None) -> None:
        if obs is None or obs.state in _GONE:
            self.books.append(Forget(node.node_id, None, "terminated by the pool"))
        elif obs.state is self.warm or obs.state is NodeState.STOPPING:
            why = f"terminated earlier but EC2 still shows {obs.state}; terminating again"
            self.kills.append(Terminate(node.node_id, instance_id, None, why))
        else:
            self.problems.append(
                f"{node.node_id}: terminated by the pool but EC2 shows {instance_id} {obs.state}; "
                "left alone"
            )

    def _lost(self, node: NodeRecord, why: str) -> None:
        announce = node.provisioned and node.retiring is None
        retire = RetireReason.UNHEALTHY if announce else None
        self.books.append(Forget(node.node_id, retire, f"{why}; a replacement is launched"))

    def _live(
        self,
        node: NodeRecord,
        state: NodeState,
        instance_id: str,
        obs: ObservedInstance | None,
        born: datetime,
    ) -> None:
        """Rule 5, then sort a live node into the buckets the pool-wide rules use."""
        reason = node.retiring or self._aging(node.image_id, born)
        if not node.provisioned:
            if reason is not None:
                why = f"not provisioned yet and {self._why(reason, node.image_id)}"
                self.kills.append(Terminate(node.node_id, instance_id, None, why))
                return
            booting = state in _BOOTING and not (obs and obs.booted)
            if booting and self.now - born >= self.spec.boot_timeout:
                why = f"not booted {self.spec.boot_timeout} after launch"
                self.kills.append(Terminate(node.node_id, instance_id, None, why))
                return
            self.warming.append((node, state, instance_id, obs))
            self.fresh += 1
        elif reason is not None:
            self.old.append((reason, node, state, instance_id))
        else:
            self.fresh += 1
            bucket = self.fresh_stopped if state is self.warm else self.fresh_powered
            bucket.append((node, instance_id))
        self.live += 1
        self.zones[node.zone] += 1

    def _collect(self, untracked: list[ObservedInstance], nodes: Sequence[NodeRecord]) -> None:
        """Rule 6: garbage collection of instances with the pool's tag and no row."""
        by_token = {node.client_token: node.node_id for node in nodes}
        ids = {node.node_id for node in nodes}
        for obs in untracked:
            tag = obs.tags.get(NODE_TAG)
            owner = by_token.get(obs.client_token or "") or (tag if tag in ids else None)
            if owner is not None:
                why = f"duplicate launch for node {owner}, which has its own instance"
                self.kills.append(TerminateUntracked(obs.instance_id, why))
                continue
            if obs.state in _SETTLING:
                continue
            reason = self._aging(obs.image_id, obs.launch_time)
            wanted = reason is None and self.fresh < self.spec.size
            if not wanted and obs.state is self.warm:
                why = self._why(reason or RetireReason.SHRINK, obs.image_id)
                self.kills.append(TerminateUntracked(obs.instance_id, f"untracked and {why}"))
                continue
            retire = None if wanted else reason or RetireReason.SHRINK
            node = NodeRecord(
                node_id=f"{self.spec.name}-{obs.instance_id}",
                client_token=obs.client_token
                or client_token(f"{self.spec.name}-{obs.instance_id}"),
                image_id=obs.image_id,
                instance_type=obs.instance_type,
                subnet_id=obs.subnet_id,
                zone=obs.zone,
                state=obs.state,
                since=obs.state_since or self.now,
                instance_id=obs.instance_id,
                launched_at=obs.launch_time,
                provisioned=True,
                retiring=retire,
            )
            why = (
                "untracked, fresh and the pool is short"
                if retire is None
                else (
                    f"untracked and {obs.state}, so adopted rather than interrupted; retiring: "
                    + self._why(retire, obs.image_id)
                )
            )
            self.books.append(Adopt(node, why))
            self.adopted.append(node.node_id)
            self._live(node, obs.state, obs.instance_id, obs, obs.launch_time)

    # -- pool-wide ----------------------------------------------------------------------------

    def _shrink_new(self) -> None:
        """Rule 7: surplus fresh nodes go first from those nobody can be using yet."""
        surplus = self.fresh - self.spec.size
        if surplus <= 0 or not self.warming:
            return
        newest_first = sorted(self.warming, key=lambda w: (_born(w[0]), w[0].node_id), reverse=True)
        self.warming = newest_first[surplus:]
        for node, _, instance_id, _ in newest_first[:surplus]:
            why = f"surplus: the pool's size is {self.spec.size}; not provisioned yet"
            self.kills.append(Terminate(node.node_id, instance_id, None, why))
            self._drop(node)
            self.fresh -= 1

    def _warm_up(self) -> None:
        """Rule 8: stop what finished booting, provision what is stopped."""
        for node, state, instance_id, obs in self.warming:
            if state is self.warm:
                why = f"new node reached the warm state ({self.warm})"
                self.warms.append(Provision(node.node_id, instance_id, why))
                self.fresh_stopped.append((node, instance_id))
            elif state is _RUNNING and obs is not None and obs.booted:
                why = f"first boot finished; going to the warm state ({self.warm})"
                self.warms.append(Stop(node.node_id, instance_id, why))

    def _roll(self) -> None:
        """Rule 9: replace old nodes within the budgets, then shrink provisioned fresh nodes."""
        size = self.spec.size
        available = len(self.fresh_stopped) + len(self.fresh_powered) + len(self.old)
        floor = size - self.spec.max_unavailable
        gone: set[str] = set()
        if available > floor:
            stopped_old = sorted(
                (o for o in self.old if o[2] is self.warm),
                key=lambda o: (_RETIRE_FIRST[o[0]], _born(o[1]), o[1].node_id),
            )
            for reason, node, _, instance_id in stopped_old[: available - floor]:
                why = f"{self._why(reason, node.image_id)}; stopped, {available - 1} stay available"
                retire = reason if node.retiring is None else None
                self.kills.append(Terminate(node.node_id, instance_id, retire, why))
                self._drop(node)
                gone.add(node.node_id)
                available -= 1
        for reason, node, _, instance_id in self.old:
            if node.retiring is None and node.node_id not in gone:
                why = f"{self._why(reason, node.image_id)}; replaced once stopped"
                self.marks.append(MarkRetiring(node.node_id, instance_id, reason, why))

        ready = len(self.fresh_stopped) + len(self.fresh_powered)
        if self.fresh <= size or ready <= size:
            return
        shrink = self._why(RetireReason.SHRINK, self.image_id)
        for node, instance_id in sorted(self.fresh_stopped, key=_oldest_first):
            if self.fresh <= size or ready <= size:
                return
            self.kills.append(Terminate(node.node_id, instance_id, RetireReason.SHRINK, shrink))
            self._drop(node)
            self.fresh -= 1
            ready -= 1
        for node, instance_id in sorted(self.fresh_powered, key=_oldest_first):
            if self.fresh <= size or ready <= size:
                return
            why = f"{shrink}; replaced once stopped"
            self.marks.append(MarkRetiring(node.node_id, instance_id, RetireReason.SHRINK, why))
            self.fresh -= 1
            ready -= 1

    def _launch(self, nodes: Sequence[NodeRecord]) -> None:
        """Rule 10: fill the pool and surge for old nodes, falling back past capacity back-offs."""
        size = self.spec.size
        wanted = min(size - self.fresh, size + self.spec.max_surge - self.live)
        if wanted <= 0:
            return
        short = size - self.live
        taken = {node.node_id for node in nodes}
        taken.update(self.adopted)
        preferred = self.spec.instance_types[0]
        for i, node_id in enumerate(self._new_ids(wanted, taken)):
            where = self._place()
            if where is None:
                self.problems.append(
                    "insufficient capacity: every instance type is backed off in every zone; "
                    f"{wanted - i} launch(es) deferred, keeping the {self.live} live node(s)"
                )
                return
            instance_type, subnet = where
            node = NodeRecord(
                node_id=node_id,
                client_token=client_token(node_id),
                image_id=self.image_id,
                instance_type=instance_type,
                subnet_id=subnet.subnet_id,
                zone=subnet.zone,
                state=_LAUNCHING,
                since=self.now,
            )
            why = "the pool is below its size" if i < short else "surge: replacing an old node"
            if instance_type != preferred:
                why += f"; {preferred} is backed off for capacity in every zone"
            self.launches.append(Launch(node, self._tags(node_id), why))
            self.live += 1

    # -- helpers ------------------------------------------------------------------------------

    def _aging(self, image_id: str, born: datetime) -> RetireReason | None:
        if image_id != self.image_id:
            return _OUTDATED
        if self.expired_before is not None and born <= self.expired_before:
            return _EXPIRED
        return None

    def _why(self, reason: RetireReason, image_id: str) -> str:
        """The reason text for a retire reason (cached: a rollout asks for it once per node)."""
        key = (reason, image_id)
        why = self.whys.get(key)
        if why is None:
            if reason is RetireReason.OUTDATED:
                why = f"image {image_id} is outdated (current {self.image_id})"
            elif reason is RetireReason.EXPIRED:
                why = f"older than the max node age {self.spec.max_node_age}"
            elif reason is RetireReason.SHRINK:
                why = f"surplus: the pool's size is {self.spec.size}"
            else:
                why = "marked unhealthy"
            self.whys[key] = why
        return why

    def _drop(self, node: NodeRecord) -> None:
        self.live -= 1
        self.zones[node.zone] -= 1

    def _tags(self, node_id: str) -> tuple[tuple[str, str], ...]:
        return (*self.pool_tags, (NODE_TAG, node_id))

    def _new_ids(self, count: int, taken: set[str]) -> Iterator[str]:
        """Deterministic fresh node ids, `<pool>-<batch>-<n>`: the batch is a hash of the plan's
        time, so the same inputs give the same plan, launches of one tick share it, and an id in
        use (hence a client token in use) is never handed out again."""
        stamp = f"{self.spec.name}|{self.now.isoformat()}".encode()
        prefix = f"{self.spec.name}-{hashlib.sha256(stamp).hexdigest()[:8]}-"
        made = 0
        k = 0
        while made < count:
            node_id = f"{prefix}{k}"
            k += 1
            if node_id not in taken:
                made += 1
                yield node_id

    def _place(self) -> tuple[str, Subnet] | None:
        """The preferred type with a zone not backed off; in it, the zone with fewest nodes."""
        for instance_type, zones in self.choices:
            if zones:
                zone = min(zones, key=self.zones.__getitem__)
                self.zones[zone] += 1
                return instance_type, self.subnet_in[zone]
        return None
