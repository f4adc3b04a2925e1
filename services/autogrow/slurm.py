"""`SlurmScheduler`: the `Scheduler` interface over Slurm 22.05's command-line tools.

Slurm 22.05 has no node-update REST endpoint and no ``scontrol --json``, so the queue comes from
``squeue --json`` / ``sinfo --json`` and changes go through ``scontrol update``, each an asyncio
subprocess with a timeout. The JSON is turned into a `QueueSnapshot` by pure functions
(`queue_snapshot` and its parts), tested on outputs recorded from a real controller. What Slurm
shows that is easy to get wrong (see /work/shared/notes/slurm-on-one-host.md):

* squeue/sinfo ignore filter flags and list finished jobs for a few minutes: filter here.
* When the controller is down they still exit 0, after ~9 s, with an ``errors`` list and no jobs or
  nodes. Taking that as an empty queue would power everything off, so it raises `SlurmUnavailable`.
* A pending job array is one record whose ``array_task_string`` names the tasks left
  (``1-1000``, ``1,3,5``, ``4-10%3``); a ``%N`` throttle caps how many tasks run at once.
* With power saving, Slurm allocates jobs to powered-down nodes at once: they are CONFIGURING, not
  PENDING, until their nodes have booted. Such a job is waiting demand while any of its nodes is not
  up; once all are up it is as good as running (Slurm flags it RUNNING up to 30 s later).
* A job that no amount of nodes would start (held, dependency, begin time, partition down or too
  small, account/QOS limits) is not demand; counting it would power nodes for nothing.
* ``scontrol update state=resume`` fails on a node that is neither drained nor down, so `resume`
  reads the nodes first and resumes only those that need it: calling it twice is harmless.

Slurm's node names map to pool nodes through a tag the pool puts on each instance (`NodeNameMap`).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hostlist

from shared.clock import Clock, SystemClock
from shared.scheduler import (
    MAX_SUBMISSIONS,
    JobSubmission,
    NodeActivity,
    PartitionDemand,
    QueueSnapshot,
    SchedulerNode,
)

DEFAULT_TIMEOUT = 15.0
"""Seconds a Slurm command may take; clients retry an unreachable controller for about 9 s."""

_WAITING = frozenset({"PENDING", "CONFIGURING"})
_ACTIVE = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"})  # count against %N
_BLOCKED_PREFIXES = (
    "JobHeld",  # JobHeldUser, JobHeldAdmin
    "Dependency",  # Dependency, DependencyNeverSatisfied
    "BeginTime",  # not eligible yet, e.g. requeued after a failed boot
    "Partition",  # PartitionDown, PartitionInactive, PartitionNodeLimit, PartitionConfig, ...
    "Reservation",
    "Assoc",  # AssocGrp*/AssocMax* limits
    "QOS",  # QOSGrp*/QOSMax* limits, QOSNotAllowed
    "Invalid",  # InvalidAccount, InvalidQOS
    "AccountNotAllowed",
    "BadConstraints",
    "Licenses",
)
_NOT_UP_FLAGS = frozenset({"POWERED_DOWN", "POWERING_UP", "POWERING_DOWN", "NOT_RESPONDING"})
_NO_NEW_JOBS_FLAGS = frozenset({"DRAIN", "FAIL", "POWER_DOWN"})
_UP_STATES = frozenset({"idle", "mixed", "allocated"})
_UNREACHABLE = "Unable to contact slurm controller"
_INVALID_NODE = "Invalid node name specified"


class SlurmError(Exception):
    """Slurm could not be read or changed; the message says what and why."""


class SlurmUnavailable(SlurmError):
    """The controller did not answer (down, unreachable, too slow) or a client is missing: the
    view of the queue is unknown, so nothing may be decided on it."""


class SlurmCommandFailed(SlurmError):
    """A Slurm command exited non-zero for another reason than an unreachable controller."""

    def __init__(self, command: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(command)} exited {returncode}: {stderr or '(no message)'}")
        self.command = tuple(command)
        self.returncode = returncode
        self.stderr = stderr


class SlurmUnknownNodes(SlurmError):
    """Slurm does not know some of the node names it was given."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(sorted(names))
        super().__init__(f"nodes unknown to Slurm: {', '.join(self.names)}")


