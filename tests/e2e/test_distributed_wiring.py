"""The distributed mode for real: each service's API and worker as its own process, over RabbitMQ
and PostgreSQL, with HTTP between the test and the APIs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from distributed_kit import subscribed
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from tests_support import delete_rabbit_namespace, free_port, wait_until

from services.bakery.tables import MAILBOX as BAKERY
from services.pool.tables import images
from shared.clock import SystemClock
from shared.events import ImageReady
from shared.outbox import Mailbox
from shared.testing.processes import Processes, clean_environment
from shared.tokens import TokenIssuer, generate_signing_key, public_key_pem

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]


@pytest.fixture
def operator_token(tmp_path: Path) -> tuple[Path, str]:
    """auth's public key as the APIs read it, and an operator's token signed by auth's key."""
    key = generate_signing_key()
    keys = tmp_path / "token-public-keys.pem"
    keys.write_text(public_key_pem(key.public_key()))
    token = TokenIssuer(key).issue(
        "operator@example.org", "operator", ["bakery:read", "bakery:write"], datetime.now(UTC)
    )
    return keys, token


@pytest.fixture
async def distributed(
    tmp_path: Path,
    pg_engine: AsyncEngine,
    postgres_url: str,
    rabbitmq_url: str,
    exchange_name: str,
    operator_token: tuple[Path, str],
) -> AsyncIterator[tuple[Processes, httpx.AsyncClient]]:
    port = free_port()
    keys, token = operator_token
    env = clean_environment(
        {
            "HPCFLEET_DATABASE_URL": postgres_url,
            "HPCFLEET_BUS_URL": rabbitmq_url,
            "HPCFLEET_EXCHANGE": exchange_name,
            "HPCFLEET_RELAY_INTERVAL": "0.2",
            "HPCFLEET_TOKEN_PUBLIC_KEYS": str(keys),
        }
    )
    processes = Processes(env, tmp_path / "logs")
    processes.worker("pool")
    processes.worker("bakery")
    processes.api("bakery", port)
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {token}"}
    try:
        await processes.wait_healthy(url, name="bakery-api", timeout=60)
        await subscribed(rabbitmq_url, exchange_name, ["pool", "bakery"], alive=processes.check)
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await wait_until(ready, timeout=30, what="bakery API ready")
            yield processes, client
    finally:
        codes = processes.stop_all()
        await delete_rabbit_namespace(rabbitmq_url, exchange_name, ["pool", "bakery"])
    assert set(codes.values()) == {0}, f"{codes}\n{processes.report()}"


async def test_api_outbox_bus_worker_and_effect_in_postgres(
    distributed: tuple[Processes, httpx.AsyncClient], pg_engine: AsyncEngine
) -> None:
    _, client = distributed
    anonymous = await client.post(
        "/bakery/builds", json={"recipe": "linux"}, headers={"authorization": ""}
    )
    assert anonymous.status_code == 401
    accepted = await client.post("/bakery/builds", json={"recipe": "linux", "reason": "e2e"})
    assert accepted.status_code == 202, accepted.text
    build_id = accepted.json()["build_id"]

    async def recorded() -> bool:
        builds = (await client.get("/bakery/builds")).json()
        return [b["build_id"] for b in builds] == [build_id]

    await wait_until(recorded, timeout=20, what="the bakery worker to record the build")


async def test_one_services_outbox_reaches_another_services_handler(
    distributed: tuple[Processes, httpx.AsyncClient], pg_engine: AsyncEngine
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
