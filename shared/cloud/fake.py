"""`FakeCloud`: an in-memory Cloud for unit tests, service tests and scale runs.

It behaves like EC2 where hpcfleet's correctness depends on it, including where moto does not:
ClientToken idempotency, in-between states (pending, stopping, shutting-down) that settle later,
IncorrectInstanceState for starting a terminated instance, unique image names, LaunchTime reset on
every start, and terminated instances that vanish an hour later. It records every call and fails
on demand, scripted or at a seeded random rate.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from shared.clock import Clock, SystemClock
from shared.cloud.base import (
    CloudError,
    Image,
    ImageState,
    Instance,
    InstanceState,
    InvalidState,
    LaunchSpec,
    NotFound,
    check_client_token,
    error_for_code,
)

OPERATIONS = frozenset(
    {
        "run_instances",
        "start_instances",
        "stop_instances",
        "terminate_instances",
        "describe_instances",
        "booted_instances",
        "create_image",
        "describe_images",
        "deregister_image",
        "create_tags",
    }
)

_SETTLES_TO = {
    InstanceState.PENDING: InstanceState.RUNNING,
    InstanceState.STOPPING: InstanceState.STOPPED,
    InstanceState.SHUTTING_DOWN: InstanceState.TERMINATED,
}
_GONE = frozenset({InstanceState.SHUTTING_DOWN, InstanceState.TERMINATED})
_CANNOT_START = _GONE | {InstanceState.STOPPING}  # EC2: IncorrectInstanceState
_CANNOT_STOP = _GONE | {InstanceState.PENDING}


@dataclass
class _Node:
    instance_id: str
    state: InstanceState
    spec: LaunchSpec
    zone: str
    tags: dict[str, str]
    launch_time: datetime
    private_ip: str
    client_token: str
    state_since: datetime

    def view(self) -> Instance:
        return Instance(
            instance_id=self.instance_id,
            state=self.state,
            image_id=self.spec.image_id,
            instance_type=self.spec.instance_type,
            zone=self.zone,
            tags=self.tags,
            launch_time=self.launch_time,
            private_ip=None if self.state is InstanceState.TERMINATED else self.private_ip,
            client_token=self.client_token,
            subnet_id=self.spec.subnet_id,
            state_since=self.state_since,
        )


@dataclass
class _Ami:
    image_id: str
    name: str
    state: ImageState
    owner: str
    tags: dict[str, str]
    created_at: datetime
    description: str | None
    snapshot_ids: tuple[str, ...]

    def view(self) -> Image:
        return Image(
            image_id=self.image_id,
            name=self.name,
            state=self.state,
            tags=self.tags,
            created_at=self.created_at,
            description=self.description,
            snapshot_ids=self.snapshot_ids,
            owner_id=self.owner,
        )


@dataclass
class _Failure:
    make: Callable[[], CloudError]
    remaining: int | None  # None: until cleared
    after_effect: bool


@dataclass
class _Chaos:
    rate: float
    make: Callable[[], CloudError]
    operations: frozenset[str]


def _factory(error: CloudError | str) -> Callable[[], CloudError]:
    """A fresh exception per raise, so tracebacks do not pile up on one object."""
    if isinstance(error, str):
        return lambda: error_for_code(error)
    return lambda: type(error)(error.code, error.message)


class FakeCloud:
    """An in-memory Cloud.

    Transitions (pending→running, stopping→stopped, shutting-down→terminated, image
    pending→available) complete `transition_seconds` / `image_seconds` of `clock` time after they
    start. With the default 0 they complete at the next call, so the call that starts a transition
    reports the in-between state and a later describe the settled one, as on EC2.
    Terminated instances disappear `forget_terminated_after` seconds later (EC2: about an hour),
    which keeps year-long scale runs from accumulating them. A running instance counts as booted
    (its status checks pass) `boot_seconds` after it entered running; `hang_boot` keeps chosen
    instances from ever booting.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        region: str = "us-east-1",
        account_id: str = "123456789012",
        transition_seconds: float = 0.0,
        image_seconds: float = 0.0,
        forget_terminated_after: float = 3600.0,
        boot_seconds: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.region = region
        self.account_id = account_id
        self.transition_seconds = transition_seconds
        self.image_seconds = image_seconds
        self.forget_terminated_after = forget_terminated_after
        self.boot_seconds = boot_seconds
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._nodes: dict[str, _Node] = {}
        self._images: dict[str, _Ami] = {}
        self._deregistered: set[str] = set()
        self._snapshots: set[str] = set()
        self._tokens: dict[str, tuple[LaunchSpec, int, list[str]]] = {}
        self._failures: dict[str, list[_Failure]] = {}
        self._chaos: _Chaos | None = None
        self._hung: set[str] = set()
        self._random = random.Random(seed)
        self._serial = itertools.count(1)
        # min-heaps of (due, serial, id, ...): each call settles only what is due, O(log n)
        self._transitions: list[tuple[datetime, int, str, InstanceState]] = []
        self._forgets: list[tuple[datetime, int, str]] = []
        self._builds: list[tuple[datetime, int, str]] = []

    # --- test controls -------------------------------------------------------------------------

    def fail(
        self,
        operation: str,
        error: CloudError | str,
        times: int | None = 1,
        *,
        after_effect: bool = False,
    ) -> None:
        """Make the next `times` calls of `operation` raise `error` (a CloudError or an EC2 code).

        `times=None` fails until `clear_failures()`. With `after_effect` the call takes effect and
        then raises, like a response lost on the way back: what ClientToken protects against.
        """
        _check_operation(operation)
        self._failures.setdefault(operation, []).append(
            _Failure(_factory(error), times, after_effect)
        )

    def fail_randomly(
        self,
        rate: float,
        error: CloudError | str = "RequestLimitExceeded",
        operations: Collection[str] | None = None,
    ) -> None:
        """Fail each call of `operations` (default: all) with probability `rate`, drawn from the
        seeded random so a chaos run is reproducible. Replaces an earlier random failure."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate is a probability")
        ops = frozenset(operations) if operations is not None else OPERATIONS
        for op in ops:
            _check_operation(op)
        self._chaos = _Chaos(rate, _factory(error), ops)

    def clear_failures(self) -> None:
        self._failures.clear()
        self._chaos = None

    def hang_boot(self, ids: Collection[str]) -> None:
        """These instances run but never finish booting (a broken image, a failed status check)."""
        self._hung.update(ids)

    def instances(self) -> list[Instance]:
        """Every instance as it stands now, without recording a call (for test assertions)."""
        self._settle()
        return [n.view() for n in self._nodes.values()]

    def add_image(
        self,
        name: str,
        *,
        image_id: str | None = None,
        owner: str = "amazon",
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> Image:
        """Seed an available image (e.g. a public base image for the bakery to build from)."""
        ami = _Ami(
            image_id=image_id or self._new_id("ami"),
            name=name,
            state=ImageState.AVAILABLE,
            owner=owner,
            tags=dict(tags or {}),
            created_at=self.clock.now(),
            description=description,
            snapshot_ids=(self._new_snapshot(),),
        )
        self._images[ami.image_id] = ami
        return ami.view()

    @property
    def snapshots(self) -> frozenset[str]:
        """Snapshot ids that exist, so tests can check what deregistering left behind."""
        return frozenset(self._snapshots)

    # --- the Cloud interface -------------------------------------------------------------------

    async def run_instances(
        self, spec: LaunchSpec, count: int, client_token: str
    ) -> list[Instance]:
        self._enter("run_instances", spec=spec, count=count, client_token=client_token)
        if count < 1:
            raise ValueError("count must be at least 1")
        check_client_token(client_token)
        known = self._tokens.get(client_token)
        if known is not None:
            if known[:2] != (spec, count):
                raise CloudError(
                    "IdempotentParameterMismatch",
                    "Arguments on this idempotent request are inconsistent with arguments used "
                    "in previous request(s).",
                )
            return [self._nodes[i].view() for i in known[2] if i in self._nodes]
        now = self.clock.now()
        created = []
        for _ in range(count):
            serial = next(self._serial)
            node = _Node(
                instance_id=self._new_id("i", serial),
                state=InstanceState.PENDING,
                spec=spec,
                zone=spec.zone or f"{self.region}a",
                tags=dict(spec.tags),
                launch_time=now,
                private_ip=f"10.0.{serial // 250 % 256}.{serial % 250 + 4}",
                client_token=client_token,
                state_since=now,
            )
            self._begin(node, InstanceState.PENDING, now)
            self._nodes[node.instance_id] = node
            created.append(node)
        self._tokens[client_token] = (spec, count, [n.instance_id for n in created])
        self._exit("run_instances")
        return [n.view() for n in created]

    async def start_instances(self, ids: Sequence[str]) -> None:
        self._enter("start_instances", ids=list(ids))
        nodes = self._existing(ids)
        refused = [n.instance_id for n in nodes if n.state in _CANNOT_START]
        if refused:
            raise InvalidState(
                "IncorrectInstanceState",
                f"The instance '{refused[0]}' is not in a state from which it can be started.",
            )
        now = self.clock.now()
        for node in nodes:
            if node.state is InstanceState.STOPPED:
                self._begin(node, InstanceState.PENDING, now)
                node.launch_time = now  # EC2 resets LaunchTime on every start
        self._exit("start_instances")

    async def stop_instances(self, ids: Sequence[str]) -> None:
        self._enter("stop_instances", ids=list(ids))
        nodes = self._existing(ids)
        refused = [n.instance_id for n in nodes if n.state in _CANNOT_STOP]
        if refused:
            raise InvalidState(
                "IncorrectInstanceState",
                f"The instance '{refused[0]}' is not in a state from which it can be stopped.",
            )
        now = self.clock.now()
        for node in nodes:
            if node.state is InstanceState.RUNNING:
                self._begin(node, InstanceState.STOPPING, now)
        self._exit("stop_instances")

    async def terminate_instances(self, ids: Sequence[str]) -> None:
        self._enter("terminate_instances", ids=list(ids))
        now = self.clock.now()
        for instance_id in ids:
            node = self._nodes.get(instance_id)
            if node is not None and node.state not in _GONE:
                self._begin(node, InstanceState.SHUTTING_DOWN, now)
        self._exit("terminate_instances")

    async def describe_instances(
        self,
        ids: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        states: Collection[InstanceState] | None = None,
    ) -> list[Instance]:
        self._enter(
            "describe_instances",
            ids=None if ids is None else list(ids),
            tags=None if tags is None else dict(tags),
            states=None if states is None else set(states),
        )
        nodes = self._existing(ids) if ids is not None else list(self._nodes.values())
        found = [
            n.view()
            for n in nodes
            if _has_tags(n.tags, tags) and (states is None or n.state in states)
        ]
        self._exit("describe_instances")
        return found

    async def booted_instances(self, ids: Sequence[str]) -> set[str]:
        self._enter("booted_instances", ids=list(ids))
        ready = self.clock.now() - timedelta(seconds=self.boot_seconds)
        booted = set()
        for instance_id in ids:
            node = self._nodes.get(instance_id)
            if (
                node is not None
                and node.state is InstanceState.RUNNING
                and node.state_since <= ready
                and instance_id not in self._hung
            ):
                booted.add(instance_id)
        self._exit("booted_instances")
        return booted

    async def create_image(
        self,
        instance_id: str,
        name: str,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> str:
        self._enter(
            "create_image",
            instance_id=instance_id,
            name=name,
            tags=dict(tags or {}),
            description=description,
        )
        (node,) = self._existing([instance_id])
        if node.state in _GONE:
            raise InvalidState(
                "IncorrectInstanceState", f"The instance '{instance_id}' is not running or stopped."
            )
        if any(a.name == name and a.owner == self.account_id for a in self._images.values()):
            raise CloudError("InvalidAMIName.Duplicate", f"AMI name {name} is already in use.")
        ami = _Ami(
            image_id=self._new_id("ami"),
            name=name,
            state=ImageState.PENDING,
            owner=self.account_id,
            tags=dict(tags or {}),
            created_at=self.clock.now(),
            description=description,
            snapshot_ids=(self._new_snapshot(),),
        )
        self._images[ami.image_id] = ami
        built = ami.created_at + timedelta(seconds=self.image_seconds)
        heapq.heappush(self._builds, (built, next(self._serial), ami.image_id))
        self._exit("create_image")
        return ami.image_id

    async def describe_images(
        self,
        ids: Sequence[str] | None = None,
        owners: Sequence[str] | None = None,
        name_pattern: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Image]:
        self._enter(
            "describe_images",
            ids=None if ids is None else list(ids),
            owners=None if owners is None else list(owners),
            name_pattern=name_pattern,
            tags=None if tags is None else dict(tags),
        )
        if ids is not None:
            unknown = [i for i in ids if i not in self._images and i not in self._deregistered]
            if unknown:
                raise NotFound(
                    "InvalidAMIID.NotFound", f"The image id '[{unknown[0]}]' does not exist"
                )
            candidates = [self._images[i] for i in ids if i in self._images]
        else:
            candidates = list(self._images.values())
        if owners is None and ids is None:
            owners = ["self"]
        wanted_owners = {self.account_id if o == "self" else o for o in owners or ()}
        found = [
            a.view()
            for a in candidates
            if (not wanted_owners or a.owner in wanted_owners)
            and (name_pattern is None or fnmatchcase(a.name, name_pattern))
            and _has_tags(a.tags, tags)
        ]
        self._exit("describe_images")
        return found

    async def deregister_image(self, image_id: str, delete_snapshots: bool = True) -> None:
        self._enter("deregister_image", image_id=image_id, delete_snapshots=delete_snapshots)
        ami = self._images.pop(image_id, None)
        if ami is not None:
            self._deregistered.add(image_id)
            if delete_snapshots:
                self._snapshots.difference_update(ami.snapshot_ids)
        self._exit("deregister_image")

    async def create_tags(self, resource_ids: Sequence[str], tags: Mapping[str, str]) -> None:
        self._enter("create_tags", resource_ids=list(resource_ids), tags=dict(tags))
        targets: list[dict[str, str]] = []
        for resource_id in resource_ids:
            if resource_id in self._nodes:
                targets.append(self._nodes[resource_id].tags)
            elif resource_id in self._images:
                targets.append(self._images[resource_id].tags)
            elif resource_id not in self._snapshots:  # snapshot tags are not modelled
                raise NotFound("InvalidID", f"The ID '{resource_id}' is not valid")
        for target in targets:
            target.update(tags)
        self._exit("create_tags")

    # --- internals -----------------------------------------------------------------------------

    def _enter(self, operation: str, **args: Any) -> None:
        """Record the call, let due transitions complete, then fail it if asked to."""
        self.calls.append((operation, args))
        self._settle()
        failure = self._take_failure(operation, after_effect=False)
        if failure is not None:
            raise failure
        chaos = self._chaos
        if chaos and operation in chaos.operations and self._random.random() < chaos.rate:
            raise chaos.make()

    def _exit(self, operation: str) -> None:
        """Fail a call after its effect, if asked to."""
        failure = self._take_failure(operation, after_effect=True)
        if failure is not None:
            raise failure

    def _take_failure(self, operation: str, *, after_effect: bool) -> CloudError | None:
        for failure in self._failures.get(operation, []):
            if failure.after_effect is after_effect:
                if failure.remaining is not None:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures[operation].remove(failure)
                return failure.make()
        return None

    def _begin(self, node: _Node, state: InstanceState, now: datetime) -> None:
        """Enter an in-between state, due to settle `transition_seconds` from now."""
        node.state = state
        node.state_since = now
        due = now + timedelta(seconds=self.transition_seconds)
        heapq.heappush(self._transitions, (due, next(self._serial), node.instance_id, state))

    def _settle(self) -> None:
        """Complete what is due by now, at the moment it was due however late anyone looks."""
        now = self.clock.now()
        while self._transitions and self._transitions[0][0] <= now:
            due, _, instance_id, state = heapq.heappop(self._transitions)
            node = self._nodes.get(instance_id)
            if node is None or node.state is not state:  # e.g. terminated while pending
                continue
            node.state = _SETTLES_TO[state]
            node.state_since = due
            if node.state is InstanceState.TERMINATED:
                forget = due + timedelta(seconds=self.forget_terminated_after)
                heapq.heappush(self._forgets, (forget, next(self._serial), instance_id))
        while self._forgets and self._forgets[0][0] <= now:
            self._nodes.pop(heapq.heappop(self._forgets)[2], None)
        while self._builds and self._builds[0][0] <= now:
            ami = self._images.get(heapq.heappop(self._builds)[2])
            if ami is not None:
                ami.state = ImageState.AVAILABLE

    def _existing(self, ids: Sequence[str]) -> list[_Node]:
        missing = [i for i in ids if i not in self._nodes]
        if missing:
            raise NotFound(
                "InvalidInstanceID.NotFound", f"The instance ID '{missing[0]}' does not exist"
            )
        return [self._nodes[i] for i in dict.fromkeys(ids)]

    def _new_id(self, prefix: str, serial: int | None = None) -> str:
        return f"{prefix}-{serial if serial is not None else next(self._serial):017x}"

    def _new_snapshot(self) -> str:
        snapshot_id = self._new_id("snap")
        self._snapshots.add(snapshot_id)
        return snapshot_id


def _check_operation(operation: str) -> None:
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; one of {sorted(OPERATIONS)}")


def _has_tags(actual: Mapping[str, str], wanted: Mapping[str, str] | None) -> bool:
    return all(actual.get(k) == v for k, v in (wanted or {}).items())