class SlurmOutputInvalid(SlurmError):
    """Slurm's output was not the JSON this adapter understands (malformed, or a new schema)."""


# ---- pure parsing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmJob:
    """The parts of one ``squeue --json`` record that demand is made of."""

    job_id: int
    state: str  # PENDING, CONFIGURING, RUNNING, COMPLETED, ...
    reason: str  # why it waits: None, Resources, Priority, JobHeldUser, ...
    partition: str  # the first, if the job named several
    node_count: int  # minimum nodes per job (or per task of an array)
    cpus: int  # minimum CPUs per job (or per task)
    exclusive: bool  # whole nodes (--exclusive)
    nodes: tuple[str, ...]  # allocated nodes, expanded
    submitted: datetime | None
    array_job_id: int | None  # the array this record belongs to, None outside arrays
    array_task_id: int | None  # None on the record that stands for an array's pending tasks
    tasks: int  # array tasks this record stands for; 1 for ordinary jobs and started tasks
    array_max_tasks: int  # the array's %N throttle; 0 when unlimited

    @property
    def blocked(self) -> bool:
        """Waiting for something other than nodes, so powering nodes on would not start it."""
        return self.reason.startswith(_BLOCKED_PREFIXES)


@dataclass(frozen=True)
class SlurmNode:
    """The parts of one ``sinfo --json`` record autogrow needs."""

    name: str
    state: str  # idle, mixed, allocated, down, ...
    flags: frozenset[str]  # CLOUD, DRAIN, POWERED_DOWN, POWERING_UP, NOT_RESPONDING, ...
    cpus: int
    cpus_allocated: int
    partitions: tuple[str, ...]
    last_busy: datetime | None

    @property
    def up(self) -> bool:
        """Booted, registered and answering: it can run jobs unless drained."""
        return self.state in _UP_STATES and not self.flags & _NOT_UP_FLAGS

    @property
    def activity(self) -> NodeActivity:
        return node_activity(self.state, self.flags)

    def view(self) -> SchedulerNode:
        activity = self.activity
        idle = activity in (NodeActivity.IDLE, NodeActivity.DRAINING) and self.cpus_allocated == 0
        return SchedulerNode(
            name=self.name,
            activity=activity,
            cpus=self.cpus,
            cpus_allocated=self.cpus_allocated,
            partitions=self.partitions,
            idle_since=self.last_busy if idle else None,
        )


def node_activity(state: str, flags: Iterable[str]) -> NodeActivity:
    """What a node's Slurm state means to autogrow. Anything not up (powered down, booting,
    suspending, not answering, down) is DOWN; an up node that takes no new jobs (drained, failing,
    power-down pending) is DRAINING, busy or not; otherwise BUSY with any job on it, else IDLE.
    States this code does not know count as DOWN: never supply that may not exist."""
    flagset = frozenset(flags)
    if state.lower() not in _UP_STATES or flagset & _NOT_UP_FLAGS:
        return NodeActivity.DOWN
    if flagset & _NO_NEW_JOBS_FLAGS:
        return NodeActivity.DRAINING
    if state.lower() != "idle" or "COMPLETING" in flagset:
        return NodeActivity.BUSY
    return NodeActivity.IDLE


def array_task_count(spec: str) -> int:
    """How many tasks an ``array_task_string`` names: ``1-1000`` → 1000, ``1,3,5`` → 3,
    ``4-10%3`` → 7 (the throttle is not a count), ``0-15:4`` → 4."""
    body = spec.split("%", 1)[0].strip()
    if not body:
        return 0
    total = 0
    try:
        for part in body.split(","):
            span, _, step = part.partition(":")
            first, _, last = span.partition("-")
            if not last:
                total += 1
                continue
            stride = int(step) if step else 1
            low, high = int(first), int(last)
            if stride < 1 or high < low:
                raise ValueError(part)
            total += (high - low) // stride + 1
    except ValueError as exc:
        raise SlurmOutputInvalid(f"array task string {spec!r} not understood") from exc
    return total


