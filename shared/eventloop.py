"""The event loop every hpcfleet process runs on: uvloop.

uvloop (a pinned dependency) runs the loop, its sockets and its callbacks in C; on the outbox
benchmark (tests/benchmarks/bench_outbox_e2e.py) it takes 8-25 % off the Python CPU time per
message of the relay and the consumer, whose work is mostly the event loop turning over socket
reads and writes. The standard loop is used only where uvloop cannot be imported at all (it has no
build for Windows, for instance); both run the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency; a platform without a build
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")

LoopName = Literal["uvloop", "asyncio"]

LOOP: LoopName = "uvloop" if uvloop is not None else "asyncio"
"""The loop the processes run on (also uvicorn's `loop` setting for the APIs)."""


def loop_factory(name: LoopName = LOOP) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        if uvloop is None:
            raise RuntimeError("uvloop is not installed")
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], *, loop: LoopName = LOOP) -> T:
    """`asyncio.run(main)` on `loop` (by default hpcfleet's: uvloop)."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
