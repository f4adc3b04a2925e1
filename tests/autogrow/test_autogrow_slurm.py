"""autogrow with a real Slurm controller (`SlurmCluster`), both modes, end to end but for the pool:
jobs are submitted with sbatch, autogrow powers nodes on, the jobs run on them, and the idle
nodes are drained and powered off. A stand-in answers autogrow's PowerOn / PowerOff as the pool
would, by booting or stopping the emulated nodes (one slurmd each)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from autogrow_kit import autogrow_engine, stop_service
from sqlalchemy import select
from tests_support import free_port

from services.autogrow.billing import BillingRules
from services.autogrow.policy import PolicySettings
from services.autogrow.service import Autogrow, assemble
from services.autogrow.settings import AutogrowSettings, Mode
from services.autogrow.slurm import SlurmScheduler
from services.autogrow.tables import decisions, nodes
from shared.api import ApiGuard, create_app
from shared.bus import Envelope
from shared.bus.memory import MemoryBus
from shared.clock import SystemClock
from shared.events import (
    Message,
    NodePowerChanged,
    NodeProvisioned,
    PowerOff,
    PowerOn,
    PowerState,
)
from shared.service import Runtime
from shared.settings import Settings
from shared.testing.auth_service import serve_auth
from shared.testing.slurm_cluster import SlurmCluster, SlurmNotInstalled, hpcfleet_hook

pytestmark = pytest.mark.slow
NODES = {"n1": "node001", "n2": "node002"}


@dataclass
class Running:
    autogrow: Autogrow
    cluster: SlurmCluster
    commands: list[PowerOn | PowerOff]

    async def decisions(self) -> list[dict[str, Any]]:
        async with self.autogrow.service.mailbox.engine.connect() as conn:
            rows = await conn.execute(select(decisions).order_by(decisions.c.id))
            return [dict(row._mapping) for row in rows]


@asynccontextmanager
async def autogrow_on(cluster: SlurmCluster, mode: Mode, tmp_path: Path) -> AsyncIterator[Running]:
    """autogrow's worker (and, where Slurm decides, its API for the hooks) on this cluster, with
    a pool stand-in that boots and stops the emulated nodes."""
    engine = await autogrow_engine(tmp_path / f"{mode}.db")
    bus = MemoryBus()
    clock = SystemClock()
    runtime = Runtime(Settings(relay_interval=0.2), engine, bus, clock)
    settings = AutogrowSettings(
        mode=mode,
        poll_interval=0.3,
        policy=PolicySettings(idle_seconds=1, boot_timeout_seconds=120, cores_per_node=2),
    )
    scheduler = SlurmScheduler(env=cluster.env, timeout=10, clock=clock)
    # EC2's 60 s minimum would keep every node a minute; the rule is the same with 2 s
    autogrow = assemble(runtime, settings, scheduler, billing=BillingRules(per_second_minimum=2))
    running = Running(autogrow, cluster, [])

    async def report(node_id: str, state: PowerState) -> None:
        changed = NodePowerChanged(
            occurred_at=clock.now(),
            node_id=node_id,
            state=state,
            since=clock.now(),
            scheduler_node_name=NODES[node_id],
        )
        await bus.publish(Envelope.of(changed))

    async def pool(message: Message) -> None:
        assert isinstance(message, PowerOn | PowerOff)
        running.commands.append(message)
        names = [NODES[n] for n in message.node_ids]
        if isinstance(message, PowerOn):
            for node_id in message.node_ids:
                await report(node_id, PowerState.RUNNING)
            await asyncio.to_thread(cluster.node_up, names)
        else:
            await asyncio.to_thread(cluster.node_down, names)
            for node_id in message.node_ids:
                await report(node_id, PowerState.STOPPED)

    await bus.start()
    await bus.subscribe("pool-stand-in", {PowerOn.name(): pool, PowerOff.name(): pool})
    await autogrow.service.start_worker(bus)
    for node_id, name in NODES.items():
        provisioned = NodeProvisioned(
            occurred_at=clock.now(),
            node_id=node_id,
            instance_id=f"i-{node_id}",
            image_id="ami-1",
            instance_type="c6i.large",
            zone="us-east-1a",
            scheduler_node_name=name,
        )
        await bus.publish(Envelope.of(provisioned))

    async def known() -> bool:
        async with engine.connect() as conn:
            return len((await conn.execute(select(nodes.c.node_id))).all()) == len(NODES)

    await eventually(known, within=5, what="autogrow to record the pool's nodes")
    try:
        yield running
    finally:
        await bus.stop()
        await stop_service(autogrow.service)
        await engine.dispose()


@asynccontextmanager
async def serving(autogrow: Autogrow, port: int, guard: ApiGuard) -> AsyncIterator[None]:
    app = create_app(title="autogrow", routers=[autogrow.service.router], guard=guard)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, within=10, what="the API to listen")
    try:
        yield
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def started(cluster: SlurmCluster) -> AsyncIterator[SlurmCluster]:
    try:
        await asyncio.to_thread(cluster.start)
    except SlurmNotInstalled as exc:
        cluster.stop()
        pytest.fail(f"Slurm is needed for these tests: {exc}")
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, within: float, what: str
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def kinds(history: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(trigger, action, node) of every action, oldest first."""
    return [(d["trigger"], a["action"], a["scheduler_name"]) for d in history for a in d["actions"]]