def load_json(text: str, command: str) -> dict[str, Any]:
    """Decode a ``--json`` output. Slurm reports a failure to read its state (controller down)
    only in the ``errors`` list, with exit 0, so those become `SlurmUnavailable`."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SlurmOutputInvalid(f"{command} printed no valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SlurmOutputInvalid(f"{command} printed JSON that is not an object")
    errors = data.get("errors") or []
    if errors:
        described = "; ".join(
            str(e.get("description") or e.get("error") or e) if isinstance(e, dict) else str(e)
            for e in errors
        )
        raise SlurmUnavailable(f"{command} could not read Slurm's state: {described}")
    return data


def _epoch(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) and value > 0 else None


def _records(data: Mapping[str, Any], key: str, command: str) -> list[Mapping[str, Any]]:
    records = data.get(key)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SlurmOutputInvalid(f"{command} output has no list of {key}")
    return records


def parse_jobs(data: Mapping[str, Any]) -> list[SlurmJob]:
    """Every job record of ``squeue --json`` (finished ones included; callers filter)."""
    jobs = []
    for record in _records(data, "jobs", "squeue --json"):
        try:
            array_job_id = record.get("array_job_id") or None
            task_id = record.get("array_task_id")
            task_string = record.get("array_task_string") or ""
            tasks = array_task_count(task_string) if array_job_id and task_id is None else 1
            nodes = record.get("nodes") or ""
            jobs.append(
                SlurmJob(
                    job_id=int(record["job_id"]),
                    state=str(record["job_state"]),
                    reason=str(record.get("state_reason") or "None"),
                    partition=str(record.get("partition") or "").split(",")[0],
                    node_count=max(1, int(record.get("node_count") or 1)),
                    cpus=max(1, int(record.get("cpus") or 1)),
                    exclusive=record.get("shared") == "none",
                    nodes=tuple(hostlist.expand_hostlist(nodes)) if nodes else (),
                    submitted=_epoch(record.get("submit_time")),
                    array_job_id=int(array_job_id) if array_job_id else None,
                    array_task_id=None if task_id is None else int(task_id),
                    tasks=tasks,
                    array_max_tasks=int(record.get("array_max_tasks") or 0),
                )
            )
        except (KeyError, TypeError, ValueError, hostlist.BadHostlist) as exc:
            raise SlurmOutputInvalid(
                f"squeue --json: job record {record.get('job_id')!r} not understood: {exc!r}"
            ) from exc
    return jobs


def parse_nodes(data: Mapping[str, Any]) -> list[SlurmNode]:
    """Every node record of ``sinfo --json``."""
    nodes = []
    for record in _records(data, "nodes", "sinfo --json"):
        try:
            nodes.append(
                SlurmNode(
                    name=str(record["name"]),
                    state=str(record["state"]).lower(),
                    flags=frozenset(str(f).upper() for f in record.get("state_flags") or ()),
                    cpus=int(record["cpus"]),
                    cpus_allocated=int(record.get("alloc_cpus") or 0),
                    partitions=tuple(str(p) for p in record.get("partitions") or ()),
                    last_busy=_epoch(record.get("last_busy")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SlurmOutputInvalid(
                f"sinfo --json: node record {record.get('name')!r} not understood: {exc!r}"
            ) from exc
    return nodes


def _waiting(job: SlurmJob, up: frozenset[str]) -> bool:
    """Waiting for nodes: pending, or configuring while some of its nodes have not come up."""
    if job.state == "PENDING":
        return not job.blocked
    return job.state == "CONFIGURING" and not (job.nodes and set(job.nodes) <= up)


def job_submissions(
    jobs: Iterable[SlurmJob], limit: int = MAX_SUBMISSIONS
) -> tuple[JobSubmission, ...]:
    """The newest `limit` jobs squeue lists, in any state (a job that already ran came all the
    same), newest first. An array is one submission: its pending record and its started tasks
    (each a record of its own) together, so that a task starting does not count as a new job."""
    merged: dict[int, list[Any]] = {}  # job or array id -> [partition, submitted, nodes, cores]
    for job in jobs:
        if job.submitted is None:
            continue
        key = job.array_job_id if job.array_job_id is not None else job.job_id
        entry = merged.setdefault(key, [job.partition, job.submitted, 0, 0])
        entry[1] = min(entry[1], job.submitted)
        entry[2] += job.tasks * job.node_count
        entry[3] += job.tasks * job.cpus
    newest = heapq.nlargest(limit, merged.items(), key=lambda item: (item[1][1], item[0]))
    return tuple(
        JobSubmission(job_id=str(key), partition=part, submitted_at=at, nodes=nodes, cores=cores)
        for key, (part, at, nodes, cores) in newest
    )


def queue_snapshot(
    squeue: Mapping[str, Any], sinfo: Mapping[str, Any], taken_at: datetime
) -> QueueSnapshot:
    """The queue and the nodes from one ``squeue --json`` and one ``sinfo --json``.

    Per partition: `pending_jobs` counts every waiting job and array task; `pending_cores` and
    `pending_nodes` count only what could start at once (an array throttled to %N adds at most N
    tasks, less those already active). `pending_nodes` is the least number of whole nodes the
    waiting jobs need: the sum over exclusive jobs plus the largest node count among the rest
    (shared jobs may pack onto the same nodes; cores bound the rest).
    """
    nodes = parse_nodes(sinfo)
    jobs = parse_jobs(squeue)
    up = frozenset(n.name for n in nodes if n.up)

    active_tasks: dict[int, int] = {}
    for job in jobs:
        if job.array_job_id is not None and job.array_task_id is not None and job.state in _ACTIVE:
            active_tasks[job.array_job_id] = active_tasks.get(job.array_job_id, 0) + 1

    partitions = {p for n in nodes for p in n.partitions}
    count: dict[str, int] = {}
    cores: dict[str, int] = {}
    exclusive_nodes: dict[str, int] = {}
    widest: dict[str, int] = {}
    oldest: dict[str, datetime] = {}
    running = 0
    for job in jobs:
        if not _waiting(job, up):
            running += job.state in ("RUNNING", "CONFIGURING")
            continue
        part = job.partition
        partitions.add(part)
        startable = job.tasks
        if job.array_job_id is not None and job.array_task_id is None and job.array_max_tasks:
            room = job.array_max_tasks - active_tasks.get(job.array_job_id, 0)
            startable = max(0, min(job.tasks, room))
        count[part] = count.get(part, 0) + job.tasks
        cores[part] = cores.get(part, 0) + startable * job.cpus
        if startable and job.exclusive:
            exclusive_nodes[part] = exclusive_nodes.get(part, 0) + startable * job.node_count
        elif startable:
            widest[part] = max(widest.get(part, 0), job.node_count)
        if job.submitted is not None and (part not in oldest or job.submitted < oldest[part]):
            oldest[part] = job.submitted

    demand = tuple(
        PartitionDemand(
            partition=p,
            pending_jobs=count.get(p, 0),
            pending_cores=cores.get(p, 0),
            pending_nodes=exclusive_nodes.get(p, 0) + widest.get(p, 0),
            oldest_pending_since=oldest.get(p),
        )
        for p in sorted(partitions)
    )
    return QueueSnapshot(
        taken_at=taken_at,
        partitions=demand,
        running_jobs=running,
        nodes=tuple(n.view() for n in sorted(nodes, key=lambda n: n.name)),
        submissions=job_submissions(jobs),
    )


# ---- pool node names ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeNameMap:
    """Which pool node is which Slurm node, from the tag (key given by the caller) that each
    pool instance carries with its Slurm node name."""

    pool_by_slurm: Mapping[str, str]  # Slurm node name -> pool node id

    @classmethod
    def from_tags(cls, tag: str, tags_by_pool_node: Mapping[str, Mapping[str, str]]) -> NodeNameMap:
        """Build the map from each pool node's instance tags; two pool nodes claiming one Slurm
        name is a configuration error, not something to guess about."""
        pool_by_slurm: dict[str, str] = {}
        for node_id, tags in tags_by_pool_node.items():
            name = tags.get(tag)
            if not name:
                continue
            if name in pool_by_slurm:
                raise ValueError(
                    f"Slurm node {name} is tagged on pool nodes {pool_by_slurm[name]} and {node_id}"
                )
            pool_by_slurm[name] = node_id
        return cls(pool_by_slurm)

    def pool_nodes(self, names: str | Iterable[str]) -> tuple[list[str], list[str]]:
        """The pool node ids for Slurm node names (a list, or a host list like ``node[001-004]``),
        and the names no pool node carries."""
        listed = hostlist.expand_hostlist(names) if isinstance(names, str) else list(names)
        found = [self.pool_by_slurm[n] for n in listed if n in self.pool_by_slurm]
        return found, [n for n in listed if n not in self.pool_by_slurm]

    def slurm_name(self, pool_node_id: str) -> str | None:
        for name, node_id in self.pool_by_slurm.items():
            if node_id == pool_node_id:
                return name
        return None


# ---- the adapter -------------------------------------------------------------------------------


class SlurmScheduler:
    """`Scheduler` over the Slurm client programs.

    `bin_dir` holds squeue, sinfo and scontrol (default: found on PATH); `env` is added to this
    process's environment for them, e.g. ``{"SLURM_CONF": ...}`` to reach a private cluster.
    """

    def __init__(
        self,
        *,
        bin_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        self._bin_dir = None if bin_dir is None else Path(bin_dir)
        self._env = {**os.environ, **(env or {})}
        self._timeout = timeout
        self._clock = clock or SystemClock()

    async def snapshot(self) -> QueueSnapshot:
        taken_at = self._clock.now()
        # both at once (a poll's time is a waiting job's), and neither left running on a failure
        jobs, nodes = await asyncio.gather(
            self._run("squeue", "--json"), self._run("sinfo", "--json"), return_exceptions=True
        )
        for failed in (jobs, nodes):
            if isinstance(failed, BaseException):
                raise failed
        assert isinstance(jobs, str) and isinstance(nodes, str)
        squeue = load_json(jobs, "squeue --json")
        sinfo = load_json(nodes, "sinfo --json")
        return queue_snapshot(squeue, sinfo, taken_at)

    async def nodes(self) -> Sequence[SchedulerNode]:
        return [n.view() for n in await self._slurm_nodes()]

    async def drain(self, node_names: Sequence[str], reason: str) -> None:
        if node_names:
            await self._update(node_names, "state=drain", f"reason={reason or 'hpcfleet'}")

    async def resume(self, node_names: Sequence[str]) -> None:
        """Clear drain and down states; nodes already taking jobs are left alone."""
        if not node_names:
            return
        known = {n.name: n for n in await self._slurm_nodes()}
        unknown = set(node_names) - set(known)
        if unknown:
            raise SlurmUnknownNodes(unknown)
        stuck = [
            name
            for name in node_names
            if known[name].state == "down" or known[name].flags & {"DRAIN", "FAIL"}
        ]
        if stuck:
            await self._update(stuck, "state=resume")

    async def power_down(self, node_names: Sequence[str], *, force: bool = False) -> None:
        """Have Slurm power these nodes off through its SuspendProgram, for power-saving clusters
        where Slurm's SuspendTime is set high and autogrow chooses the moment. Drain them and wait
        until they are idle first; `force` also requeues the jobs still on them."""
        if node_names:
            await self._update(
                node_names, "state=power_down_force" if force else "state=power_down"
            )

    async def _slurm_nodes(self) -> list[SlurmNode]:
        return parse_nodes(load_json(await self._run("sinfo", "--json"), "sinfo --json"))

    async def _update(self, node_names: Sequence[str], *settings: str) -> None:
        names = hostlist.collect_hostlist(list(node_names))
        try:
            await self._run("scontrol", "update", f"nodename={names}", *settings)
        except SlurmCommandFailed as exc:
            if _INVALID_NODE not in exc.stderr:
                raise
            unknown = set(node_names) - {n.name for n in await self._slurm_nodes()}
            if not unknown:
                raise
            raise SlurmUnknownNodes(unknown) from exc

    async def _run(self, program: str, *args: str) -> str:
        """Run one Slurm client program; its stdout, or a typed error."""
        command = [str(self._bin_dir / program) if self._bin_dir else program, *args]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            raise SlurmUnavailable(
                f"cannot run {command[0]}: {exc}; install Debian's slurm-client package"
            ) from exc
        try:
            out, err = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError:
            raise SlurmUnavailable(
                f"{' '.join(command)} did not finish within {self._timeout} s"
            ) from None
        finally:
            if process.returncode is None:  # timed out or cancelled: leave no stray process
                process.kill()
                await process.wait()
        stderr = err.decode(errors="replace").strip()
        if process.returncode != 0:
            if _UNREACHABLE in stderr:
                raise SlurmUnavailable(f"{' '.join(command)}: {stderr}")
            raise SlurmCommandFailed(command, process.returncode or 0, stderr)
        return out.decode(errors="replace")
