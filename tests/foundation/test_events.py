"""The message catalogue: complete, frozen, described, and its committed schema up to date."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

import shared
from shared.events import (
    CATALOGUE,
    BuildImage,
    ImageReady,
    InvalidMessage,
    PowerOn,
    QueueDepthChanged,
    catalogue_schema_json,
    decode,
    encode,
)
from shared.scheduler import NodeActivity, PartitionDemand, QueueSnapshot, SchedulerNode

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SCHEMA_FILE = Path(shared.__file__).parent / "messages.schema.json"


def test_catalogue_has_every_message_of_the_architecture() -> None:
    assert set(CATALOGUE) == {
        "BuildImage",
        "ImageReady",
        "ImageRetired",
        "NodeProvisioned",
        "NodeRetired",
        "NodeRetiring",
        "PowerOn",
        "PowerOff",
        "NodePowerChanged",
        "PowerRefused",
        "QueueDepthChanged",
    }
    assert CATALOGUE["BuildImage"].kind == "command"
    assert CATALOGUE["ImageReady"].kind == "event"


def test_committed_schema_matches_the_models() -> None:
    assert SCHEMA_FILE.read_text() == catalogue_schema_json(), (
        "shared/messages.schema.json drifted: regenerate it with "
        "`python -m shared.events > shared/messages.schema.json`"
    )


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_field_is_described(name: str) -> None:
    for field_name, field in CATALOGUE[name].model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"


def test_messages_are_frozen_and_reject_unknown_fields() -> None:
    command = BuildImage(recipe="linux", reason="monthly", occurred_at=NOW)
    with pytest.raises(ValidationError):
        command.recipe = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        BuildImage(recipe="linux", reason="x", occurred_at=NOW, colour="red")  # type: ignore[call-arg]


def test_time_must_be_timezone_aware() -> None:
    with pytest.raises(ValidationError):
        BuildImage(recipe="linux", reason="x", occurred_at=datetime(2026, 1, 1))


def test_round_trip_keeps_ids_and_snapshot() -> None:
    snapshot = QueueSnapshot(
        taken_at=NOW,
        partitions=(PartitionDemand(partition="batch", pending_jobs=3, pending_cores=96),),
        running_jobs=2,
        nodes=(SchedulerNode(name="node001", activity=NodeActivity.BUSY, cpus=32),),
    )
    event = QueueDepthChanged(snapshot=snapshot, occurred_at=NOW)
    again = decode("QueueDepthChanged", encode(event))
    assert again == event
    assert again.message_id == event.message_id
    assert isinstance(again, QueueDepthChanged)
    assert again.snapshot.pending_cores == 96


def test_decode_says_what_is_wrong() -> None:
    with pytest.raises(InvalidMessage, match="unknown message type 'Nope'"):
        decode("Nope", b"{}")
    with pytest.raises(InvalidMessage, match="recipe"):
        decode("BuildImage", b'{"reason": "x", "occurred_at": "2026-01-01T00:00:00Z"}')
    with pytest.raises(InvalidMessage, match="invalid PowerOn"):
        decode("PowerOn", b"not json")


def test_commands_need_their_targets() -> None:
    with pytest.raises(ValidationError):
        PowerOn(node_ids=(), reason="jobs wait", decision_id=uuid.uuid4(), occurred_at=NOW)
    with pytest.raises(ValidationError):
        ImageReady(
            recipe="linux",
            images={},
            version="1",
            base_image="ami-1",
            built_at=NOW,
            occurred_at=NOW,
        )
