"""What the schemathesis run (test_api_fuzz.py) found, one focused regression test each.

1. A guarded route read the body before the token: a caller without a token got 422 (or 400)
   for a body that did not parse, and 404 for a path under the prefix that has no route; now a
   valid token comes first (401), then everything else.
2. The documents declared FastAPI's default 422 body (`detail` a list), while the app answers
   `{"detail": "...", "problems": [...]}`; guarded routes did not declare 401/403 at all, nor
   routes with a body 400; `/metrics` claimed JSON, `/readyz` did not declare its 503. Now the
   document says what the app answers (`shared.api.declare_errors`).
3. pool's own 422s had `detail` as an object (`{"problem": ..., "problems": [...]}`): now the
   same `InvalidRequest` body as every 422.
4. auth's token endpoint answered a form field over the form parser's 1 MB limit with a bare
   `{"detail"}` 400, not the OAuth2 error its document (and RFC 6749) promise.
5. On PostgreSQL (the production store) a NUL character in a path, query or body string reached
   the database, which refuses it: a 500 (`GET /pool/pools/%00`, `GET /bakery/builds?recipe=%00`,
   a JSON body with a string holding one). Now every route refuses it at the edge with a 422.
6. auth logged a refused grant's `grant_type` and `client_id` as sent: a newline in either
   forged a log line. Now control characters are escaped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

import httpx
import jsonschema
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.migrations import upgrade
from services.auth.api import SAML2_BEARER
from services.auth.service import assemble as assemble_auth
from services.auth.settings import AuthSettings
from services.bakery.recipes import load_recipes
from services.bakery.service import assemble as assemble_bakery
from services.bakery.settings import BakerySettings
from services.pool.service import assemble as assemble_pool
from services.pool.settings import PoolSettings
from shared.api import NUL_REFUSED, ApiGuard, InvalidRequest, create_app
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.cloud.fake import FakeCloud
from shared.service import Runtime
from shared.settings import Settings
from shared.store import create_engine
from shared.tokens import TokenIssuer, TokenVerifier, generate_signing_key

NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


class Thing(BaseModel):
    name: str
    size: int


def _things() -> APIRouter:
    router = APIRouter(prefix="/things", tags=["things"])

    @router.put("/{name}")
    async def put_thing(name: str, thing: Thing) -> Thing:
        return thing

    @router.get("/{name}")
    async def get_thing(name: str) -> Thing:
        return Thing(name=name, size=1)

    return router


@asynccontextmanager
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def _guarded() -> tuple[FastAPI, str]:
    key = generate_signing_key()
    clock = ManualClock(NOW)
    app = create_app(
        title="things",
        routers=[_things()],
        guard=ApiGuard(TokenVerifier([key.public_key()]), clock),
    )
    token = TokenIssuer(key).issue("someone", "operator", ["things:read", "things:write"], NOW)
    return app, token


def _response_schema(app: FastAPI, path: str, method: str, status: int) -> dict[str, object]:
    document = app.openapi()
    content = document["paths"][path][method]["responses"][str(status)]["content"]
    schema: dict[str, object] = {
        **content["application/json"]["schema"],
        "components": document["components"],
    }
    return schema


async def test_without_a_valid_token_a_guarded_route_answers_401_before_reading_the_body() -> None:
    app, token = _guarded()
    json = {"Content-Type": "application/json"}
    async with _client(app) as client:
        anonymous = await client.put("/things/a", content=b"\x00", headers=json)
        junk = await client.put(
            "/things/a", content=b"\x00", headers={**json, "Authorization": "Bearer x.y.z"}
        )
        unknown = await client.get("/things/a/b/c")
        signed_in = await client.put(
            "/things/a", content=b"\x00", headers={**json, "Authorization": f"Bearer {token}"}
        )
        unknown_signed_in = await client.get(
            "/things/a/b/c", headers={"Authorization": f"Bearer {token}"}
        )
    assert anonymous.status_code == 401, anonymous.text
    assert "bearer token is required" in anonymous.json()["detail"]
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert junk.status_code == 401, junk.text
    assert unknown.status_code == 401, unknown.text
    assert signed_in.status_code == 422, signed_in.text
    assert unknown_signed_in.status_code == 404


async def test_a_422_has_the_body_the_document_declares() -> None:
    app, token = _guarded()
    async with _client(app) as client:
        response = await client.put(
            "/things/a",
            json={"name": "a", "size": "big"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 422
    jsonschema.validate(response.json(), _response_schema(app, "/things/{name}", "put", 422))
    assert InvalidRequest.model_validate(response.json()).problems[0].where == "body.size"


def test_the_document_declares_the_errors_and_the_health_routes_as_they_answer() -> None:
    app, _ = _guarded()
    document = app.openapi()
    put = document["paths"]["/things/{name}"]["put"]["responses"]
    get = document["paths"]["/things/{name}"]["get"]["responses"]
    assert {"400", "401", "403", "422"} <= put.keys()
    assert {"401", "403", "422"} <= get.keys() and "400" not in get  # no body to misread
    assert "HTTPValidationError" not in document["components"]["schemas"]
    health = document["paths"]["/healthz"]["get"]["responses"]
    assert "401" not in health and "422" not in health
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]


async def test_readyz_answers_what_it_declares_when_a_check_fails() -> None:
    async def down() -> None:
        raise ConnectionError("no database")

    app = create_app(title="t", routers=[], readiness=[("database", down)])
    async with _client(app) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    jsonschema.validate(response.json(), _response_schema(app, "/readyz", "get", 503))
    assert response.json()["failed"] == {"database": "ConnectionError: no database"}


async def test_pool_422s_have_the_same_body_as_every_422(tmp_path: Path) -> None:
    clock = ManualClock(NOW)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
    await upgrade(engine)
    pool = assemble_pool(
        Runtime(Settings(), engine, MemoryBus(), clock), PoolSettings(), FakeCloud(clock=clock)
    )
    app = create_app(title="pool", routers=[pool.service.router])
    spec = {
        "name": "hpc",
        "size": 2,
        "instance_types": ["c7i.large"],
        "subnets": [{"subnet_id": "subnet-a", "zone": "us-east-1a"}],
        "max_surge_percent": 0,
        "max_unavailable_percent": 0,
    }
    try:
        async with _client(app) as client:
            budget = await client.put("/pool/pools/hpc", json=spec)
            name = await client.put("/pool/pools/other", json=spec)
    finally:
        await engine.dispose()
    schema = _response_schema(app, "/pool/pools/{name}", "put", 422)
    for response in (budget, name):
        assert response.status_code == 422, response.text
        jsonschema.validate(response.json(), schema)
    assert budget.json()["detail"] == "the pool could not act on this spec"
    assert "invalid budget" in budget.json()["problems"][0]["problem"]
    assert name.json()["detail"] == "the body names pool 'hpc', the path 'other'"


async def test_auth_answers_a_form_field_over_the_parser_limit_with_an_oauth_error(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}")
    runtime = Runtime(Settings(), engine, MemoryBus(), ManualClock(NOW))
    service, _ = assemble_auth(runtime, AuthSettings(environment="development"))
    app = create_app(title="auth", routers=[service.router])
    # 1.1 MB of two-byte characters: within `assertion`'s 400,000 characters, yet the form
    # parser refuses the field (over its 1 MB) before FastAPI validates it
    try:
        async with _client(app) as client:
            response = await client.post(
                "/auth/token", data={"grant_type": SAML2_BEARER, "assertion": "é" * 350_000}
            )
    finally:
        await engine.dispose()
    assert response.status_code == 400, response.text[:300]
    body = response.json()
    assert body["error"] == "invalid_request"
    assert "exceeded maximum size" in body["error_description"]
    jsonschema.validate(body, _response_schema(app, "/auth/token", "post", 400))


@pytest.mark.postgres
async def test_nul_characters_are_refused_at_the_edge_not_by_postgresql(
    pg_engine: AsyncEngine,
) -> None:
    """PostgreSQL refuses a NUL in text and JSON ("invalid byte sequence for encoding UTF8:
    0x00"): GET /pool/pools/%00 was a 500. Every route's path, query and body are checked."""
    clock = ManualClock(NOW)
    runtime = Runtime(Settings(), pg_engine, MemoryBus(), clock)
    pool = assemble_pool(runtime, PoolSettings(), FakeCloud(clock=clock))
    recipes = Path(str(files("services.bakery").joinpath("examples/recipes.json")))
    bakery = assemble_bakery(
        runtime, BakerySettings(recipes=recipes), load_recipes(recipes), None, unavailable="-"
    )
    app = create_app(title="t", routers=[pool.service.router, bakery.service.router])
    async with _client(app) as client:
        path = await client.get("/pool/pools/a%00b")
        nodes = await client.get("/pool/pools/hpc/nodes", params={"image_id": "ami-\x00"})
        query = await client.get("/bakery/builds", params={"recipe": "linux\x00"})
        body = await client.post("/bakery/builds", json={"recipe": "linux", "reason": "a\x00"})
        key = await client.put(
            "/pool/pools/hpc",
            json={
                "name": "hpc",
                "instance_types": ["c7i.large"],
                "subnets": [{"subnet_id": "subnet-a", "zone": "us-east-1a"}],
                "tags": {"team\x00": "x"},
            },
        )
        fine = await client.get("/bakery/builds", params={"recipe": "linux"})
    where = {
        "path": (path, "path.name"),
        "nodes": (nodes, "query.image_id"),
        "query": (query, "query.recipe"),
        "body": (body, "body.reason"),
        "key": (key, "body.tags.team\x00"),
    }
    for name, (response, at) in where.items():
        assert response.status_code == 422, (name, response.text)
        problem = InvalidRequest.model_validate(response.json()).problems[0]
        assert (problem.where, problem.problem) == (at, NUL_REFUSED), name
    assert fine.status_code == 200


async def test_a_refused_grant_cannot_forge_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fuzz run's logs showed form fields logged as sent: a newline in `grant_type` or
    `client_id` started a line of the caller's making in the console log format."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}")
    runtime = Runtime(Settings(), engine, MemoryBus(), ManualClock(NOW))
    service, _ = assemble_auth(runtime, AuthSettings(environment="development"))
    app = create_app(title="auth", routers=[service.router])
    forged = "\n2026-03-02 08:00:00 [info] issued a token to admin"
    try:
        async with _client(app) as client:
            for form in ({"grant_type": f"x{forged}"}, {"client_id": f"pool{forged}"}):
                response = await client.post("/auth/token", data=form)
                assert response.status_code == 400
    finally:
        await engine.dispose()
    refused = [r.getMessage() for r in caplog.records if "token refused" in r.getMessage()]
    assert len(refused) == 2
    assert not any("\n" in message for message in refused), refused
    assert all("\\n2026-03-02" in message for message in refused), refused
