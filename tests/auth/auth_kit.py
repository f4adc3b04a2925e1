"""Helpers for the auth tests: the users of the development IdP, a uvicorn runner, waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.auth.devidp import DevUser, LoopbackTls, role_value
from shared.testing.auth_service import serve_app

ACCOUNT = "123456789012"
PROVIDER = f"arn:aws:iam::{ACCOUNT}:saml-provider/ADFS"
ISSUER = "http://adfs.example.test/adfs/services/trust"


def role_arn(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/hpcfleet-{name}"


USERS = (
    DevUser(
        "EXAMPLE\\alice",
        "alice-Secret-1",
        roles=(role_value(role_arn("operator"), PROVIDER),),
        session_name="alice@example.test",
    ),
    DevUser(
        "carol@example.test",
        "carol-Secret-1",
        roles=(role_value(role_arn("operator"), PROVIDER),),
        mfa_code="246810",
    ),
    DevUser(
        "dave@example.test",
        "dave-Secret-1",
        roles=(role_value(role_arn("operator"), PROVIDER),),
        locked=True,
    ),
    DevUser(
        "multi@example.test",
        "multi-Secret-1",
        # Both orders of the pair, as AWS's docs and AD FS claim rules write them.
        roles=(f"{role_arn('pool')},{PROVIDER}", f"{PROVIDER},{role_arn('bakery')}"),
    ),
)


Tls = LoopbackTls  # the development IdP's own self-signed certificate for 127.0.0.1


serve = serve_app  # one loopback server for every test kit (shared/testing/auth_service.py)


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Let background tasks (and the servers' threads) run until `condition` holds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
