"""Builds end to end against a moto server, with each back-end: real step scripts, real Packer, and
the faults the issue names (failing step, failing validation, Packer failure, throttled
CreateImage, a base filter that matches nothing). Each ends in a clear state and message, with no
instance left running and no ImageReady for an image that was not validated."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from bakery_kit import (
    OTHER_REGION,
    REGION,
    BakeryMoto,
    ClockDriver,
    build_images,
    ec2,
    live_instances,
    published,
    write_recipe_tree,
)

from services.bakery.aws import BakeryAws
from services.bakery.recipes import load_recipes
from services.bakery.service import Bakery, assemble
from services.bakery.settings import BakerySettings
from shared.api import create_app
from shared.clock import ManualClock
from shared.service import Runtime

STEPS_EC2 = [
    "resolve-base",
    "launch-builder",
    "os-updates",
    "slurm-node",
    "bake-first-boot",
    "generalize",
    "stop-builder",
    "create-image",
    "validate",
    "publish",
]


async def run_build(bakery: Bakery, clock: ManualClock, recipe: str = "linux") -> dict[str, Any]:
    """Ask for a build through the API, run the build loop's pass, return GET /builds/{id}."""
    app = create_app(title="bakery", routers=[bakery.service.router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bakery") as client:
        accepted = await client.post("/bakery/builds", json={"recipe": recipe, "reason": "test"})
        assert accepted.status_code == 202, accepted.text
        build_id = accepted.json()["build_id"]
        async with ClockDriver(clock):
            await bakery.runner.reconcile()
            await asyncio.wait_for(asyncio.gather(*bakery.runner.tasks.values()), 60)
        detail = await client.get(f"/bakery/builds/{build_id}")
        assert detail.status_code == 200
        body: dict[str, Any] = detail.json()
        return body


def make(
    runtime: Runtime, settings: BakerySettings, aws: BakeryAws, folder: Path, **recipe: Any
) -> Bakery:
    path = write_recipe_tree(folder, **recipe)
    settings = settings.model_copy(update={"recipes": path})
    return assemble(runtime, settings, load_recipes(path), aws)


async def test_ec2_backend_builds_validates_and_publishes(
    bakery: Bakery, clock: ManualClock, moto: BakeryMoto, base_image: str
) -> None:
    build = await run_build(bakery, clock)

    assert build["status"] == "succeeded", build["error"]
    assert [s["name"] for s in build["steps"]] == STEPS_EC2
    assert all(s["status"] == "succeeded" and s["seconds"] is not None for s in build["steps"])
    assert build["base_image"] == base_image and build["version"] == "2026.02.1"
    image_id = build["image_id"]
    tags = {t["Key"]: t["Value"] for t in build_images(moto.endpoint, build["build_id"])[0]["Tags"]}
    assert tags["hpcfleet:recipe"] == "linux" and tags["hpcfleet:version"] == "2026.02.1"
    assert tags["hpcfleet:base-image"] == base_image and tags["cost-centre"] == "hpc"
    assert tags["hpcfleet:built-at"].startswith("2026-02-01T12:")
    # the steps really ran on the builder, and the image carries what they left
    baked = moto.root_of(image_id) / "var/lib/cloud/scripts/per-instance/hpcfleet-firstboot.sh"
    assert "realm join --computer-ou='OU=HPC' 'corp.example.org'" in baked.read_text()
    assert (moto.root_of(image_id) / "etc/slurm-installed").exists()
    assert any("updating linux 2026.02.1" in line for line in build["log_tail"])
    # builder and test instance are gone
    assert build["builder_id"] and build["validator_id"]
    assert live_instances(moto.endpoint) == []
    [ready] = await published(bakery)
    assert ready.images == {REGION: image_id} and ready.recipe == "linux"
    assert ready.base_image == base_image and ready.version == "2026.02.1"


async def test_copies_to_the_other_regions_before_publishing(
    runtime: Runtime,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    tmp_path: Path,
) -> None:
    bakery = make(
        runtime, settings, aws, tmp_path / "r", regions=[REGION, OTHER_REGION], billing="hourly"
    )
    build = await run_build(bakery, clock)

    assert build["status"] == "succeeded", build["error"]
    assert [s["name"] for s in build["steps"]][-2:] == [f"copy-{OTHER_REGION}", "publish"]
    copy = build["images"][OTHER_REGION]
    [described] = ec2(moto.endpoint, OTHER_REGION).describe_images(ImageIds=[copy])["Images"]
    assert {"Key": "hpcfleet:version", "Value": "2026.02.1"} in described["Tags"]
    [ready] = await published(bakery)
    assert ready.images == {REGION: build["image_id"], OTHER_REGION: copy}
    assert ready.billing == "hourly"


async def test_a_failing_step_fails_the_build_and_leaves_nothing(
    runtime: Runtime,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    tmp_path: Path,
) -> None:
    steps = {"os-updates": "echo ok\n", "slurm-node": "echo 'no slurm package' >&2\nexit 3\n"}
    bakery = make(runtime, settings, aws, tmp_path / "r", steps=steps)
    build = await run_build(bakery, clock)

    assert build["status"] == "failed"
    assert build["error"].startswith("slurm-node failed (exit code 3): no slurm package")
    assert [(s["name"], s["status"]) for s in build["steps"]][-2:] == [
        ("os-updates", "succeeded"),
        ("slurm-node", "failed"),
    ]
    assert live_instances(moto.endpoint) == []
    assert build_images(moto.endpoint, build["build_id"]) == []
    assert await published(bakery) == []


async def test_a_failed_validation_keeps_the_image_out_of_use(
    runtime: Runtime,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    tmp_path: Path,
) -> None:
    steps = {"os-updates": "echo ok\n"}  # slurm never installed: the smoke check must catch it
    bakery = make(runtime, settings, aws, tmp_path / "r", steps=steps)
    build = await run_build(bakery, clock)

    assert build["status"] == "failed"
    assert build["error"].startswith("validation failed: smoke-check failed (exit code 1)")
    assert build["image_id"] is not None and build["validator_id"] is not None
    assert build_images(moto.endpoint, build["build_id"]) == []  # deregistered, never published
    assert live_instances(moto.endpoint) == []
    assert await published(bakery) == []


@pytest.mark.parametrize(
    ("throttles", "outcome"), [(2, "succeeded"), (None, "failed")], ids=["transient", "persistent"]
)
async def test_create_image_throttled(
    bakery: Bakery,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    throttles: int | None,
    outcome: str,
) -> None:
    moto.server.inject_fault("CreateImage", "RequestLimitExceeded", status=503, count=throttles)
    build = await run_build(bakery, clock)

    assert build["status"] == outcome, build["error"]
    assert live_instances(moto.endpoint) == []
    if outcome == "failed":
        assert build["error"] == (
            "CreateImage throttled: gave up after 3 attempts (RequestLimitExceeded)"
        )
        assert [s["name"] for s in build["steps"] if s["status"] == "failed"] == ["create-image"]
        assert await published(bakery) == []
    else:
        assert len(await published(bakery)) == 1


async def test_a_base_filter_that_matches_nothing(
    bakery: Bakery, clock: ManualClock, moto: BakeryMoto
) -> None:
    build = await run_build(bakery, clock)  # no base image seeded

    assert build["status"] == "failed"
    assert build["error"] == (
        "base filter matches no available image (owners self, name 'al2023-ami-*', "
        "region us-east-1)"
    )
    assert [(s["name"], s["status"]) for s in build["steps"]] == [("resolve-base", "failed")]
    assert build["builder_id"] is None and live_instances(moto.endpoint) == []


async def test_packer_backend_builds_against_moto(
    runtime: Runtime,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    tmp_path: Path,
) -> None:
    bakery = make(runtime, settings, aws, tmp_path / "r", backend="packer", smoke_check="echo ok\n")
    build = await run_build(bakery, clock)

    assert build["status"] == "succeeded", (build["error"], build["log_tail"][-20:])
    names = [s["name"] for s in build["steps"]]
    assert names[:2] == ["resolve-base", "launch-builder"]
    assert names.index("os-updates") < names.index("slurm-node") < names.index("create-image")
    assert names[-2:] == ["validate", "publish"]
    assert any("updating linux 2026.02.1" in line for line in build["log_tail"])
    [image] = build_images(moto.endpoint, build["build_id"])
    assert image["ImageId"] == build["image_id"] and image["Name"] == "hpcfleet-linux-2026.02.1"
    assert live_instances(moto.endpoint) == []
    [ready] = await published(bakery)
    assert ready.images == {REGION: build["image_id"]}
    assert list(settings.work_dir.iterdir()) == []  # scratch removed


async def test_a_packer_failure_fails_the_build(
    runtime: Runtime,
    settings: BakerySettings,
    aws: BakeryAws,
    clock: ManualClock,
    moto: BakeryMoto,
    base_image: str,
    tmp_path: Path,
) -> None:
    steps = {"os-updates": "echo 'mirror unreachable' >&2\nexit 7\n"}
    bakery = make(runtime, settings, aws, tmp_path / "r", backend="packer", steps=steps)
    build = await run_build(bakery, clock)

    assert build["status"] == "failed"
    assert build["error"] == (
        "packer build failed (exit 1): amazon-ebs.bakery: Script exited with non-zero exit "
        "status: 7.Allowed exit codes are: [0]"
    )
    assert [s["name"] for s in build["steps"] if s["status"] == "failed"] == ["os-updates"]
    assert any("mirror unreachable" in line for line in build["log_tail"])
    assert live_instances(moto.endpoint) == []
    assert build_images(moto.endpoint, build["build_id"]) == []
    assert await published(bakery) == []
