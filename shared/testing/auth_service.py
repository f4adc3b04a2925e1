"""A real auth service for tests whose callers get tokens the production way (client-credentials
grant), such as Slurm's hooks: its own signing key and client secrets in a directory, served by
uvicorn on a free loopback port in a thread, plus the `ApiGuard` other APIs check its tokens with.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.types import ASGIApp

from shared.api import ApiGuard, create_app
from shared.bus.memory import MemoryBus
from shared.clock import SystemClock
from shared.service import Runtime
from shared.settings import Settings
from shared.store import create_engine
from shared.tokens import TokenVerifier, generate_signing_key


class TlsFiles(Protocol):
    cert: Path
    key: Path


@contextmanager
def serve_app(
    app: ASGIApp, tls: TlsFiles | None = None, *, lifespan: bool = False
) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread (over https with `tls`; with its
    startup and shutdown when `lifespan`); yields its base URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on" if lifespan else "off",
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


@dataclass(frozen=True)
class AuthService:
    url: str
    secret_files: dict[str, Path]  # client id -> the file with its secret (mode 0600)
    public_key: Ed25519PublicKey

    def guard(self) -> ApiGuard:
        """What a service API checks this auth's tokens with (API auth on)."""
        return ApiGuard(TokenVerifier([self.public_key]), SystemClock())


@contextmanager
def serve_auth(directory: Path, clients: Iterable[str] = ("slurm",)) -> Iterator[AuthService]:
    """auth in production mode with a fresh signing key and a random secret per client, all in
    `directory`; its routes are the real ones (services.auth)."""
    from services.auth.service import assemble
    from services.auth.settings import AuthSettings

    directory.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    key_file = _private(
        directory / "token-signing-key.pem",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )
    secret_files = {
        client: _private(directory / f"{client}.secret", secrets.token_urlsafe(32) + "\n")
        for client in clients
    }
    settings = AuthSettings(
        environment="production",
        signing_key=f"file:{key_file}",
        clients={client: f"file:{path}" for client, path in secret_files.items()},
    )
    engine = create_engine(f"sqlite+aiosqlite:///{directory / 'auth.db'}")  # never connected
    runtime = Runtime(Settings(), engine, MemoryBus(), SystemClock())
    service, _context = assemble(runtime, settings)
    with serve_app(create_app(title="auth", routers=[service.router])) as url:
        yield AuthService(url, secret_files, key.public_key())


def _private(path: Path, text: str) -> Path:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path
