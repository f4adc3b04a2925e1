"""A pool's configuration: what the operator asks of one pool of compute nodes.

A frozen pydantic model because it crosses the API (`GET/PUT /pool/pools/{name}`) and the database
as JSON. Field ranges are checked on construction. The settings that are valid one by one but leave
the pool nothing sensible to do (a rolling budget of 0 % surge and 0 % unavailable, no image yet)
are reported by `problems()` instead, so the API can refuse them with a reason and `plan()` can
refuse to act on a stored spec that has them: one rule, two callers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

POOL_TAG = "hpcfleet:pool"
"""EC2 tag naming the pool an instance belongs to: the pool observes and collects by it."""

NODE_TAG = "hpcfleet:node"
"""EC2 tag naming the node (launch intent) an instance was made for: found again after a crash."""

_RESERVED_TAG_PREFIX = "hpcfleet:"


class Subnet(BaseModel):
    """Where a node may be launched; capacity back-off is per instance type and zone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subnet_id: str = Field(min_length=1, description="EC2 subnet id, e.g. subnet-0abc.")
    zone: str = Field(min_length=1, description="Availability zone of the subnet, e.g. eu-west-1a.")


class PoolSpec(BaseModel):
    """One pool: how many warm nodes, launched how, replaced when, within which budgets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$",
        description="Pool name: lower-case letters, digits and dashes, at most 32 characters; "
        "it prefixes node ids and client tokens, so it is kept short.",
    )
    size: int = Field(default=64, ge=0, description="Nodes the pool keeps deployed.")
    instance_types: tuple[str, ...] = Field(
        min_length=1,
        description="Instance types in order of preference; a type backed off for capacity in "
        "every zone gives way to the next.",
    )
    subnets: tuple[Subnet, ...] = Field(
        min_length=1, description="Subnets to launch in; new nodes go to the zone with fewest."
    )
    recipe: str | None = Field(
        default=None,
        description="The bakery recipe whose ImageReady sets `image_id`; None: every recipe's.",
    )
    image_id: str | None = Field(
        default=None,
        description="The current image (from ImageReady); a node on any other image is "
        "outdated. None until the first image is ready, and the pool plans nothing until then.",
    )
    launch_template: str | None = Field(
        default=None,
        description="EC2 launch template (id or name) with the rest of the launch parameters: "
        "security groups, instance profile, user data.",
    )
    warm_state: Literal["stopped"] = Field(
        default="stopped", description="State a provisioned node rests in while idle."
    )
    max_surge_percent: int = Field(
        default=10,
        ge=0,
        le=100,
        description="Nodes above `size` allowed during replacement, as a percentage of size "
        "rounded up.",
    )
    max_unavailable_percent: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Provisioned nodes below `size` allowed during replacement, as a percentage "
        "of size rounded up.",
    )
    max_node_age: timedelta | None = Field(
        default=None,
        ge=timedelta(days=1),
        description="A node older than this is replaced like an outdated one; None: never. At "
        "least a day (as EC2 Auto Scaling's max instance lifetime), so replacing cannot churn.",
    )
    boot_timeout: timedelta = Field(
        default=timedelta(minutes=30),
        ge=timedelta(minutes=1),
        description="A new node not booted this long after launch is terminated and replaced "
        "(ParallelCluster's default).",
    )
    node_name_prefix: str = Field(
        default="node",
        pattern=r"^[a-z][a-z0-9-]{0,40}$",
        description="Scheduler node names are this prefix and a number (node001, node002, ...): "
        "a new node takes the lowest number free, so the names are a small fixed set the "
        "scheduler can declare (size plus surge). Pools must not share a prefix.",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="Extra tags on every instance; keys starting with 'hpcfleet:' are reserved.",
    )

    @field_validator("tags")
    @classmethod
    def _no_reserved_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in tags if k.startswith(_RESERVED_TAG_PREFIX))
        if reserved:
            raise ValueError(f"tag keys {reserved} are reserved for hpcfleet")
        return tags

    @property
    def max_surge(self) -> int:
        """The surge budget in nodes (percentages round up, so any non-zero budget allows one)."""
        return -(-self.size * self.max_surge_percent // 100)

    @property
    def max_unavailable(self) -> int:
        """The unavailability budget in nodes, rounded up like the surge."""
        return -(-self.size * self.max_unavailable_percent // 100)

    def problems(self) -> tuple[str, ...]:
        """Why this spec cannot be acted on; empty when it can."""
        found: list[str] = []
        if self.image_id is None:
            found.append("no image yet: waiting for the first ImageReady")
        if self.max_surge_percent == 0 and self.max_unavailable_percent == 0:
            found.append(
                "invalid budget: max surge and max unavailable are both 0 %, "
                "so no node could ever be replaced"
            )
        return tuple(found)
