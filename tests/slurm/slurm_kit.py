"""Shared pieces of the Slurm tests (a plain module: conftest.py is not importable by name when
several test directories have one): recorded samples, autogrow's hook endpoints on a stand-in
decider (with API auth on), and starting a real test cluster so that a missing Slurm fails the
test instead of skipping it."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.autogrow.decisions import HookOutcome, UnknownNodes
from services.autogrow.policy_store import PoolPolicy
from services.autogrow.service import make_router
from services.autogrow.settings import AutogrowSettings
from shared.api import create_app
from shared.clock import SystemClock
from shared.store import create_engine
from shared.testing.auth_service import AuthService, serve_app
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


class HookServer:
    """autogrow's real hook routes (``POST /autogrow/hooks/{resume,suspend}``) behind its real
    token check, as in production (auth on), on a stand-in decider: it records each call, answers
    404 for the names in `unknown`, and hands the nodes to `on_call` in a thread of its own (as
    autogrow acts after answering), so a test can boot the nodes Slurm asked for. The rest of
    autogrow's routes are there too, for tests of what a hook's token may not do."""

    def __init__(self, auth: AuthService) -> None:
        self.auth = auth
        self.unknown: set[str] = set()
        self.on_call: Callable[[str, list[str]], None] | None = None
        self.calls: list[tuple[str, list[str]]] = []
        engine = create_engine("sqlite+aiosqlite://")  # the hook routes never use it
        settings = AutogrowSettings(scheduler="simulated")
        router = make_router(engine, _RecordingDecider(self), settings)  # type: ignore[arg-type]
        app = create_app(title="autogrow", routers=[router], guard=auth.guard())
        self._serving = serve_app(app)
        self.url = self._serving.__enter__()

    def record(self, action: str, names: Sequence[str]) -> HookOutcome:
        unknown = [n for n in names if n in self.unknown]
        if unknown:
            raise UnknownNodes(unknown)
        self.calls.append((f"/autogrow/hooks/{action}", list(names)))
        if self.on_call is not None:
            threading.Thread(target=self.on_call, args=(action, list(names))).start()
        return HookOutcome(uuid.uuid4(), acted=list(names), unchanged=[])

    def nodes_for(self, action: str) -> list[str]:
        return [n for path, nodes in self.calls if path.endswith(f"/{action}") for n in nodes]

    def close(self) -> None:
        self._serving.__exit__(None, None, None)


class _RecordingDecider:
    """What autogrow's router needs of its decider, for the hooks only."""

    def __init__(self, server: HookServer) -> None:
        self.server = server
        self.mailbox = SimpleNamespace(clock=SystemClock())
        self.default = PoolPolicy()

    async def resume_hook(self, names: Sequence[str]) -> HookOutcome:
        return self.server.record("resume", names)

    async def suspend_hook(self, names: Sequence[str]) -> HookOutcome:
        return self.server.record("suspend", names)
