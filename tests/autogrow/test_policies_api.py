"""autogrow's per-pool policies over the API, with API auth on and PostgreSQL: the default, a PUT
and what it changes (a pool's decisions, not another's), and every bad request a clear 4xx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from autogrow_kit import START, Harness, PoolStandIn, node_ids, stop_service
from click.testing import Result
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from tests_support import free_port
from typer.testing import CliRunner

from services.autogrow.cluster import SimulatedCluster
from services.autogrow.policy import PolicySettings
from services.autogrow.policy_store import PoolPolicy, resolve
from services.autogrow.service import assemble
from services.autogrow.settings import AutogrowSettings
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.tables import decisions, power_intervals
from services.cli import app as cli
from shared.api import ApiGuard, create_app
from shared.bus import Envelope
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.events import BillingModel, NodeProvisioned, PowerOn
from shared.service import Runtime
from shared.settings import Settings
from shared.tokens import TokenIssuer, TokenVerifier, generate_signing_key

pytestmark = pytest.mark.postgres

POOLS = {"cpu": ["c1", "c2", "c3"], "gpu": ["g1", "g2", "g3"]}  # pool -> node ids
NAMES = {node: f"node-{node}" for nodes in POOLS.values() for node in nodes}
# the service's default differs from PolicySettings' own, to show which one a pool follows
SETTINGS = AutogrowSettings(
    scheduler="simulated",
    policy=PolicySettings(idle_seconds=900, max_running=10),
)
KEY = generate_signing_key()
ISSUER = TokenIssuer(KEY)


class Stack:
    def __init__(self, h: Harness, api: httpx.AsyncClient) -> None:
        self.h = h
        self.api = api

    def bearer(self, *scopes: str, subject: str = "alice@example.test") -> dict[str, str]:
        token = ISSUER.issue(subject, "operator", scopes, self.h.clock.now())
        return {"authorization": f"Bearer {token}"}

    @property
    def reader(self) -> dict[str, str]:
        return self.bearer("autogrow:read")

    @property
    def writer(self) -> dict[str, str]:
        return self.bearer("autogrow:read", "autogrow:write")


@pytest.fixture
async def stack(pg_engine: AsyncEngine) -> AsyncIterator[Stack]:
    """autogrow on PostgreSQL with two pools of stopped nodes, a simulated scheduler with no
    jobs, and its API guarded as in production."""
    clock = ManualClock(START)
    scheduler = SimulatedCluster(
        SimulatedScheduler([], clock, nodes=list(NAMES.values()), cores_per_node=1),
        pg_engine,
        clock,
        boot_seconds=0,
    )
    bus = MemoryBus()
    runtime = Runtime(settings=Settings(), engine=pg_engine, bus=bus, clock=clock)
    autogrow = assemble(runtime, SETTINGS, scheduler)
    await bus.start()
    await bus.subscribe("autogrow", autogrow.service.handlers)
    pool = PoolStandIn(bus, clock)
    await pool.start()
    h = Harness(autogrow, runtime, bus, clock, pool)
    for pool_name, members in POOLS.items():
        for node_id in members:
            pool.names[node_id] = NAMES[node_id]
            provisioned = NodeProvisioned(
                occurred_at=clock.now(),
                node_id=node_id,
                instance_id=f"i-{node_id}",
                image_id="ami-1",
                instance_type="c6i.large",
                zone="us-east-1a",
                scheduler_node_name=NAMES[node_id],
                pool=pool_name,
            )
            await bus.publish(Envelope.of(provisioned))
    await h.settle()
    guard = ApiGuard(TokenVerifier([KEY.public_key()]), clock)
    app = create_app(title="autogrow", routers=[autogrow.service.router], guard=guard)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://autogrow") as api:
            yield Stack(h, api)
    finally:
        await bus.stop()
        await stop_service(autogrow.service)


def default_policy() -> dict[str, Any]:
    return {**SETTINGS.policy.model_dump(mode="json"), "billing": None}


async def test_every_pool_follows_the_default_until_set(stack: Stack) -> None:
    listed = await stack.api.get("/autogrow/policies", headers=stack.reader)
    one = await stack.api.get("/autogrow/policies/gpu", headers=stack.reader)

    assert listed.status_code == 200, listed.text
    assert [p["pool"] for p in listed.json()] == ["cpu", "gpu"]
    for view in listed.json():
        assert view["policy"] == default_policy()
        assert view["overrides"] == {}
        assert view["updated_at"] is None and view["updated_by"] is None
        assert view["problem"] is None
    assert one.status_code == 200 and one.json() == listed.json()[1]


async def test_a_put_sets_only_the_named_settings_and_who_set_them(stack: Stack) -> None:
    put = await stack.api.put(
        "/autogrow/policies/gpu",
        json={"min_running": 2, "billing": "hourly", "max_running": None},
        headers=stack.writer,
    )
    gpu = await stack.api.get("/autogrow/policies/gpu", headers=stack.reader)
    cpu = await stack.api.get("/autogrow/policies/cpu", headers=stack.reader)

    assert put.status_code == 200, put.text
    assert put.json() == gpu.json()
    view = gpu.json()
    assert view["overrides"] == {"min_running": 2, "billing": "hourly", "max_running": None}
    assert view["policy"] == {
        **default_policy(),
        "min_running": 2,
        "billing": "hourly",
        "max_running": None,  # an explicit null: no cap, whatever the default's
    }
    assert view["policy"]["idle_seconds"] == 900  # the service's default, not PolicySettings'
    assert view["updated_by"] == "alice@example.test"
    assert view["updated_at"] is not None
    assert cpu.json()["overrides"] == {} and cpu.json()["policy"] == default_policy()

    back = await stack.api.put("/autogrow/policies/gpu", json={}, headers=stack.writer)
    assert back.json()["overrides"] == {} and back.json()["policy"] == default_policy()


async def test_min_above_max_is_refused_with_the_reason(stack: Stack) -> None:
    both = await stack.api.put(
        "/autogrow/policies/gpu", json={"min_running": 3, "max_running": 2}, headers=stack.writer
    )
    with_default = await stack.api.put(
        "/autogrow/policies/gpu", json={"min_running": 11}, headers=stack.writer
    )
    after = await stack.api.get("/autogrow/policies/gpu", headers=stack.reader)

    assert both.status_code == 422
    assert [p["problem"] for p in both.json()["problems"]] == [
        "Value error, min_running (3) exceeds max_running (2)"
    ]
    assert with_default.status_code == 422
    assert with_default.json()["detail"] == (
        "with the service's default for the settings not given: "
        "min_running (11) exceeds max_running (10)"
    )
    assert after.json()["overrides"] == {}, "nothing was stored"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("PUT", "/autogrow/policies/gpu", {"min_runing": 2}, 422, "body.min_runing"),
        ("PUT", "/autogrow/policies/gpu", {"min_running": -1}, 422, "body.min_running"),
        ("PUT", "/autogrow/policies/gpu", {"min_running": "two"}, 422, "body.min_running"),
        ("PUT", "/autogrow/policies/gpu", {"billing": "daily"}, 422, "body.billing"),
        ("PUT", "/autogrow/policies/gpu", [1, 2], 422, "body"),
        ("PUT", "/autogrow/policies/gpu", "not json", 422, "body"),
        ("PUT", "/autogrow/policies/tpu", {"min_running": 1}, 404, "knows no pool 'tpu'"),
        ("GET", "/autogrow/policies/tpu", None, 404, "known: cpu, gpu"),
        ("GET", "/autogrow/policies/no%20such", None, 422, "path.pool"),
        ("PUT", "/autogrow/policies/" + "x" * 65, {}, 422, "path.pool"),
    ],
)
async def test_bad_requests_get_a_clear_4xx(
    stack: Stack, method: str, path: str, body: Any, status: int, says: str
) -> None:
    if isinstance(body, str):
        response = await stack.api.request(
            method,
            path,
            content=body,
            headers={**stack.writer, "content-type": "application/json"},
        )
    else:
        response = await stack.api.request(method, path, json=body, headers=stack.writer)

    assert response.status_code == status, response.text
    assert says in response.text


async def test_policies_need_a_token_and_a_put_needs_write(stack: Stack) -> None:
    anonymous = await stack.api.get("/autogrow/policies")
    anonymous_put = await stack.api.put("/autogrow/policies/gpu", json={})
    reader_put = await stack.api.put(
        "/autogrow/policies/gpu", json={"min_running": 1}, headers=stack.reader
    )
    hook_put = await stack.api.put(
        "/autogrow/policies/gpu", json={"min_running": 1}, headers=stack.bearer("autogrow:hook")
    )
    hook_get = await stack.api.get("/autogrow/policies", headers=stack.bearer("autogrow:hook"))

    assert anonymous.status_code == 401 and anonymous_put.status_code == 401
    assert reader_put.status_code == 403
    assert "autogrow:write" in reader_put.json()["detail"]
    assert hook_put.status_code == 403 and hook_get.status_code == 403


async def test_a_pools_policy_changes_its_decisions_only(stack: Stack) -> None:
    h = stack.h
    await h.tick()
    assert await h.commands() == [], "no jobs, min_running 0: every node stays off"

    put = await stack.api.put(
        "/autogrow/policies/gpu", json={"min_running": 2}, headers=stack.writer
    )
    assert put.status_code == 200, put.text
    await h.tick()
    commands = await h.commands()
    await h.tick(60)  # the two run; nothing more is asked
    again = await h.commands()
    async with h.engine.connect() as conn:
        recorded = (await conn.execute(select(decisions.c.inputs))).scalars().all()

    assert node_ids(commands, PowerOn) == ["g1", "g2"]
    assert again == commands
    assert [(d["pool"], d["policy"]["min_running"]) for d in recorded] == [("gpu", 2)]
    assert h.autogrow.decider.by_pool["cpu"].power_on == ()


async def test_a_pools_billing_override_decides_and_costs_its_runs(stack: Stack) -> None:
    async def put(pool: str, body: dict[str, Any]) -> None:
        response = await stack.api.put(
            f"/autogrow/policies/{pool}", json=body, headers=stack.writer
        )
        assert response.status_code == 200, response.text

    h = stack.h
    await put("gpu", {"billing": "hourly", "min_running": 1})
    await put("cpu", {"min_running": 1})
    await h.tick()  # c1 and g1 run: their images bill per second, the gpu pool says hourly
    await h.tick(1)  # and register with the scheduler, idle
    await put("gpu", {"billing": "hourly"})
    await put("cpu", {})
    await h.tick(1199)  # both idle 20 min: past the 900 s grace, 40 min left of g1's hour
    await h.tick(2100)  # 55 min: the last minutes of g1's paid hour
    async with h.engine.connect() as conn:
        rows = await conn.execute(
            select(decisions.c.decided_at, decisions.c.inputs, decisions.c.actions)
        )
        drains = [
            (int((at - START).total_seconds()), inputs["pool"], action["node_id"])
            for at, inputs, actions in rows
            for action in actions
            if action["action"] == "drain"
        ]
        intervals = await conn.execute(select(power_intervals.c.node_id, power_intervals.c.billing))
        billing = {node_id: model for node_id, model in intervals}

    # per-second: drained once idle past the grace; hourly: kept until its paid hour nearly ends
    assert drains == [(1200, "cpu", "c1"), (3300, "gpu", "g1")]
    assert billing == {"c1": BillingModel.PER_SECOND.value, "g1": BillingModel.HOURLY.value}


async def test_a_put_kicks_the_running_decision_loop(stack: Stack) -> None:
    h = stack.h
    await h.autogrow.watcher.poll()
    loop = h.autogrow.decide_loop
    loop.start()
    await _until(lambda: loop.passes >= 1)

    put = await stack.api.put(
        "/autogrow/policies/cpu", json={"min_running": 1}, headers=stack.writer
    )

    assert put.status_code == 200
    await _until(lambda: loop.passes >= 2)  # the clock stands still: only the kick runs a pass
    await asyncio.sleep(0)
    async with h.engine.connect() as conn:
        pools = (await conn.execute(select(decisions.c.inputs))).scalars().all()
    assert [d["pool"] for d in pools] == ["cpu"]


async def _until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


async def test_the_operator_cli_shows_and_sets_a_pools_policy(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = stack.api._transport.app  # type: ignore[attr-defined]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    await _until(lambda: server.started)
    writer, reader = tmp_path / "writer", tmp_path / "reader"
    writer.write_text(stack.writer["authorization"].removeprefix("Bearer "))
    reader.write_text(stack.reader["authorization"].removeprefix("Bearer "))

    async def hpcfleet(*args: str, token: Path = writer) -> Result:
        command = ["policy", *args, "--url", url, "--token-file", str(token)]
        return await asyncio.to_thread(CliRunner().invoke, cli, command)

    try:
        set_ = await hpcfleet(
            "set", "gpu", "--min", "2", "--billing", "hourly", "--set", "boot_timeout_seconds=600"
        )
        shown = await hpcfleet("show", "--json", token=reader)
        table = await hpcfleet("show", "gpu", token=reader)
        again = await hpcfleet("set", "gpu", "--unset", "billing", "--max", "none")
        too_many = await hpcfleet("set", "gpu", "--min", "12", "--max", "11")
        no_write = await hpcfleet("set", "cpu", "--min", "1", token=reader)
        unknown = await hpcfleet("set", "gpu", "--set", "warm_ahead=3")
        current = await stack.api.get("/autogrow/policies/gpu", headers=stack.reader)
    finally:
        server.should_exit = True
        await serving

    assert set_.exit_code == 0, set_.output
    assert set_.output.startswith("pool gpu: min_running 2*, max_running 10, ")
    assert "boot_timeout_seconds 600.0*" in set_.output and "billing hourly*" in set_.output
    views = {v["pool"]: v for v in json.loads(shown.stdout)}
    assert views["gpu"]["overrides"] == {
        "min_running": 2,
        "billing": "hourly",
        "boot_timeout_seconds": 600,
    }
    assert views["cpu"]["overrides"] == {}
    assert table.exit_code == 0
    rows = [line.replace("│", " ").split() for line in table.stdout.splitlines()]
    assert ["min_running", "2*"] in rows and ["billing", "hourly*"] in rows
    assert again.exit_code == 0, again.output
    assert current.json()["overrides"] == {
        "min_running": 2,
        "boot_timeout_seconds": 600,
        "max_running": None,
    }
    assert too_many.exit_code == 1
    assert (
        "422" in too_many.stderr and "min_running (12) exceeds max_running (11)" in too_many.stderr
    )
    assert (
        no_write.exit_code == 1 and "403" in no_write.stderr and "autogrow:write" in no_write.stderr
    )
    assert (
        unknown.exit_code == 1
        and "body.warm_ahead: Extra inputs are not permitted" in unknown.stderr
    )


def test_stored_settings_that_no_longer_fit_the_default_fall_back_to_it_saying_why() -> None:
    default = PoolPolicy(max_running=5, idle_seconds=600)

    clash = resolve(default, {"min_running": 8})
    renamed = resolve(default, {"min_running": 2, "warm_ahead_nodes": 3})
    fits = resolve(default, {"min_running": 2, "max_running": None, "billing": "hourly"})

    assert clash.policy == default
    assert clash.problem == (
        "the pool's settings do not fit the service's default, which is used instead: "
        "min_running (8) exceeds max_running (5)"
    )
    assert renamed.policy == default.model_copy(update={"min_running": 2})
    assert renamed.problem == "unknown settings ignored: warm_ahead_nodes"
    assert fits.problem is None
    assert (fits.policy.min_running, fits.policy.max_running) == (2, None)
    assert fits.policy.billing is BillingModel.HOURLY and fits.policy.idle_seconds == 600
