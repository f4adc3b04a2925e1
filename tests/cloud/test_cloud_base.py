"""The interface's value types and error mapping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError

from shared.cloud import (
    AccessDenied,
    CloudError,
    Instance,
    InstanceState,
    InsufficientCapacity,
    InvalidState,
    LaunchSpec,
    NotFound,
    Throttled,
    check_client_token,
    error_for_code,
)
from shared.cloud.aws import translate


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("InsufficientInstanceCapacity", InsufficientCapacity),
        ("InsufficientHostCapacity", InsufficientCapacity),
        ("RequestLimitExceeded", Throttled),
        ("Throttling", Throttled),
        ("ThrottlingException", Throttled),
        ("InvalidInstanceID.NotFound", NotFound),
        ("InvalidInstanceID.Malformed", NotFound),
        ("InvalidAMIID.NotFound", NotFound),
        ("InvalidAMIID.Unavailable", NotFound),
        ("InvalidSnapshot.NotFound", NotFound),
        ("IncorrectInstanceState", InvalidState),
        ("UnauthorizedOperation", AccessDenied),
        ("AccessDenied", AccessDenied),
        ("IdempotentParameterMismatch", CloudError),
        ("VcpuLimitExceeded", CloudError),
    ],
)
def test_error_codes_map_to_typed_errors(code: str, kind: type[CloudError]) -> None:
    error = error_for_code(code, "why")
    assert type(error) is kind
    assert (error.code, error.message, str(error)) == (code, "why", f"{code}: why")


def test_a_botocore_client_error_keeps_code_and_message() -> None:
    raw = ClientError(
        {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "none in 1a"}},
        "RunInstances",
    )
    error = translate(raw)
    assert isinstance(error, InsufficientCapacity)
    assert error.message == "none in 1a"


def test_values_are_frozen_and_copy_their_tags() -> None:
    tags = {"cluster": "c1"}
    spec = LaunchSpec("ami-1", "c5.large", tags=tags, security_group_ids=["sg-1"])  # type: ignore[arg-type]
    tags["cluster"] = "changed"

    assert spec.tags == {"cluster": "c1"}
    assert spec.security_group_ids == ("sg-1",)
    assert spec == LaunchSpec(
        "ami-1", "c5.large", tags={"cluster": "c1"}, security_group_ids=("sg-1",)
    )
    assert hash(spec)  # usable as a key even though tags are a mapping
    with pytest.raises(TypeError):
        spec.tags["cluster"] = "x"  # type: ignore[index]
    instance = Instance(
        "i-1", InstanceState.RUNNING, "ami-1", "c5.large", "us-east-1a", {}, datetime.now(UTC)
    )
    with pytest.raises(AttributeError):
        instance.state = InstanceState.STOPPED  # type: ignore[misc]


@pytest.mark.parametrize("token", ["", "x" * 65, "café"])
def test_client_tokens_ec2_would_refuse_are_refused(token: str) -> None:
    with pytest.raises(ValueError):
        check_client_token(token)
    check_client_token("x" * 64)
