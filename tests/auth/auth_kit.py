"""Helpers for the auth tests: the users of the development IdP, a uvicorn runner, waiting."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from services.auth.devidp import DevUser, role_value

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


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@contextmanager
def serve(app: ASGIApp, tls: Tls | None = None) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread; yields its base URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Let background tasks (and the servers' threads) run until `condition` holds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
