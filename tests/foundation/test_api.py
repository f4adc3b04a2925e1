"""The app factory: health, readiness, metrics, docs with stable ids, and errors that say why."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import APIRouter
from pydantic import BaseModel, Field

from services.single import single_process_app
from shared.api import ApiGuard, create_app
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.process import api_guard
from shared.service import Runtime
from shared.settings import ConfigurationError, Settings
from shared.tokens import TokenIssuer, TokenVerifier, generate_signing_key

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Widget(BaseModel):
    size: int = Field(ge=1)


def demo_router() -> APIRouter:
    router = APIRouter(prefix="/demo", tags=["demo"])

    @router.post("/widgets")
    async def make_widget(widget: Widget) -> Widget:
        return widget

    @router.get("/boom")
    async def explode() -> None:
        raise RuntimeError("secret internals")

    return router


async def failing_check() -> None:
    raise ConnectionError("broker unreachable")


async def passing_check() -> None:
    return None


def client_for(app: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_health_readiness_and_metrics() -> None:
    app = create_app(title="t", routers=[demo_router()], readiness=[("database", passing_check)])
    async with client_for(app) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checked"] == ["database"]
        await client.post("/demo/widgets", json={"size": 2})
        metrics = (await client.get("/metrics")).text
        assert 'hpcfleet_http_requests_total{method="POST",route="/demo/widgets",status="200"}' in (
            metrics
        )


async def test_not_ready_names_what_failed() -> None:
    app = create_app(title="t", routers=[], readiness=[("bus", failing_check)])
    async with client_for(app) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == {"bus": "ConnectionError: broker unreachable"}


async def test_bad_input_gets_a_clear_422_and_a_crash_no_traceback() -> None:
    app = create_app(title="t", routers=[demo_router()])
    async with client_for(app) as client:
        bad = await client.post("/demo/widgets", json={"size": 0})
        assert bad.status_code == 422
        assert bad.json()["problems"] == [
            {"where": "body.size", "problem": "Input should be greater than or equal to 1"}
        ]
        crash = await client.get("/demo/boom", headers={"x-correlation-id": "abc-123"})
    assert crash.status_code == 500
    assert "secret internals" not in crash.text
    assert "Traceback" not in crash.text
    assert crash.json()["correlation_id"] == "abc-123"
    assert crash.headers["x-correlation-id"] == "abc-123"


def guarded_app() -> tuple[object, TokenIssuer]:
    key = generate_signing_key()
    issuer = TokenIssuer(key)
    guard = ApiGuard(TokenVerifier([key.public_key()]), ManualClock(NOW))
    return create_app(title="t", routers=[demo_router()], guard=guard), issuer


async def test_service_routes_need_a_token_with_the_right_scope() -> None:
    app, issuer = guarded_app()

    def bearer(*scopes: str) -> dict[str, str]:
        token = issuer.issue("alice", "operator", scopes, NOW)
        return {"authorization": f"Bearer {token}"}

    async with client_for(app) as client:
        missing = await client.post("/demo/widgets", json={"size": 2})
        assert missing.status_code == 401
        assert "bearer token is required" in missing.json()["detail"]
        forged = await client.post(
            "/demo/widgets", json={"size": 2}, headers={"authorization": "Bearer not-a-jwt"}
        )
        assert forged.status_code == 401
        reader = await client.post("/demo/widgets", json={"size": 2}, headers=bearer("demo:read"))
        assert reader.status_code == 403
        assert "demo:write" in reader.json()["detail"]
        writer = await client.post("/demo/widgets", json={"size": 2}, headers=bearer("demo:write"))
        assert writer.status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # probes need no token


def test_a_production_api_refuses_to_start_without_public_keys() -> None:
    settings = Settings(api_auth="required", token_public_keys=None)
    with pytest.raises(ConfigurationError, match="HPCFLEET_TOKEN_PUBLIC_KEYS"):
        api_guard(settings, ManualClock(NOW))
    assert api_guard(Settings(api_auth="disabled"), ManualClock(NOW)) is None


@pytest.fixture
async def whole_app(tmp_path: object) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/h.db", bus_url="memory://")
    runtime = Runtime.from_settings(settings, bus=MemoryBus())
    app = single_process_app(runtime)
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


async def test_openapi_has_every_service_under_its_prefix_with_stable_ids(
    whole_app: httpx.AsyncClient,
) -> None:
    spec = (await whole_app.get("/openapi.json")).json()
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert "bakery_request_build" in ids
    prefixes = {path.split("/")[1] for path in spec["paths"]}
    assert {"bakery", "pool", "autogrow", "healthz", "readyz", "metrics"} <= prefixes
    assert (await whole_app.get("/docs")).status_code == 200


async def test_an_api_request_flows_through_outbox_bus_and_handler(
    whole_app: httpx.AsyncClient,
) -> None:
    accepted = await whole_app.post("/bakery/builds", json={"recipe": "linux", "reason": "test"})
    assert accepted.status_code == 202
    build_id = accepted.json()["build_id"]
    for _ in range(100):
        builds = (await whole_app.get("/bakery/builds")).json()
        if builds:
            break
        import asyncio

        await asyncio.sleep(0.02)
    assert [(b["build_id"], b["status"]) for b in builds] == [(build_id, "queued")]
    assert builds[0]["requested_at"].endswith("Z") or "+00:00" in builds[0]["requested_at"]
