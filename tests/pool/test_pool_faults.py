"""pool under EC2's faults and its own crashes: capacity runs out, EC2 throttles, a response is
lost, and the worker dies at any point of a pass; each time the pool converges with no duplicate
launch and no orphan instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pool_service_kit import (
    ALIVE,
    Crash,
    Crashing,
    Harness,
    Placements,
    harness,
    pool_spec,
)
from prometheus_client import REGISTRY

from shared.cloud import CloudError

NO_CAPACITY = "InsufficientInstanceCapacity"


def _placements(h: Harness) -> Placements:
    assert isinstance(h.cloud, Placements)
    return h.cloud


async def _view(h: Harness) -> dict[str, Any]:
    async with h.api() as client:
        response = await client.get("/pool/pools/hpc")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def _no_orphans_no_duplicates(h: Harness, rows: list[Any]) -> None:
    alive = h.alive()
    ids = {r.instance_id for r in rows}
    assert {i.instance_id for i in alive} <= ids, "an instance no row accounts for"
    tokens = [i.client_token for i in h.cloud.instances()]
    assert len(tokens) == len(set(tokens)), "two instances from one launch intent"


async def test_capacity_falls_back_to_the_next_type_and_backs_off(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=4)) as h:
        _placements(h).no_capacity = {("c7i.large", "us-east-1a"), ("c7i.large", "us-east-1b")}
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))

        assert {i.instance_type for i in h.alive()} == {"c6i.large"}
        view = await _view(h)
        held = {(b["instance_type"], b["zone"]) for b in view["backoffs"]}
        assert held == {("c7i.large", "us-east-1a"), ("c7i.large", "us-east-1b")}
        assert all(r.last_error is None for r in await h.rows())


async def test_no_capacity_anywhere_keeps_the_nodes_and_says_so(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        kept = {i.instance_id for i in h.alive()}
        _placements(h).no_capacity = {
            (t, s.zone) for t in ("c7i.large", "c6i.large") for s in pool_spec().subnets
        }
        response = await h.put(pool_spec(size=4, image_id="ami-1"))
        assert response.status_code == 200, response.text

        for _ in range(4):
            await h.tick()
        tried = len(h.launches())
        for _ in range(5):  # backed off: no launch is even tried for 10 minutes
            await h.tick()
        assert len(h.launches()) == tried

        assert {i.instance_id for i in h.alive()} == kept
        view = await _view(h)
        assert any("insufficient capacity" in p for p in view["problems"])
        assert view["available"] == 2
        problems = REGISTRY.get_sample_value("hpcfleet_pool_problems", {"pool": "hpc"})
        assert problems is not None and problems >= 1

        _placements(h).no_capacity.clear()
        await h.run(40, lambda: h.warm("ami-1"))  # back-offs lapse after 10 minutes
        assert len(h.alive()) == 4


async def test_a_short_throttle_is_retried_within_the_pass(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        h.cloud.fail("describe_instances", "RequestLimitExceeded", times=2)
        h.cloud.fail("run_instances", "RequestLimitExceeded", times=2)
        await h.image_ready("ami-1")
        await h.tick()
        assert len({a["client_token"] for a in h.launches()}) == 2
        await h.run(12, lambda: h.warm("ami-1"))


async def test_a_persistent_throttle_skips_the_pass_and_keeps_the_launch_intents(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        await h.image_ready("ami-1")
        h.cloud.fail("run_instances", "RequestLimitExceeded", times=None)
        await h.tick()
        rows = await h.rows()
        assert [r.state for r in rows] == ["launching", "launching"]
        view = await _view(h)
        assert any("left for the next pass" in p for p in view["problems"])

        h.cloud.clear_failures()
        h.cloud.fail("describe_instances", "RequestLimitExceeded", times=None)
        with pytest.raises(RuntimeError, match="RequestLimitExceeded"):
            await h.tick()
        view = await _view(h)
        assert any("cannot observe" in p for p in view["problems"])

        h.cloud.clear_failures()
        await h.run(12, lambda: h.warm("ami-1"))
        tokens = {a["client_token"] for a in h.launches()}
        assert tokens == {r.client_token for r in rows}  # the same intents, retried


async def test_a_lost_run_instances_response_launches_once(tmp_path: Path) -> None:
    async with harness(tmp_path, spec=pool_spec(size=2)) as h:
        h.cloud.fail("run_instances", CloudError("InternalError", "lost"), after_effect=True)
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        _no_orphans_no_duplicates(h, await h.rows())
        assert len(h.cloud.instances()) == 2


CRASHES = [
    ("run_instances", 2, True),
    ("run_instances", 2, False),
    ("stop_instances", 1, True),
    ("terminate_instances", 1, True),
    ("terminate_instances", 1, False),
    ("describe_instances", 3, False),
]


@pytest.mark.parametrize(("operation", "nth", "after"), CRASHES)
async def test_a_worker_killed_mid_rollout_converges_on_restart(
    tmp_path: Path, operation: str, nth: int, after: bool
) -> None:
    async with harness(tmp_path, spec=pool_spec(size=4, max_surge_percent=50)) as h:
        await h.image_ready("ami-1")
        await h.run(12, lambda: h.warm("ami-1"))
        crashing = Crashing(h.cloud, operation, nth, after=after)
        h.restart(crashing)

        await h.image_ready("ami-2")
        with pytest.raises(Crash):
            for _ in range(30):
                await h.tick()
        assert crashing.seen >= nth

        h.restart()  # the worker again, on the real EC2
        await h.run(40, lambda: h.warm("ami-2"))
        _no_orphans_no_duplicates(h, await h.rows())
        launched = {i.instance_id for i in h.cloud.instances()}
        assert len(launched) <= 4 + 4 + 1, "more launches than the rollout needs"
        assert len([i for i in h.cloud.instances() if i.state in ALIVE]) == 4


async def test_a_worker_killed_between_run_instances_and_its_commit_at_cold_start(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, spec=pool_spec(size=4)) as h:
        h.restart(Crashing(h.cloud, "run_instances", 1, after=True))
        await h.image_ready("ami-1")
        with pytest.raises(Crash):
            await h.tick()
        assert [r.state for r in await h.rows()] == ["launching"] * 4

        h.restart()
        await h.run(12, lambda: h.warm("ami-1"))
        _no_orphans_no_duplicates(h, await h.rows())
        assert len(h.cloud.instances()) == 4
