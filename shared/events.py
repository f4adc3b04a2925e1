"""The message catalogue: every event and command that crosses the bus, in one place.

The routing key is the class name. A breaking change is a new name; adding an optional field is
not. Events say what happened and carry state (snapshots), never deltas; commands ask one owner.
`python -m shared.events` prints the JSON schema committed as `shared/messages.schema.json`.
"""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from shared.scheduler import QueueSnapshot


class Message(BaseModel):
    """Fields every message carries, besides its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[Literal["event", "command"]]

    schema_version: int = Field(default=1, ge=1, description="Version of this message's schema.")
    message_id: uuid.UUID = Field(
        default_factory=uuid.uuid4, description="Unique id; consumers deduplicate on it."
    )
    occurred_at: AwareDatetime = Field(description="When it happened or was asked, UTC.")
    correlation_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Shared by every message caused by one request or decision, for tracing.",
    )

    @classmethod
    def name(cls) -> str:
        """The routing key."""
        return cls.__name__


class Event(Message):
    """Something happened; zero or more services may react."""

    kind: ClassVar[Literal["event", "command"]] = "event"


class Command(Message):
    """Please do this; exactly one service owns the handling."""

    kind: ClassVar[Literal["event", "command"]] = "command"


class BillingModel(StrEnum):
    PER_SECOND = "per-second"  # Linux, Windows, RHEL on demand: per second, 60 s minimum a start
    HOURLY = "hourly"  # SUSE and some Marketplace images: every started hour is paid


class RetireReason(StrEnum):
    OUTDATED = "outdated"
    EXPIRED = "expired"
    UNHEALTHY = "unhealthy"
    SHRINK = "shrink"


class PowerState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class BuildImage(Command):
    """Bake a new image from a recipe (from the schedule, the API or an operator)."""

    recipe: str = Field(min_length=1, description="Name of the recipe to build.")
    reason: str = Field(min_length=1, description="Why: schedule, on demand by whom, ...")


class ImageReady(Event):
    """A new image was built and validated; pools should roll onto it."""

    recipe: str = Field(min_length=1, description="Recipe the image was built from.")
    images: dict[str, str] = Field(
        min_length=1, description="Image id per region, e.g. {'us-east-1': 'ami-0123'}."
    )
    version: str = Field(min_length=1, description="Image version, e.g. 2026.11.1.")
    base_image: str = Field(min_length=1, description="Image id the build started from.")
    built_at: AwareDatetime = Field(description="When the build finished.")
    billing: BillingModel = Field(
        default=BillingModel.PER_SECOND, description="How instances of this image are billed."
    )


class ImageRetired(Event):
    """An image must no longer be used for new nodes."""

    image_id: str = Field(min_length=1, description="The retired image.")
    reason: str = Field(min_length=1, description="Why it was retired.")


class NodeProvisioned(Event):
    """A pool node exists and is warm (or about to be); the scheduler may know it by name."""

    node_id: str = Field(min_length=1, description="The pool's id for the node.")
    instance_id: str = Field(min_length=1, description="EC2 instance id.")
    image_id: str = Field(min_length=1, description="Image the node runs.")
    instance_type: str = Field(min_length=1, description="EC2 instance type.")
    zone: str = Field(min_length=1, description="Availability zone.")
    scheduler_node_name: str = Field(min_length=1, description="Node name in the scheduler.")
    pool: str = Field(default="default", min_length=1, description="Pool the node belongs to.")
    billing: BillingModel = Field(
        default=BillingModel.PER_SECOND, description="Billing model of the node's image."
    )


class NodeRetired(Event):
    """A node left the pool (its instance is being terminated)."""

    node_id: str = Field(min_length=1, description="The pool's id for the node.")
    instance_id: str | None = Field(description="EC2 instance id, if it was ever launched.")
    reason: RetireReason = Field(description="Why the node was retired.")
    scheduler_node_name: str | None = Field(
        default=None, description="Node name in the scheduler, if any."
    )


class NodeRetiring(Event):
    """A node is to be replaced, but it may be running jobs: it stays until it is powered off.

    Prefer other nodes for new work and power this one off when it is idle; the pool then
    replaces it (`NodeRetired` follows when its instance goes).
    """

    node_id: str = Field(min_length=1, description="The pool's id for the node.")
    instance_id: str = Field(min_length=1, description="EC2 instance id.")
    reason: RetireReason = Field(description="Why the node is being replaced.")
    scheduler_node_name: str | None = Field(
        default=None, description="Node name in the scheduler, if any."
    )


class PowerOn(Command):
    """Start these warm nodes."""

    node_ids: tuple[str, ...] = Field(min_length=1, description="Pool node ids to start.")
    reason: str = Field(min_length=1, description="Why, for the decision log.")
    decision_id: uuid.UUID = Field(description="The autogrow decision that asked for it.")


class PowerOff(Command):
    """Stop these nodes (they were drained first)."""

    node_ids: tuple[str, ...] = Field(min_length=1, description="Pool node ids to stop.")
    reason: str = Field(min_length=1, description="Why, for the decision log.")
    decision_id: uuid.UUID = Field(description="The autogrow decision that asked for it.")


class NodePowerChanged(Event):
    """A node's power state changed; for running nodes `since` is when billing started."""

    node_id: str = Field(min_length=1, description="The pool's id for the node.")
    state: PowerState = Field(description="The new power state.")
    since: AwareDatetime = Field(description="When the node entered this state.")
    scheduler_node_name: str | None = Field(
        default=None, description="Node name in the scheduler, if any."
    )
    billing: BillingModel = Field(
        default=BillingModel.PER_SECOND, description="Billing model of the node's image."
    )
    provisioning: bool = Field(
        default=False,
        description="True for a new node's first boot, before its NodeProvisioned: EC2 bills "
        "it like any run (running when it is first seen up; stopped when the pool stops it, or "
        "the instance goes, to end the boot), but the node is not the scheduler's yet, so "
        "count it for cost only.",
    )


