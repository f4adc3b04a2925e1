"""Shared pieces of the Slurm tests (a plain module: conftest.py is not importable by name when
several test directories have one): recorded samples, a stand-in for autogrow's hook endpoints,
and starting a real test cluster so that a missing Slurm fails the test instead of skipping it."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shared.testing.slurm_cluster import SlurmCluster, SlurmNotInstalled

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> dict[str, Any]:
    """A squeue/sinfo output recorded from a real cluster by record_slurm_samples.py."""
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, within: float, what: str, every: float = 0.1
) -> float:
    """Poll `check` (plain or async) until it holds and return the seconds it took; fail saying
    what never happened."""
    started = time.monotonic()
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)


@contextmanager
def running(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """Start `cluster` for a block and stop it after; a missing Slurm fails the test and says
    what to install."""
    try:
        cluster.start()
    except SlurmNotInstalled as exc:
        cluster.stop()
        pytest.fail(f"Slurm is needed for these tests: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class HookServer:
    """Stands in for autogrow's ``POST /autogrow/hooks/{resume,suspend}``: records each call,
    answers `status`, and hands the nodes to `on_call` in a thread of its own (as autogrow acts
    after answering), so a test can boot the nodes Slurm asked for."""

    status: int = 200
    on_call: Callable[[str, list[str]], None] | None = None
    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hooks.calls.append((self.path, body["nodes"]))
                self.send_response(hooks.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"detail": "test answer"}')
                if hooks.on_call is not None:
                    action = self.path.rsplit("/", 1)[-1]
                    threading.Thread(target=hooks.on_call, args=(action, body["nodes"])).start()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def nodes_for(self, action: str) -> list[str]:
        return [n for path, nodes in self.calls if path.endswith(f"/{action}") for n in nodes]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
