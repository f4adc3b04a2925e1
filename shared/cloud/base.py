"""The cloud boundary: the EC2 operations hpcfleet needs, as one async interface.

Two implementations obey it: `AwsCloud` (aioboto3, real AWS or a moto server) and `FakeCloud`
(in memory, for unit tests and scale runs). One contract test suite runs against both, so code that
works on the fake works on AWS. Errors are typed so callers react to *what* went wrong (back off on
capacity, retry a throttle, treat "not found" as gone) without knowing botocore.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

MAX_CLIENT_TOKEN_LENGTH = 64  # EC2's limit for ClientToken


class InstanceState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SHUTTING_DOWN = "shutting-down"
    TERMINATED = "terminated"


class ImageState(StrEnum):
    PENDING = "pending"
    AVAILABLE = "available"
    INVALID = "invalid"
    DEREGISTERED = "deregistered"
    TRANSIENT = "transient"
    FAILED = "failed"
    ERROR = "error"
    DISABLED = "disabled"


def _frozen_tags(tags: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only copy, so a caller mutating its dict cannot change a frozen value."""
    return MappingProxyType(dict(tags))


@dataclass(frozen=True)
class Instance:
    """One EC2 instance as last described."""

    instance_id: str
    state: InstanceState
    image_id: str
    instance_type: str
    zone: str
    tags: Mapping[str, str] = field(hash=False)
    launch_time: datetime  # the last start: EC2 billing counts from here
    private_ip: str | None = None
    client_token: str | None = None  # RunInstances' ClientToken: finds a launch after a crash
    subnet_id: str | None = None
    state_since: datetime | None = None  # when it entered `state`, where the provider says

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _frozen_tags(self.tags))


@dataclass(frozen=True)
class Image:
    """One machine image (AMI)."""

    image_id: str
    name: str
    state: ImageState
    tags: Mapping[str, str] = field(hash=False)
    created_at: datetime
    description: str | None = None
    snapshot_ids: tuple[str, ...] = ()
    owner_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _frozen_tags(self.tags))
        object.__setattr__(self, "snapshot_ids", tuple(self.snapshot_ids))


@dataclass(frozen=True)
class LaunchTemplateRef:
    """A launch template by id (``lt-...``) or by name, and which version to use."""

    template: str
    version: str = "$Default"


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch: enough for a pool of compute nodes and an image builder, nothing more.

    `tags` go on the instances and their volumes, so every cost is attributable.
    `iam_instance_profile` is a profile name or ARN.
    """

    image_id: str
    instance_type: str
    subnet_id: str | None = None
    zone: str | None = None
    security_group_ids: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    user_data: str | None = None
    iam_instance_profile: str | None = None
    launch_template: LaunchTemplateRef | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _frozen_tags(self.tags))
        object.__setattr__(self, "security_group_ids", tuple(self.security_group_ids))


class CloudError(Exception):
    """Any failure at the cloud boundary; `code` is the provider's error code, kept for logs."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class InsufficientCapacity(CloudError):
    """The zone has no capacity for this instance type now: back off, or try another zone/type."""


class Throttled(CloudError):
    """The API rate limit was hit: retry later with backoff."""


class NotFound(CloudError):
    """The instance, image or snapshot does not exist (or no longer does)."""


class InvalidState(CloudError):
    """The resource's state does not allow the operation (e.g. start a terminated instance)."""


class AccessDenied(CloudError):
    """The credentials are not allowed to do this, or are no longer valid."""


_CODES: Mapping[str, type[CloudError]] = {
    "InsufficientInstanceCapacity": InsufficientCapacity,
    "InsufficientHostCapacity": InsufficientCapacity,
    "InsufficientReservedInstanceCapacity": InsufficientCapacity,
    "InsufficientCapacityOnHost": InsufficientCapacity,
    "RequestLimitExceeded": Throttled,
    "TooManyRequestsException": Throttled,
    "SlowDown": Throttled,
    "IncorrectInstanceState": InvalidState,
    "IncorrectState": InvalidState,
    "UnauthorizedOperation": AccessDenied,
    "AccessDenied": AccessDenied,
    "AccessDeniedException": AccessDenied,
    "AuthFailure": AccessDenied,
    "ExpiredToken": AccessDenied,
}


