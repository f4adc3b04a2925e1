"""The scheduler boundary: what autogrow reads from an HPC scheduler and what it asks of it.

Implementations: Slurm (squeue/sinfo/scontrol) and a simulated scheduler replaying a workload trace.
The snapshot types are also the payload of `QueueDepthChanged`, so they are plain frozen models.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field


class NodeActivity(StrEnum):
    IDLE = "idle"  # up, no job on it
    BUSY = "busy"  # up, at least one job on it
    DRAINING = "draining"  # up, finishing its jobs, takes no new ones
    DOWN = "down"  # not available to the scheduler (powered off, failed, booting)


class SchedulerNode(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The scheduler's name for the node, e.g. node017.")
    activity: NodeActivity = Field(description="Whether the node is idle, busy, draining or down.")
    cpus: int = Field(ge=0, description="Cores the scheduler may allocate on the node.")
    cpus_allocated: int = Field(default=0, ge=0, description="Cores allocated to running jobs.")
    partitions: tuple[str, ...] = Field(default=(), description="Partitions the node serves.")
    idle_since: datetime | None = Field(
        default=None, description="When the node last became idle, if it is idle."
    )


class PartitionDemand(BaseModel):
    model_config = ConfigDict(frozen=True)

    partition: str = Field(description="Scheduler partition (queue) name.")
    pending_jobs: int = Field(ge=0, description="Jobs waiting for resources in this partition.")
    pending_cores: int = Field(ge=0, description="Cores those waiting jobs ask for in total.")
    pending_nodes: int = Field(
        default=0, ge=0, description="Whole nodes those waiting jobs ask for in total."
    )
    oldest_pending_since: datetime | None = Field(
        default=None, description="Submit time of the longest-waiting job, if any."
    )


class HeadReservation(BaseModel):
    """When the scheduler expects to start the first waiting job, and on what (Slurm: squeue's
    expected start and scheduled nodes of the top pending job, with power saving counting
    powered-down nodes as available once resumed)."""

    model_config = ConfigDict(frozen=True)

    start: datetime = Field(description="When the job is expected to start at the latest.")
    nodes: int = Field(ge=0, description="Whole nodes the job needs.")
    held: int = Field(
        default=0,
        ge=0,
        description="Of those, the nodes kept for it that run no job now (idle, or powered off "
        "and counted as available after a boot); the rest are freed by running jobs by then.",
    )
    backfill: int = Field(
        default=0,
        ge=0,
        description="Nodes beyond the idle ones that jobs behind it could start on at once, "
        "were the powered-off nodes up (they end before it or use nodes it does not need).",
    )


MAX_SUBMISSIONS = 256
"""The most jobs a snapshot lists in `submissions`: enough for any warm reserve up to this many
nodes (each job asks for at least one), and a bounded message however long the queue."""


class JobSubmission(BaseModel):
    """A job as the arrival pattern sees it: when it came and how much it asked for."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(description="The scheduler's job id (an array's: the array's id).")
    partition: str = Field(description="The partition it was submitted to.")
    submitted_at: datetime = Field(description="When it was submitted.")
    nodes: int = Field(ge=0, description="Whole nodes it asks for (an array: all its tasks).")
    cores: int = Field(default=0, ge=0, description="Cores it asks for (an array: all its tasks).")


class QueueSnapshot(BaseModel):
    """The whole queue at one instant: a state, never a delta."""

    model_config = ConfigDict(frozen=True)

    taken_at: datetime = Field(description="When the scheduler was read.")
    partitions: tuple[PartitionDemand, ...] = Field(
        default=(), description="Waiting demand per partition."
    )
    running_jobs: int = Field(default=0, ge=0, description="Jobs running now.")
    nodes: tuple[SchedulerNode, ...] = Field(
        default=(), description="Every node the scheduler knows."
    )
    reservation: HeadReservation | None = Field(
        default=None, description="The first waiting job's reservation, if the scheduler tells."
    )
    submissions: tuple[JobSubmission, ...] = Field(
        default=(),
        description="The latest submitted jobs the scheduler lists (waiting, running or just "
        "ended), newest first, at most MAX_SUBMISSIONS: what a warm reserve is sized by.",
    )

    @property
    def pending_jobs(self) -> int:
        return sum(p.pending_jobs for p in self.partitions)

    @property
    def pending_cores(self) -> int:
        return sum(p.pending_cores for p in self.partitions)


class Scheduler(Protocol):
    """What hpcfleet needs from an HPC scheduler."""

    async def snapshot(self) -> QueueSnapshot:
        """Read the queue and the nodes."""
        ...

    async def nodes(self) -> Sequence[SchedulerNode]:
        """Read the nodes only."""
        ...

    async def drain(self, node_names: Sequence[str], reason: str) -> None:
        """Stop placing new jobs on these nodes; running jobs finish."""
        ...

    async def resume(self, node_names: Sequence[str]) -> None:
        """Let these nodes take jobs again."""
        ...