class PowerRefused(Event):
    """The pool did not act on a PowerOn / PowerOff for this node, and why."""

    node_id: str = Field(min_length=1, description="The pool's id for the node, as asked.")
    command: Literal["PowerOn", "PowerOff"] = Field(description="The command refused.")
    reason: str = Field(min_length=1, description="Why it was refused.")
    decision_id: uuid.UUID = Field(description="The autogrow decision that asked for it.")
    scheduler_node_name: str | None = Field(
        default=None, description="Node name in the scheduler, if the node is known."
    )


class QueueDepthChanged(Event):
    """The scheduler's whole queue, as a snapshot."""

    snapshot: QueueSnapshot = Field(description="Pending, running and per-node state.")


CATALOGUE: dict[str, type[Message]] = {
    cls.name(): cls
    for cls in (
        BuildImage,
        ImageReady,
        ImageRetired,
        NodeProvisioned,
        NodeRetired,
        NodeRetiring,
        PowerOn,
        PowerOff,
        NodePowerChanged,
        PowerRefused,
        QueueDepthChanged,
    )
}


class InvalidMessage(Exception):
    """A body that is not a valid message of the named type: dead-letter it, with this reason."""


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()


def decode(name: str, body: bytes) -> Message:
    """Parse a body of the given routing key, or raise InvalidMessage saying what is wrong."""
    cls = CATALOGUE.get(name)
    if cls is None:
        raise InvalidMessage(f"unknown message type {name!r}")
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidMessage(f"invalid {name}: {details}") from None


def catalogue_schema() -> dict[str, Any]:
    """One JSON schema document describing every message, keyed by routing key."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hpcfleet messages",
        "messages": {
            name: {"kind": cls.kind, "schema": cls.model_json_schema(mode="serialization")}
            for name, cls in sorted(CATALOGUE.items())
        },
    }


def catalogue_schema_json() -> str:
    return json.dumps(catalogue_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(catalogue_schema_json(), end="")
