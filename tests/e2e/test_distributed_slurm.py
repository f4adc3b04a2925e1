"""The whole system, distributed, on a real Slurm: issue 8's end-to-end run.

Every service's API and worker runs as its own process over RabbitMQ and PostgreSQL; AWS is a moto
server over HTTP; the services' AWS credentials are vended by auth after it signed in to the
development AD FS for each role; the operator signs in through `hpcfleet login`'s code; and a real
slurmctld schedules real jobs on emulated nodes that boot when EC2 starts their instance and die
when EC2 stops it (`SlurmBridge`).

Polling (hpcfleet decides): a recipe is baked, its ImageReady fills the pool; two `sbatch` jobs make
autogrow power two nodes on and really run on them; the short job's node, idle, is drained and
powered off (after EC2's 60 s per-second minimum, which autogrow honours); then a second image
rolls the pool while the long job runs: its node is marked retiring and kept, the job finishes
undisturbed, and only then is the node drained, powered off and replaced.

Hooks (Slurm decides): Slurm puts a job on a powered-down CLOUD node and runs its ResumeProgram,
the production hook, which gets a token from auth as the ``slurm`` client; autogrow powers the node
on, the job runs; once the node's paid minute is used autogrow drains it and asks Slurm to power it
down, and Slurm's SuspendProgram hook has it powered off.

Each run checks the final state in PostgreSQL, in EC2, in Slurm, and that RabbitMQ dead-lettered
nothing. Slurm's accounting (`sacct`) is off in the test cluster (no slurmdbd); `squeue --json`
keeps finished jobs for MinJobAge (300 s), which is what the checks read.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from distributed_kit import REGION, Deployment, Plan, SlurmBridge, deployed, eventually
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.autogrow.tables import decisions
from services.bakery.tables import builds
from services.pool.spec import POOL_TAG
from services.pool.tables import nodes as pool_nodes
from shared.cloud.moto_server import MotoServer
from shared.testing.slurm_cluster import SlurmCluster, SlurmNotInstalled

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]

SIZE = 3
CPUS = 4
POLL = "0.5"
SEED_KEY = "rehearsal"  # the key of the harness's own calls that seed the base image
GONE = ("terminated", "shutting-down")


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    return Plan.make(tmp_path)


def _started(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    try:
        cluster.start()
    except SlurmNotInstalled as exc:
        cluster.stop()
        pytest.fail(f"Slurm is needed for this test: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def polled_cluster() -> Iterator[SlurmCluster]:
    """Nodes for the pool and its surge (100 %: a whole second set while rolling); down until
    their instance boots them."""
    yield from _started(SlurmCluster(2 * SIZE, cpus_per_node=CPUS))


@pytest.fixture
def hooked_cluster(plan: Plan) -> Iterator[SlurmCluster]:
    """CLOUD nodes, one per pool node, whose ResumeProgram and SuspendProgram are the production
    hooks (token from auth as the ``slurm`` client); Slurm never suspends on its own."""
    cluster = SlurmCluster(
        SIZE,
        cpus_per_node=CPUS,
        power_saving=True,
        resume_command=plan.hook("resume"),
        suspend_command=plan.hook("suspend"),
        suspend_timeout=5,
        resume_timeout=90,
    )
    yield from _started(cluster)


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    with MotoServer(record=("StartInstances", "StopInstances", "CreateImage")) as server:
        server.reset()  # moto's state is per process: start from an empty AWS
        yield server


Deploy = Callable[..., AbstractAsyncContextManager[Deployment]]


@pytest.fixture
def deploy(
    tmp_path: Path,
    plan: Plan,
    pg_engine: AsyncEngine,
    postgres_url: str,
    rabbitmq_url: str,
    exchange_name: str,
    moto: MotoServer,
) -> Deploy:
    """Deploy with autogrow on `cluster` in `mode`, and the pool's `size` and surge."""

    def start(
        cluster: SlurmCluster, mode: str, pool: dict[str, Any]
    ) -> AbstractAsyncContextManager[Deployment]:
        env = {
            "HPCFLEET_AUTOGROW_SCHEDULER": "slurm",
            "HPCFLEET_AUTOGROW_MODE": mode,
            "HPCFLEET_AUTOGROW_SLURM_CONF": str(cluster.conf),
            "HPCFLEET_AUTOGROW_POLL_INTERVAL": POLL,
            "HPCFLEET_AUTOGROW_POLICY__CORES_PER_NODE": str(CPUS),
            "HPCFLEET_AUTOGROW_POLICY__IDLE_SECONDS": "2",
            "HPCFLEET_AUTOGROW_POLICY__BOOT_TIMEOUT_SECONDS": "120",
        }
        return deployed(
            tmp_path,
            database_url=postgres_url,
            rabbitmq_url=rabbitmq_url,
            exchange=exchange_name,
            moto=moto,
            env=env,
            pool=pool,
            plan=plan,
        )

    return start


