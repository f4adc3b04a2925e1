"""Small helpers the integration tests share (waiting, ports, cleaning the shared broker)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import aio_pika


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout: float,  # noqa: ASYNC109 (a polling deadline, not a cancellation scope)
    what: str,
    every: float = 0.1,
) -> None:
    """Poll `condition` until it holds; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def delete_rabbit_namespace(url: str, exchange: str, consumers: Sequence[str]) -> None:
    """Remove a test's exchanges and queues from the shared broker."""
    connection = await aio_pika.connect(url)
    try:
        for name in [f"{exchange}.{c}" for c in consumers] + [
            f"{exchange}.{c}.dead" for c in consumers
        ]:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
        for name in (exchange, f"{exchange}.dead"):
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(name)
    finally:
        await connection.close()
