"""Shared pieces of the cloud tests (a plain module: conftest.py is not importable by name
when several test directories have one)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shared.cloud import Cloud

REGION = "us-east-1"
TEST_CREDENTIALS = ("testing", "testing", "testing")
# the HTTP status EC2 sends with these codes; anything else gets 400
EC2_STATUS = {"InsufficientInstanceCapacity": 500, "RequestLimitExceeded": 503}


def action_name(operation: str) -> str:
    """The EC2 API action behind a Cloud method: run_instances -> RunInstances."""
    return "".join(word.capitalize() for word in operation.split("_"))


@dataclass
class Backend:
    """One Cloud implementation plus the test-only controls the contract suite needs."""

    name: str
    cloud: Cloud
    fail_next: Callable[[str, str], None]  # (Cloud method name, EC2 error code)
    snapshot_exists: Callable[[str], Awaitable[bool]]
