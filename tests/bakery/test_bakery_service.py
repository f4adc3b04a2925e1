"""bakery as a service: its worker on the in-memory bus and SQLite under a manual clock, its API,
the schedule, one build per recipe, take-over after a crash, a graceful stop, garbage collection
and retention, against the moto server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from bakery_kit import (
    REGION,
    BakeryMoto,
    ClockDriver,
    ec2,
    live_instances,
    published,
    retired,
    write_recipe_tree,
)
from sqlalchemy import insert, update

from services.bakery.aws import BakeryAws
from services.bakery.recipes import load_recipes
from services.bakery.service import Bakery, assemble
from services.bakery.settings import BakerySettings
from services.bakery.tables import builds, images
from shared.api import create_app
from shared.clock import ManualClock
from shared.events import BuildImage, ImageReady, Message
from shared.service import Runtime


@pytest.fixture
async def api(bakery: Bakery) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(title="bakery", routers=[bakery.service.router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bakery") as client:
        yield client


async def settle_builds(bakery: Bakery) -> None:
    while bakery.runner.tasks:
        await asyncio.wait_for(asyncio.gather(*bakery.runner.tasks.values()), 60)


async def test_a_scheduled_build_fires_under_a_manual_clock(
    bakery: Bakery,
    runtime: Runtime,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    api: httpx.AsyncClient,
) -> None:
    received: list[Message] = []

    async def pool(message: Message) -> None:
        received.append(message)

    await runtime.bus.subscribe("pool", {ImageReady.name(): pool})
    await bakery.service.start_worker(runtime.bus)
    try:
        await bakery.keeper.reconcile()  # first sight of the recipe: counts from now, no build
        recipes = (await api.get("/bakery/recipes")).json()
        assert recipes[0]["next_run"] == "2026-02-11T04:00:00Z"
        assert (await api.get("/bakery/builds")).json() == []

        clock.set(datetime(2026, 2, 11, 4, 0, 30, tzinfo=UTC))  # the day after Patch Tuesday
        async with ClockDriver(clock):
            for _ in range(2000):
                if received:
                    break
                await asyncio.sleep(0.01)
        [ready] = received
        assert isinstance(ready, ImageReady) and ready.recipe == "linux"
        assert ready.base_image == base_image and ready.version == "2026.02.1"
        [build] = (await api.get("/bakery/builds")).json()
        assert build["status"] == "succeeded" and build["image_id"] == ready.images[REGION]
        assert build["reason"] == "schedule '0 4 9-15 * WED', slot 2026-02-11 04:00 UTC"
        recipes = (await api.get("/bakery/recipes")).json()
        assert recipes[0]["next_run"] == "2026-03-11T04:00:00Z"
        [image] = (await api.get("/bakery/images")).json()
        assert (image["image_id"], image["status"]) == (ready.images[REGION], "available")
    finally:
        await bakery.service.stop()


async def test_api_refuses_bad_input_clearly(
    bakery: Bakery, api: httpx.AsyncClient, runtime: Runtime
) -> None:
    unknown = await api.post("/bakery/builds", json={"recipe": "solaris"})
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "unknown recipe 'solaris'; known recipes: linux"
    assert (await api.post("/bakery/builds", json={"recipe": ""})).status_code == 422
    assert (await api.post("/bakery/builds", json={})).status_code == 422
    first = await api.post("/bakery/builds", json={"recipe": "linux", "reason": "ops"})
    assert first.status_code == 202
    build_id = first.json()["build_id"]
    again = await api.post("/bakery/builds", json={"recipe": "linux"})
    assert again.status_code == 409
    assert again.json()["detail"] == (
        f"recipe 'linux' already has queued build {build_id}; at most one build per recipe "
        "runs at a time"
    )
    assert (await api.get("/bakery/builds/not-a-uuid")).status_code == 422
    missing = await api.get("/bakery/builds/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert (await api.get("/bakery/builds?status=bogus")).status_code == 422
    assert (await api.get("/bakery/builds?limit=0")).status_code == 422
    assert (await api.get("/bakery/images?status=bogus")).status_code == 422
    detail = (await api.get(f"/bakery/builds/{build_id}")).json()
    assert (detail["status"], detail["steps"], detail["log_tail"]) == ("queued", [], [])


async def test_commands_for_a_busy_or_unknown_recipe_are_recorded_not_run(
    bakery: Bakery, api: httpx.AsyncClient, clock: ManualClock
) -> None:
    first = (await api.post("/bakery/builds", json={"recipe": "linux"})).json()["build_id"]
    handler = bakery.service.handlers[BuildImage.name()]
    busy = BuildImage(recipe="linux", reason="schedule", occurred_at=clock.now())
    unknown = BuildImage(recipe="beos", reason="typo", occurred_at=clock.now())
    for message in (busy, unknown, busy):  # the repeat is deduplicated by the inbox
        await handler(message)

    rows = {b["build_id"]: b for b in (await api.get("/bakery/builds")).json()}
    assert len(rows) == 3
    assert rows[str(busy.message_id)]["status"] == "skipped"
    assert rows[str(busy.message_id)]["error"] == f"queued build {first} of this recipe covers it"
    assert rows[str(unknown.message_id)]["status"] == "failed"
    assert rows[str(unknown.message_id)]["error"] == "unknown recipe 'beos'; known: linux"


async def test_builds_wait_with_a_reason_when_aws_is_not_configured(
    runtime: Runtime, settings: BakerySettings
) -> None:
    why = "AWS is not configured for bakery: set HPCFLEET_BAKERY_AUTH_URL"
    bakery = assemble(runtime, settings, load_recipes(settings.recipes), None, unavailable=why)
    app = create_app(title="bakery", routers=[bakery.service.router])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bakery"
    ) as api:
        build_id = (await api.post("/bakery/builds", json={"recipe": "linux"})).json()["build_id"]
        await bakery.runner.reconcile()
        build = (await api.get(f"/bakery/builds/{build_id}")).json()
    assert (build["status"], build["waiting"]) == ("queued", why)


async def insert_running(
    bakery: Bakery, clock: ManualClock, *, attempt: int = 1, lease_left: float = -1.0
) -> str:
    """A build as a worker that died mid-way would leave it."""
    build_id = "5f0c3a5e-0000-4000-8000-00000000000a"
    async with bakery.service.mailbox.engine.begin() as conn:
        await conn.execute(
            insert(builds).values(
                build_id=build_id,
                recipe="linux",
                reason="test",
                status="running",
                requested_at=clock.now(),
                updated_at=clock.now(),
                started_at=clock.now(),
                attempt=attempt,
                version="2026.02.1",
                base_image="ami-00000000",
                backend="ec2",
                owner="dead-host:1:deadbeef",
                lease_until=clock.now() + timedelta(seconds=lease_left),
            )
        )
    return build_id


def launch_tagged(endpoint: str, build_id: str, role: str = "bakery-builder") -> str:
    reservation = ec2(endpoint).run_instances(
        ImageId="ami-12345678",
        InstanceType="c5.large",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "hpcfleet:role", "Value": role},
                    {"Key": "hpcfleet:build", "Value": build_id},
                ],
            }
        ],
    )
    instance_id: str = reservation["Instances"][0]["InstanceId"]
    return instance_id


@pytest.mark.parametrize(
    ("attempt", "image_made", "outcome", "note"),
    [
        (1, False, "succeeded", "started again: the interrupted attempt made no image"),
        (1, True, "succeeded", "picked up: image"),
        (2, False, "failed", "interrupted 2 times by worker restarts; gave up"),
    ],
    ids=["restarted", "picked-up", "gave-up"],
)
async def test_a_build_whose_worker_died_is_taken_over(
    bakery: Bakery,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    api: httpx.AsyncClient,
    attempt: int,
    image_made: bool,
    outcome: str,
    note: str,
) -> None:
    build_id = await insert_running(bakery, clock, attempt=attempt)
    builder = launch_tagged(moto.endpoint, build_id)
    steps = ["resolve-base", "launch-builder"]
    if image_made:  # the dead worker got as far as CreateImage
        made = ec2(moto.endpoint).create_image(
            InstanceId=builder,
            Name="hpcfleet-linux-2026.02.1",
            TagSpecifications=[
                {"ResourceType": "image", "Tags": [{"Key": "hpcfleet:build", "Value": build_id}]}
            ],
        )
        (moto.root_of(made["ImageId"]) / "etc").mkdir(parents=True)
        (moto.root_of(made["ImageId"]) / "etc/slurm-installed").touch()
        steps = ["validate", "publish"]

    async with ClockDriver(clock):
        await bakery.runner.reconcile()  # take-over
        await settle_builds(bakery)
        await bakery.runner.reconcile()  # a restarted build is queued again: start it
        await settle_builds(bakery)

    build = (await api.get(f"/bakery/builds/{build_id}")).json()
    assert build["status"] == outcome, build["error"]
    assert any(note in line for line in build["log_tail"])
    assert any(f"terminated {builder}" in line for line in build["log_tail"])
    assert live_instances(moto.endpoint) == []
    if outcome == "succeeded":
        assert [s["name"] for s in build["steps"]][: len(steps)] == steps
        assert build["attempt"] == attempt + (0 if image_made else 1)
        assert len(await published(bakery)) == 1
    else:
        assert build["error"] == note and await published(bakery) == []


async def test_a_live_lease_is_left_alone_and_strays_are_collected(
    bakery: Bakery, clock: ManualClock, moto: BakeryMoto, base_image: str
) -> None:
    build_id = await insert_running(bakery, clock, lease_left=60)  # another worker, alive
    held = launch_tagged(moto.endpoint, build_id)
    stray = launch_tagged(moto.endpoint, "no-such-build", role="bakery-validator")

    await bakery.runner.reconcile()

    assert live_instances(moto.endpoint) == [held]
    assert stray not in live_instances(moto.endpoint)
    assert bakery.runner.tasks == {}


async def test_a_graceful_stop_cleans_up_and_requeues(
    runtime: Runtime,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    tmp_path: Path,
) -> None:
    path = write_recipe_tree(tmp_path / "r", steps={"os-updates": "sleep 30\n"})
    bakery = assemble(runtime, settings, load_recipes(path), aws)
    app = create_app(title="bakery", routers=[bakery.service.router])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bakery"
    ) as api:
        build_id = (await api.post("/bakery/builds", json={"recipe": "linux"})).json()["build_id"]
        await bakery.service.start_worker(runtime.bus)
        async with ClockDriver(clock):
            for _ in range(500):
                build = (await api.get(f"/bakery/builds/{build_id}")).json()
                if build["phase"] == "os-updates":
                    break
                await asyncio.sleep(0.01)
            assert build["phase"] == "os-updates" and live_instances(moto.endpoint)
            await bakery.service.stop()
        build = (await api.get(f"/bakery/builds/{build_id}")).json()
    assert build["status"] == "queued"
    assert build["waiting"] == "interrupted by a worker stop; starts again at the next pass"
    assert live_instances(moto.endpoint) == []
    assert [s["status"] for s in build["steps"] if s["name"] == "os-updates"] == ["failed"]


async def seed_published(bakery: Bakery, endpoint: str, built: list[datetime]) -> list[str]:
    """Real AMIs, recorded as bakery would have published them on the given days."""
    client = ec2(endpoint)
    made = []
    for n, when in enumerate(built, start=1):
        instance = client.run_instances(
            ImageId="ami-12345678", InstanceType="c5.large", MinCount=1, MaxCount=1
        )
        instance_id = instance["Instances"][0]["InstanceId"]
        image_id = client.create_image(InstanceId=instance_id, Name=f"hpcfleet-linux-2026.0{n}.1")[
            "ImageId"
        ]
        client.terminate_instances(InstanceIds=[instance_id])
        made.append(image_id)
        async with bakery.service.mailbox.engine.begin() as conn:
            await conn.execute(
                insert(images).values(
                    image_id=image_id,
                    region=REGION,
                    recipe="linux",
                    version=f"2026.0{n}.1",
                    build_id=f"build-{n}",
                    base_image="ami-00000000",
                    billing="per-second",
                    built_at=when,
                    status="available",
                    published_at=when,
                )
            )
    return made


async def test_retention_retires_the_oldest_image_once_it_is_unused(
    runtime: Runtime,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    tmp_path: Path,
    api: httpx.AsyncClient,
) -> None:
    policy = {"keep_last": 1, "deprecate_after_days": 7, "deregister_after_days": 30}
    path = write_recipe_tree(tmp_path / "r", retention=policy)
    bakery = assemble(runtime, settings, load_recipes(path), aws)
    start = clock.now()
    old, new = await seed_published(bakery, moto.endpoint, [start - timedelta(days=40), start])
    [snapshot] = [
        m["Ebs"]["SnapshotId"]
        for m in ec2(moto.endpoint).describe_images(ImageIds=[old])["Images"][0][
            "BlockDeviceMappings"
        ]
    ]
    node = ec2(moto.endpoint).run_instances(
        ImageId=old, InstanceType="c5.large", MinCount=1, MaxCount=1
    )
    node_id = node["Instances"][0]["InstanceId"]

    await bakery.retirer.reconcile()  # a node still runs the old image: deprecate only

    rows = {r["image_id"]: r for r in (await api.get("/bakery/images")).json()}
    assert rows[new]["status"] == "available"
    assert (rows[old]["status"], rows[old]["deprecation"]) == ("deprecated", "tag")
    assert rows[old]["retire_reason"].endswith(f"deregistration waits: still used by {node_id}")
    [event] = await retired(bakery)
    assert event.image_id == old and "not among the newest 1" in event.reason
    tags = ec2(moto.endpoint).describe_images(ImageIds=[old])["Images"][0]["Tags"]
    assert {"Key": "hpcfleet:deprecated-at", "Value": start.isoformat()} in tags

    ec2(moto.endpoint).terminate_instances(InstanceIds=[node_id])  # pool rolled the node off
    await bakery.retirer.reconcile()

    rows = {r["image_id"]: r for r in (await api.get("/bakery/images")).json()}
    assert rows[old]["status"] == "deregistered" and rows[new]["status"] == "available"
    gone = ec2(moto.endpoint).describe_images(Filters=[{"Name": "image-id", "Values": [old]}])
    assert gone["Images"] == []
    snapshots = ec2(moto.endpoint).describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert snapshot not in {s["SnapshotId"] for s in snapshots}
    assert len(await retired(bakery)) == 1  # one ImageRetired per image

    async with bakery.service.mailbox.engine.begin() as conn:  # nothing left to do: no-op
        await conn.execute(update(images).values(retire_reason=None))
    await bakery.retirer.reconcile()
    assert len(await retired(bakery)) == 1


async def test_deprecation_uses_ec2_where_the_endpoint_has_it(
    bakery: Bakery, clock: ManualClock, moto: BakeryMoto, api: httpx.AsyncClient
) -> None:
    moto.agent.deprecations = []  # as AWS answers EnableImageDeprecation
    start = clock.now()
    old, _new, _newest, _latest = await seed_published(
        bakery, moto.endpoint, [start - timedelta(days=100 - n) for n in range(4)]
    )

    await bakery.retirer.reconcile()  # keep_last 3, deregister after 90 days: old goes at once

    assert moto.agent.deprecations == [(old, "2026-02-01T12:05:00Z")]
    [row] = [r for r in (await api.get("/bakery/images")).json() if r["image_id"] == old]
    assert (row["status"], row["deprecation"]) == ("deregistered", "ec2")
    assert [e.image_id for e in await retired(bakery)] == [old]