async def test_hpcfleet_decides_with_slurm(tmp_path: Path) -> None:
    async with (
        started(SlurmCluster(2, cpus_per_node=2)) as cluster,
        autogrow_on(cluster, "hpcfleet-decides", tmp_path) as run,
    ):
        job = cluster.sbatch("sleep 2", nodes=1)
        await eventually(
            lambda: cluster.job_states().get(job) == "COMPLETED", within=30, what="the job to run"
        )
        await eventually(
            lambda: any(isinstance(c, PowerOff) for c in run.commands),
            within=20,
            what="the idle node to be powered off",
        )
        history = await run.decisions()
        states = cluster.node_states()

    steps = kinds(history)
    assert steps[0] == ("policy", "power_on", "node001")
    assert ("policy", "power_off", "node001") in steps
    # Under load a slow boot may make the policy start node002 too; whatever it powers off it
    # drained first.
    for index, (_, action, node) in enumerate(steps):
        if action == "power_off":
            assert ("policy", "drain", node) in steps[:index], f"{node} went down undrained"
    assert run.commands[0].node_ids == ("n1",)
    assert "DRAIN" in states["node001"][1], "drained before it went down"
    assert "node001" not in cluster.up_nodes()


async def test_slurm_decides_with_slurm(tmp_path: Path) -> None:
    with serve_auth(tmp_path / "auth") as auth:  # the hooks' tokens: API auth on, as in production
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        secret = auth.secret_files["slurm"]

        def hook(action: str) -> list[str]:  # Slurm appends the host list
            return hpcfleet_hook(action, url, auth_url=auth.url, client_secret_file=secret)

        cluster = SlurmCluster(
            2,
            cpus_per_node=2,
            power_saving=True,
            resume_command=hook("resume"),
            suspend_command=hook("suspend"),
            suspend_timeout=2,
        )
        async with (
            started(cluster),
            autogrow_on(cluster, "slurm-decides", tmp_path) as run,
            serving(run.autogrow, port, auth.guard()),
        ):
            job = cluster.sbatch("sleep 1", nodes=1)
            await eventually(
                lambda: cluster.job_states().get(job) == "COMPLETED",
                within=45,
                what="the job to run",
            )
            await eventually(
                lambda: cluster.node_states()["node001"] == ("idle", ("CLOUD", "POWERED_DOWN")),
                within=20,
                what="Slurm to count node001 powered down",
            )
            history = await run.decisions()

    assert kinds(history) == [
        ("slurm-resume", "power_on", "node001"),
        ("policy", "drain", "node001"),
        ("policy", "slurm_power_down", "node001"),
        ("slurm-suspend", "power_off", "node001"),
    ]
    assert [type(c) for c in run.commands] == [PowerOn, PowerOff]
    assert "node001" not in cluster.up_nodes()