def error_for_code(code: str, message: str = "") -> CloudError:
    """The typed error for a provider error code; codes we do not classify give a CloudError."""
    kind = _CODES.get(code)
    if kind is None:
        if code.startswith("Throttl") or code.startswith("RequestThrottled"):
            kind = Throttled
        elif (
            code.startswith(("InvalidInstanceID.", "InvalidAMIID."))
            or code.endswith(".NotFound")
            or code.endswith(".NotFoundException")
        ):
            kind = NotFound
        else:
            kind = CloudError
    return kind(code, message)


def check_client_token(token: str) -> None:
    """Refuse tokens EC2 would refuse, before anything is launched."""
    if not token or len(token) > MAX_CLIENT_TOKEN_LENGTH or not token.isascii():
        raise ValueError(f"a client token is 1 to {MAX_CLIENT_TOKEN_LENGTH} ASCII characters")


class Cloud(Protocol):
    """The EC2 operations hpcfleet uses. Every method may raise a `CloudError`.

    A filter left at None does not filter; an empty `ids` or `states` matches nothing (and makes
    no call). Deleting what is already gone is success, so retries and garbage collection are
    safe.
    """

    async def run_instances(
        self, spec: LaunchSpec, count: int, client_token: str
    ) -> list[Instance]:
        """Launch exactly `count` instances, or none.

        `client_token` is required and derived from the caller's intent row: a retry with the same
        token returns the same instances instead of launching again; the same token with a
        different spec or count raises CloudError("IdempotentParameterMismatch").
        """
        ...

    async def start_instances(self, ids: Sequence[str]) -> None:
        """Start stopped instances; starting a running one is a no-op."""
        ...

    async def stop_instances(self, ids: Sequence[str]) -> None:
        """Stop running instances; stopping a stopped one is a no-op."""
        ...

    async def terminate_instances(self, ids: Sequence[str]) -> None:
        """Terminate instances; ids that are already terminated or unknown are success."""
        ...

    async def describe_instances(
        self,
        ids: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        states: Collection[InstanceState] | None = None,
    ) -> list[Instance]:
        """Instances matching all given filters; `tags` match keys and values exactly.

        Unknown `ids` raise NotFound, as EC2 does.
        """
        ...

    async def booted_instances(self, ids: Sequence[str]) -> set[str]:
        """Those of `ids` that are running and finished booting since their last start (EC2:
        DescribeInstanceStatus with both status checks passed). Unknown ids are simply absent:
        a caller asks about instances it just saw, which may vanish meanwhile."""
        ...

    async def create_image(
        self,
        instance_id: str,
        name: str,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> str:
        """Start imaging an instance; returns the new image id (the image may still be pending)."""
        ...

    async def describe_images(
        self,
        ids: Sequence[str] | None = None,
        owners: Sequence[str] | None = None,
        name_pattern: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Image]:
        """Images matching all given filters.

        `owners` defaults to ``["self"]`` unless `ids` are given, because the public catalogue is
        huge. `name_pattern` takes EC2 wildcards (``*``, ``?``). Unknown `ids` raise NotFound;
        deregistered ones are simply absent.
        """
        ...

    async def deregister_image(self, image_id: str, delete_snapshots: bool = True) -> None:
        """Deregister an image and, by default, delete its snapshots; an image already gone is
        success."""
        ...

    async def create_tags(self, resource_ids: Sequence[str], tags: Mapping[str, str]) -> None:
        """Add or overwrite tags on instances, images or snapshots."""
        ...
