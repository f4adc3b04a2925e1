"""pool's REST API: PUT refuses bad specs with a clear 4xx, GETs report counts, progress, nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pool_service_kit import harness, pool_spec

from shared.events import ImageRetired


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = pool_spec().model_dump(mode="json")
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("changes", "status", "says"),
    [
        ({"size": -1}, 422, "greater than or equal to 0"),
        (
            {"instance_types": ["c7i.large", "c99z.huge"]},
            422,
            "unknown instance type(s): c99z.huge",
        ),
        ({"max_surge_percent": 0, "max_unavailable_percent": 0}, 422, "invalid budget"),
        ({"image_id": "ami-doesnotexist"}, 422, "does not exist"),
        ({"name": "other"}, 422, "the body names pool 'other'"),
        ({"tags": {"hpcfleet:pool": "x"}}, 422, "reserved"),
        ({"subnets": []}, 422, "at least 1"),
    ],
    ids=["negative-size", "unknown-type", "zero-budget", "no-such-image", "name", "tag", "subnets"],
)
async def test_put_refuses_bad_specs(
    tmp_path: Path, changes: dict[str, Any], status: int, says: str
) -> None:
    async with harness(tmp_path) as h, h.api() as client:
        response = await client.put("/pool/pools/hpc", json=_body(**changes))
        assert response.status_code == status, response.text
        assert says in response.text
        assert (await client.get("/pool/pools/hpc")).status_code == 404


async def test_put_accepts_an_image_ec2_has_and_refuses_a_retired_one(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        image = h.cloud.add_image("hpc-node-2026-03", owner=h.cloud.account_id)
        async with h.api() as client:
            ok = await client.put("/pool/pools/hpc", json=_body(image_id=image.image_id))
            assert ok.status_code == 200, ok.text
            assert ok.json()["spec"]["image_id"] == image.image_id

        await h.image_ready("ami-1")
        await h.publish(ImageRetired(occurred_at=h.clock.now(), image_id="ami-1", reason="bad"))
        async with h.api() as client:
            retired = await client.put("/pool/pools/hpc", json=_body(image_id="ami-1"))
        assert retired.status_code == 422
        assert "ami-1 is retired: bad" in retired.text


async def test_pools_may_not_share_a_node_name_prefix(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec()) as h, h.api() as client:
        clash = await client.put("/pool/pools/gpu", json=_body(name="gpu", node_name_prefix="node"))
        assert clash.status_code == 409
        assert "clashes" in clash.json()["detail"]
        ok = await client.put("/pool/pools/gpu", json=_body(name="gpu", node_name_prefix="gpu"))
        assert ok.status_code == 200
        names = [p["name"] for p in (await client.get("/pool/pools")).json()]
        assert names == ["gpu", "hpc"]


async def test_a_new_pool_takes_the_newest_image_of_its_recipe(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.image_ready("ami-sles", recipe="sles")
        await h.image_ready("ami-linux", recipe="linux")
        response = await h.put(pool_spec(recipe="sles"))
        assert response.json()["spec"]["image_id"] == "ami-sles"
        await h.image_ready("ami-linux-2", recipe="linux")  # another recipe: not followed
        assert (await h.spec()).image_id == "ami-sles"


async def test_image_retired_rolls_the_pool_back_to_the_newest_image_left(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        h.clock.advance(60)
        await h.image_ready("ami-2")
        await h.image_ready("ami-0", built_at=h.clock.now().replace(year=2025))  # late, older
        assert (await h.spec()).image_id == "ami-2"

        await h.publish(ImageRetired(occurred_at=h.clock.now(), image_id="ami-2", reason="bad"))
        assert (await h.spec()).image_id == "ami-1"
        await h.run(12, lambda: h.warm("ami-1"))
        async with h.api() as client:
            images = {i["image_id"]: i for i in (await client.get("/pool/images")).json()}
        assert images["ami-2"]["retire_reason"] == "bad"
        assert images["ami-1"]["retired_at"] is None


async def test_nodes_are_listed_with_filters_and_pages(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=5)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        h.clock.advance(3600)
        async with h.api() as client:
            first = (await client.get("/pool/pools/hpc/nodes", params={"limit": 3})).json()
            rest = (
                await client.get(
                    "/pool/pools/hpc/nodes", params={"limit": 3, "after": first["next"]}
                )
            ).json()
            running = (
                await client.get("/pool/pools/hpc/nodes", params={"state": "running"})
            ).json()
            missing = await client.get("/pool/pools/nope/nodes")
            bad = await client.get("/pool/pools/hpc/nodes", params={"state": "asleep"})

        assert len(first["nodes"]) == 3 and first["next"] == first["nodes"][-1]["node_id"]
        assert len(rest["nodes"]) == 2 and rest["next"] is None
        node = first["nodes"][0]
        assert node["state"] == "stopped" and node["provisioned"] is True
        assert node["outdated"] is False and node["billing_since"] is None
        assert 3600 < node["age_seconds"] < 4000
        assert node["scheduler_node_name"].startswith("node")
        assert running["nodes"] == []
        assert missing.status_code == 404
        assert bad.status_code == 422


async def test_the_pool_view_shows_replacement_progress(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=4, max_surge_percent=25)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        await h.image_ready("ami-2")
        await h.tick()
        async with h.api() as client:
            view = (await client.get("/pool/pools/hpc")).json()
        progress = view["replacement"]
        assert progress["image_id"] == "ami-2"
        assert (progress["old"], progress["fresh"], progress["warming"]) == (4, 0, 1)
        assert progress["complete"] is False
        assert view["by_image"] == {"ami-1": 4, "ami-2": 1}
        assert view["last_actions"]["Launch"] == 1
