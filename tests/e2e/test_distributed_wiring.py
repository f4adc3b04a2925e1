"""The distributed mode for real: each service's API and worker as its own process, over RabbitMQ
and PostgreSQL, with HTTP between the test and the APIs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.bakery.tables import MAILBOX as BAKERY
from services.pool.tables import images
from shared.clock import SystemClock
from shared.events import ImageReady
from shared.outbox import Mailbox
from tests_support import delete_rabbit_namespace, free_port, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]


class Processes:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, *args], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.running.append(process)
        return process

    def stop_all(self) -> list[int]:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in self.running:
            try:
                codes.append(process.wait(timeout=20))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes


@pytest.fixture
async def distributed(
    pg_engine: AsyncEngine, postgres_url: str, rabbitmq_url: str, exchange_name: str
) -> AsyncIterator[tuple[Processes, str]]:
    port = free_port()
    env = {
        **os.environ,
        "HPCFLEET_DATABASE_URL": postgres_url,
        "HPCFLEET_BUS_URL": rabbitmq_url,
        "HPCFLEET_EXCHANGE": exchange_name,
        "HPCFLEET_RELAY_INTERVAL": "0.2",
        "HPCFLEET_API_PORT": str(port),
    }
    processes = Processes(env)
    processes.start("-m", "services.pool.worker")
    processes.start("-m", "services.bakery.worker")
    processes.start("-m", "services.cli", "serve", "bakery")
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=30, what="bakery API ready")
        yield processes, base
    finally:
        codes = processes.stop_all()
        await delete_rabbit_namespace(rabbitmq_url, exchange_name, ["pool", "bakery"])
    assert codes == [0, 0, 0], [p.stderr.read().decode()[-2000:] for p in processes.running if p.stderr]


async def test_api_outbox_bus_worker_and_effect_in_postgres(
    distributed: tuple[Processes, str], pg_engine: AsyncEngine
) -> None:
    _, base = distributed
    async with httpx.AsyncClient(base_url=base) as client:
        accepted = await client.post("/bakery/builds", json={"recipe": "linux", "reason": "e2e"})
        assert accepted.status_code == 202
        build_id = accepted.json()["build_id"]

        async def queued() -> bool:
            builds = (await client.get("/bakery/builds")).json()
            return [(b["build_id"], b["status"]) for b in builds] == [(build_id, "queued")]

        await wait_until(queued, timeout=20, what="the bakery worker to record the build")


async def test_one_services_outbox_reaches_another_services_handler(
    distributed: tuple[Processes, str], pg_engine: AsyncEngine
) -> None:
    now = datetime.now(UTC)
    event = ImageReady(
        recipe="linux",
        images={"us-east-1": "ami-0e2e0000000000001"},
        version="2026.11.1",
        base_image="ami-0base",
        built_at=now,
        occurred_at=now,
    )
    async with Mailbox(BAKERY, pg_engine, SystemClock()).transaction() as tx:
        tx.emit(event)  # as bakery would; bakery's relay (another process) publishes it

    async def image_known() -> bool:
        async with pg_engine.connect() as conn:
            rows = (await conn.execute(select(images.c.image_id, images.c.version))).all()
        return [tuple(r) for r in rows] == [("ami-0e2e0000000000001", "2026.11.1")]

    await wait_until(image_known, timeout=20, what="pool to record the image in PostgreSQL")