@dataclass
class Story:
    """The views a test reads while the system works, and its timeline."""

    deployment: Deployment
    cluster: SlurmCluster
    bridge: SlurmBridge
    pool: httpx.AsyncClient
    autogrow: httpx.AsyncClient
    bakery: httpx.AsyncClient
    ec2: Any
    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)  # seconds since the story began
    figures: dict[str, float] = field(default_factory=dict)  # durations, seconds

    @property
    def health(self) -> tuple[Callable[[], None], ...]:
        return (self.deployment.processes.check, self.bridge.check)

    def mark(self, what: str) -> None:
        self.marks[what] = time.monotonic() - self.started

    async def until(self, check: Callable[[], Awaitable[Any]], within: float, what: str) -> Any:
        return await eventually(check, within=within, what=what, health=self.health)

    async def pool_view(self) -> dict[str, Any]:
        view: dict[str, Any] = (await self.pool.get("/pool/pools/default")).json()
        return view

    async def autogrow_nodes(self) -> dict[str, dict[str, Any]]:
        rows = (await self.autogrow.get("/autogrow/nodes")).json()
        return {row["scheduler_node_name"]: row for row in rows}

    async def bake(self) -> str:
        """Ask bakery for an image of the recipe and wait until it is published."""
        accepted = await self.bakery.post("/bakery/builds", json={"recipe": "linux"})
        assert accepted.status_code == 202, accepted.text
        build_id: str = accepted.json()["build_id"]

        async def published() -> bool:
            found = (await self.bakery.get(f"/bakery/builds/{build_id}")).json()
            assert found["status"] not in ("failed", "skipped"), found
            return bool(found["status"] == "succeeded")

        await self.until(published, 60, f"build {build_id}")
        return build_id

    async def pool_filled(self, size: int) -> dict[str, Any]:
        """Wait until the pool has `size` warm (stopped) nodes, all on its image."""

        async def filled() -> dict[str, Any] | None:
            view = await self.pool_view()
            full = view["by_state"] == {"stopped": size} and view["replacement"]["complete"]
            return view if view["spec"]["image_id"] and full else None

        view: dict[str, Any] = await self.until(filled, 60, "the pool filled")
        return view

    def instances(self) -> list[dict[str, Any]]:
        """Every instance the pool ever had, as EC2 shows it."""
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag-key", "Values": [POOL_TAG]}]
        )
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

    async def check_credentials(self, builds: int) -> None:
        """auth vended the credentials every EC2 change was made with, per service; none was
        made with a placeholder key."""
        moto = self.deployment.moto
        pool_key = (await self.deployment.vended("pool"))["AccessKeyId"]
        bakery_key = (await self.deployment.vended("bakery"))["AccessKeyId"]
        assert pool_key.startswith("ASIA") and bakery_key.startswith("ASIA")  # STS session keys
        pool_instances = {i["InstanceId"] for i in self.instances()}
        for call in moto.recorded("StartInstances") + moto.recorded("StopInstances"):
            ours = set(call.values("InstanceId")) <= pool_instances  # else bakery's builders
            assert call.access_key == (pool_key if ours else bakery_key), call
        baked = [c for c in moto.recorded("CreateImage") if c.access_key != SEED_KEY]
        assert len(baked) == builds and {c.access_key for c in baked} == {bakery_key}

    async def report(self, engine: AsyncEngine) -> None:
        """Print the timeline, with autogrow's decisions and EC2's power calls on it."""
        self.mark("done")
        print("\n" + "; ".join(f"{what} {seconds:.1f} s" for what, seconds in self.figures.items()))
        began = time.time() - (time.monotonic() - self.started)
        events = [(began + t, what) for what, t in self.marks.items()]
        async with engine.connect() as conn:
            rows = await conn.execute(select(decisions.c.decided_at, decisions.c.actions))
            for row in rows:
                acts = ", ".join(f"{a['action']} {a['scheduler_name']}" for a in row.actions)
                events.append((row.decided_at.timestamp(), f"autogrow: {acts or 'nothing'}"))
        for action in ("StartInstances", "StopInstances"):
            for call in self.deployment.moto.recorded(action):
                events.append((call.at, f"EC2 {action} {' '.join(call.values('InstanceId'))}"))
        for at, what in sorted(events):
            print(f"{at - began:7.1f} s  {what}")


@asynccontextmanager
async def story(
    deployment: Deployment, cluster: SlurmCluster, engine: AsyncEngine
) -> AsyncIterator[Story]:
    bridge = SlurmBridge(cluster, engine, deployment.moto.endpoint)
    ec2 = boto3.client(
        "ec2",
        endpoint_url=deployment.moto.endpoint,
        region_name=REGION,
        aws_access_key_id="test-harness",
        aws_secret_access_key="test-harness",
    )
    async with (
        deployment.client("pool") as pool,
        deployment.client("autogrow") as autogrow,
        deployment.client("bakery") as bakery,
        bridge.running(),
    ):
        told = Story(deployment, cluster, bridge, pool, autogrow, bakery, ec2)
        told.figures.update(deployment.timings)
        yield told


async def decisions_log(engine: AsyncEngine) -> list[tuple[str, str, str]]:
    """Every action autogrow took and that stood: (trigger, action, scheduler node name)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(decisions.c.trigger, decisions.c.actions))).all()
    return [
        (row.trigger, a["action"], a["scheduler_name"])
        for row in rows
        for a in row.actions
        if not a["error"]
    ]


async def test_bake_roll_run_jobs_power_off_and_roll_again_around_a_running_job(
    deploy: Deploy, polled_cluster: SlurmCluster, pg_engine: AsyncEngine
) -> None:
    cluster = polled_cluster
    async with (
        deploy(cluster, "hpcfleet-decides", {"size": SIZE, "max_surge_percent": 100}) as running,
        story(running, cluster, pg_engine) as it,
    ):
        # 1. A recipe is baked; its ImageReady fills the pool, every node warm (stopped).
        await it.bake()
        first_image = (await it.pool_filled(SIZE))["spec"]["image_id"]
        it.mark("pool filled on image 1")

        # 2. Two jobs wait; autogrow powers two nodes on; the jobs really run on them. Each runs
        # until the test releases it, so both hold a node at once.
        jobs_dir = cluster.dir / "jobs"
        submitted = time.time()
        quick, held = (
            cluster.sbatch(
                f"#!/bin/sh\nwhile [ ! -e {jobs_dir / name} ]; do sleep 0.2; done\necho {name}\n",
                "--exclusive",
                nodes=1,
            )
            for name in ("quick", "held")
        )

        async def both_run() -> dict[int, str] | None:
            jobs = {j["job_id"]: j for j in cluster.squeue_json()["jobs"]}
            both = all(jobs[job]["job_state"] == "RUNNING" for job in (quick, held))
            return {job: jobs[job]["nodes"] for job in (quick, held)} if both else None

        ran_on = await it.until(both_run, 60, "both jobs to run")
        quick_node, held_node = ran_on[quick], ran_on[held]
        assert quick_node != held_node
        starts = [c for c in running.moto.recorded("StartInstances") if c.at >= submitted]
        it.figures["sbatch -> StartInstances"] = starts[0].at - submitted
        it.mark("jobs run")
        (jobs_dir / "quick").touch()

        # 3. The quick job ends; its node, idle, is drained, then powered off (EC2 bills a start
        # for at least 60 s, so autogrow keeps it that long).
        async def quick_node_off() -> bool:
            node = (await it.autogrow_nodes())[quick_node]
            drained = "DRAIN" in cluster.node_states()[quick_node][1]
            halted = quick_node not in cluster.up_nodes()  # the machine is really off
            return node["power_state"] == "stopped" and drained and halted

        await it.until(quick_node_off, 90, f"{quick_node} drained and off")
        it.mark("idle node drained and off")

        # 4. A second image rolls the pool while the held job runs: its node is kept, retiring.
        await it.bake()

        async def rolled_around_the_job() -> dict[str, Any] | None:
            view = await it.pool_view()
            replacement = view["replacement"]
            rolled = view["spec"]["image_id"] != first_image and replacement["fresh"] == SIZE
            kept = replacement["old"] == 1 and replacement["retiring"] == 1
            return view if rolled and kept else None

        second_image = (await it.until(rolled_around_the_job, 60, "the roll"))["spec"]["image_id"]
        retiring = (await it.autogrow_nodes())[held_node]
        assert retiring["retiring"] and retiring["power_state"] == "running", retiring
        assert cluster.job_states()[held] == "RUNNING" and held_node in cluster.up_nodes()
        it.mark("rolled around the running job")

        # 5. The job finishes undisturbed; only then does its node go (drained, off, replaced).
        (jobs_dir / "held").touch()

        async def roll_complete() -> dict[str, Any] | None:
            view = await it.pool_view()
            done = view["replacement"]["complete"] and view["by_state"].get("stopped") == SIZE
            only_warm = view["by_state"].keys() <= {"stopped", "terminated"}
            finished = cluster.job_states()[held] == "COMPLETED"
            halted = not cluster.up_nodes()  # the bridge has taken the stopped node down
            return view if done and only_warm and finished and halted else None

        await it.until(roll_complete, 60, "the roll to finish")
        it.mark("roll complete")

        # Slurm: both jobs completed once, never requeued; no node is up, both were drained.
        jobs = {j["job_id"]: j for j in cluster.squeue_json()["jobs"]}
        assert {jobs[j]["job_state"] for j in (quick, held)} == {"COMPLETED"}
        assert [jobs[j]["restart_cnt"] for j in (quick, held)] == [0, 0]
        assert jobs[held]["nodes"] == held_node
        for job, name in ((quick, "quick"), (held, "held")):
            (output,) = jobs_dir.glob(f"slurm-{job}_*.out")
            assert output.read_text().strip() == name
        assert cluster.up_nodes() == []
        states = cluster.node_states()
        assert "DRAIN" in states[quick_node][1] and "DRAIN" in states[held_node][1], states

        # RabbitMQ: every message was handled; none was dead-lettered.
        assert await running.dead_letters() == {"bakery": 0, "pool": 0, "autogrow": 0}
        await it.check_credentials(builds=2)

        # PostgreSQL: two builds succeeded; the pool is its size, fresh on the second image and
        # warm; autogrow powered each job's node on, drained it and powered it off.
        async with pg_engine.connect() as conn:
            statuses = (await conn.execute(select(builds.c.status))).scalars().all()
            query = select(pool_nodes).where(pool_nodes.c.state.not_in(GONE))
            live = (await conn.execute(query)).mappings().all()
        assert sorted(statuses) == ["succeeded", "succeeded"]
        assert len(live) == SIZE
        assert {(n["image_id"], n["state"], n["provisioned"], n["retiring"]) for n in live} == {
            (second_image, "stopped", True, None)
        }
        done = await decisions_log(pg_engine)
        for node in (quick_node, held_node):
            for action in ("power_on", "drain", "power_off"):
                assert ("policy", action, node) in done, (action, node, done)

        # EC2: the live instances are the pool's, stopped, on the second image; every instance
        # of the first image is terminated; both images exist.
        instances = it.instances()
        current = [i for i in instances if i["State"]["Name"] != "terminated"]
        assert sorted(i["InstanceId"] for i in current) == sorted(n["instance_id"] for n in live)
        assert {(i["State"]["Name"], i["ImageId"]) for i in current} == {("stopped", second_image)}
        old = [i for i in instances if i["ImageId"] == first_image]
        assert len(old) >= SIZE and {i["State"]["Name"] for i in old} == {"terminated"}
        images = it.ec2.describe_images(ImageIds=[first_image, second_image])["Images"]
        assert [i["State"] for i in images] == ["available", "available"]
        await it.report(pg_engine)


async def test_slurm_decides_through_its_hooks_with_tokens_from_auth(
    deploy: Deploy, hooked_cluster: SlurmCluster, pg_engine: AsyncEngine
) -> None:
    cluster = hooked_cluster
    async with (
        deploy(cluster, "slurm-decides", {"size": SIZE}) as running,
        story(running, cluster, pg_engine) as it,
    ):
        await it.bake()
        await it.pool_filled(SIZE)
        it.mark("pool filled")

        # Slurm puts the job on a powered-down node and runs ResumeProgram: the hook, which gets
        # its token from auth; autogrow powers the node on; it boots; the job runs.
        job = cluster.sbatch("hostname", "--exclusive", nodes=1)

        async def ran() -> str | None:
            found = {j["job_id"]: j for j in cluster.squeue_json()["jobs"]}[job]
            return str(found["nodes"]) if found["job_state"] == "COMPLETED" else None

        node = await it.until(ran, 90, f"job {job} to run")
        resumed = [c for c in cluster.power_calls() if c.action == "resume"]
        assert [c.nodes for c in resumed] == [(node,)]
        it.mark("job ran")

        # Its paid minute used, the idle node is drained and Slurm is asked to power it down; its
        # SuspendProgram hook has it powered off.
        async def powered_down() -> bool:
            row = (await it.autogrow_nodes())[node]
            flags = cluster.node_states()[node][1]
            halted = not cluster.up_nodes()
            return row["power_state"] == "stopped" and "POWERED_DOWN" in flags and halted

        await it.until(powered_down, 120, f"{node} powered down")
        it.mark("node powered down")

        suspended = [c for c in cluster.power_calls() if c.action == "suspend"]
        assert [c.nodes for c in suspended] == [(node,)]
        for hook in ("resume", "suspend"):  # what the hooks said: nothing, they succeeded
            assert (cluster.dir / "log" / f"{hook}.out").read_text() == ""
        assert cluster.up_nodes() == []
        jobs = {j["job_id"]: j for j in cluster.squeue_json()["jobs"]}
        assert (jobs[job]["job_state"], jobs[job]["restart_cnt"]) == ("COMPLETED", 0)
        assert await running.dead_letters() == {"bakery": 0, "pool": 0, "autogrow": 0}
        await it.check_credentials(builds=1)

        done = await decisions_log(pg_engine)
        assert ("slurm-resume", "power_on", node) in done, done
        assert ("policy", "drain", node) in done, done
        assert ("policy", "slurm_power_down", node) in done, done
        assert ("slurm-suspend", "power_off", node) in done, done
        assert not [d for d in done if d[1] == "power_on" and d[0] != "slurm-resume"], done

        instance_id = (await it.autogrow_nodes())[node]["instance_id"]
        (instance,) = [i for i in it.instances() if i["InstanceId"] == instance_id]
        assert instance["State"]["Name"] == "stopped"
        async with pg_engine.connect() as conn:
            query = select(pool_nodes.c.state).where(pool_nodes.c.state.not_in(GONE))
            states = (await conn.execute(query)).scalars().all()
        assert states == ["stopped"] * SIZE
        await it.report(pg_engine)
