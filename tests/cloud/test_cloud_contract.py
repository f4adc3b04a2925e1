"""The Cloud contract: every test runs against FakeCloud and against AwsCloud on a moto server.

Only behaviour both must share lives here; what moto cannot show (pending states that last,
refusing to start a terminated instance) is in the fake's own tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import pytest
from cloud_harness import Backend

from shared.cloud import (
    Cloud,
    CloudError,
    ImageState,
    Instance,
    InstanceState,
    InsufficientCapacity,
    LaunchSpec,
    NotFound,
    Throttled,
)

SPEC = LaunchSpec(
    image_id="ami-12345678",
    instance_type="c5.large",
    tags={"cluster": "c1", "role": "compute"},
    user_data="#!/bin/sh\necho hello\n",
)
UNKNOWN_INSTANCE = "i-0123456789abcdef0"
UNKNOWN_IMAGE = "ami-0123456789abcdef0"


async def converge(cloud: Cloud, ids: Sequence[str], state: InstanceState) -> list[Instance]:
    """Describe until every instance reached `state`; both backends settle within a few calls."""
    for _ in range(5):
        instances = await cloud.describe_instances(ids=ids)
        if all(i.state is state for i in instances):
            return instances
    raise AssertionError(f"{ids} never reached {state}: {[i.state for i in instances]}")


def ids_of(instances: Sequence[Instance]) -> list[str]:
    return sorted(i.instance_id for i in instances)


async def test_launch_with_tags_then_describe_by_tags_and_ids(backend: Backend) -> None:
    cloud = backend.cloud
    launched = await cloud.run_instances(SPEC, 2, "token-c1")
    other = await cloud.run_instances(replace(SPEC, tags={"cluster": "c2"}), 1, "token-c2")

    assert len(launched) == 2
    for instance in launched:
        assert instance.state in (InstanceState.PENDING, InstanceState.RUNNING)
        assert (instance.image_id, instance.instance_type) == ("ami-12345678", "c5.large")
        assert dict(instance.tags) == {"cluster": "c1", "role": "compute"}
        assert instance.zone.startswith("us-east-1")
        assert instance.launch_time.tzinfo is not None
        assert instance.private_ip
    assert ids_of(await cloud.describe_instances(tags={"cluster": "c1"})) == ids_of(launched)
    assert ids_of(await cloud.describe_instances(ids=[other[0].instance_id])) == ids_of(other)
    everything = [i.instance_id for i in launched + other]
    both = await cloud.describe_instances(ids=everything, tags={"cluster": "c1", "role": "compute"})
    assert ids_of(both) == ids_of(launched)
    assert len(await cloud.describe_instances()) == 3
    assert await cloud.describe_instances(ids=[]) == []


async def test_tag_filters_match_exactly_not_as_wildcards(backend: Backend) -> None:
    cloud = backend.cloud
    starred = await cloud.run_instances(replace(SPEC, tags={"cluster": "c*"}), 1, "token-star")
    await cloud.run_instances(SPEC, 1, "token-plain")

    assert ids_of(await cloud.describe_instances(tags={"cluster": "c*"})) == ids_of(starred)
    assert await cloud.describe_instances(tags={"cluster": "c"}) == []


async def test_lifecycle_converges(backend: Backend) -> None:
    cloud = backend.cloud
    ids = [i.instance_id for i in await cloud.run_instances(SPEC, 2, "token-life")]
    await converge(cloud, ids, InstanceState.RUNNING)

    await cloud.stop_instances(ids)
    await converge(cloud, ids, InstanceState.STOPPED)
    await cloud.stop_instances(ids)  # stopping a stopped instance is a no-op
    await converge(cloud, ids, InstanceState.STOPPED)

    await cloud.start_instances(ids)
    await converge(cloud, ids, InstanceState.RUNNING)
    await cloud.start_instances(ids)  # starting a running one too
    await converge(cloud, ids, InstanceState.RUNNING)

    await cloud.terminate_instances(ids)
    await converge(cloud, ids, InstanceState.TERMINATED)


async def test_describe_by_state(backend: Backend) -> None:
    cloud = backend.cloud
    ids = [i.instance_id for i in await cloud.run_instances(SPEC, 3, "token-states")]
    await converge(cloud, ids, InstanceState.RUNNING)
    await cloud.stop_instances(ids[:1])
    await converge(cloud, ids[:1], InstanceState.STOPPED)

    stopped = await cloud.describe_instances(states=[InstanceState.STOPPED])
    running = await cloud.describe_instances(tags={"cluster": "c1"}, states={InstanceState.RUNNING})
    assert ids_of(stopped) == ids[:1]
    assert ids_of(running) == sorted(ids[1:])
    assert await cloud.describe_instances(states=[]) == []


async def test_describe_shows_client_token_and_when_the_state_began(backend: Backend) -> None:
    cloud = backend.cloud
    ids = [i.instance_id for i in await cloud.run_instances(SPEC, 2, "token-seen")]
    running = await converge(cloud, ids, InstanceState.RUNNING)
    for instance in running:
        assert instance.client_token == "token-seen"
        assert instance.state_since == instance.launch_time  # a start is its LaunchTime

    await cloud.stop_instances(ids[:1])
    (stopped,) = await converge(cloud, ids[:1], InstanceState.STOPPED)
    assert stopped.state_since is not None
    # EC2 gives a stop's time to the second
    assert stopped.state_since >= stopped.launch_time.replace(microsecond=0)


async def test_booted_instances_are_the_running_ones_that_passed_their_checks(
    backend: Backend,
) -> None:
    cloud = backend.cloud
    ids = [i.instance_id for i in await cloud.run_instances(SPEC, 3, "token-boot")]
    await converge(cloud, ids, InstanceState.RUNNING)
    await cloud.stop_instances(ids[:1])
    await converge(cloud, ids[:1], InstanceState.STOPPED)

    assert await cloud.booted_instances([*ids, UNKNOWN_INSTANCE]) == set(ids[1:])
    assert await cloud.booted_instances([]) == set()


async def test_client_token_makes_a_retry_return_the_same_instances(backend: Backend) -> None:
    cloud = backend.cloud
    first = await cloud.run_instances(SPEC, 2, "intent-42")
    again = await cloud.run_instances(SPEC, 2, "intent-42")

    assert ids_of(again) == ids_of(first)
    assert len(await cloud.describe_instances()) == 2


@pytest.mark.parametrize(
    ("spec", "count"),
    [(replace(SPEC, instance_type="c5.xlarge"), 2), (SPEC, 3)],
    ids=["other-spec", "other-count"],
)
async def test_client_token_with_other_arguments_is_refused(
    backend: Backend, spec: LaunchSpec, count: int
) -> None:
    cloud = backend.cloud
    await cloud.run_instances(SPEC, 2, "intent-43")

    with pytest.raises(CloudError) as raised:
        await cloud.run_instances(spec, count, "intent-43")
    assert raised.value.code == "IdempotentParameterMismatch"
    assert len(await cloud.describe_instances()) == 2


async def test_terminating_what_is_gone_is_success(backend: Backend) -> None:
    cloud = backend.cloud
    ids = [i.instance_id for i in await cloud.run_instances(SPEC, 2, "token-term")]

    await cloud.terminate_instances(ids)
    await cloud.terminate_instances(ids)
    await cloud.terminate_instances([UNKNOWN_INSTANCE])
    await cloud.terminate_instances([])
    await converge(cloud, ids, InstanceState.TERMINATED)


async def test_one_unknown_id_does_not_stop_terminating_the_rest(backend: Backend) -> None:
    cloud = backend.cloud
    ids = [i.instance_id for i in await cloud.run_instances(SPEC, 2, "token-mixed")]

    await cloud.terminate_instances([ids[0], UNKNOWN_INSTANCE, ids[1], "i-0123456789abcdef1"])
    await converge(cloud, ids, InstanceState.TERMINATED)


async def test_images_create_describe_deregister(backend: Backend) -> None:
    cloud = backend.cloud
    (builder,) = await cloud.run_instances(SPEC, 1, "token-builder")
    await converge(cloud, [builder.instance_id], InstanceState.RUNNING)

    image_id = await cloud.create_image(
        builder.instance_id, "hpc-node-2026-01", {"recipe": "hpc-node"}, "patched January"
    )

    (image,) = await cloud.describe_images(ids=[image_id])
    assert (image.name, image.description) == ("hpc-node-2026-01", "patched January")
    assert dict(image.tags) == {"recipe": "hpc-node"}
    assert image.state in (ImageState.PENDING, ImageState.AVAILABLE)
    assert image.created_at.tzinfo is not None
    assert image.snapshot_ids
    for _ in range(5):
        (image,) = await cloud.describe_images(ids=[image_id])
        if image.state is ImageState.AVAILABLE:
            break
    assert image.state is ImageState.AVAILABLE
    assert [i.image_id for i in await cloud.describe_images()] == [image_id]  # owners=self
    assert [i.image_id for i in await cloud.describe_images(name_pattern="hpc-node-*")] == [
        image_id
    ]
    assert [i.image_id for i in await cloud.describe_images(tags={"recipe": "hpc-node"})] == [
        image_id
    ]
    assert await cloud.describe_images(name_pattern="other-*") == []
    assert await cloud.describe_images(ids=[]) == []

    await cloud.deregister_image(image_id)
    assert await cloud.describe_images(ids=[image_id]) == []
    assert not any([await backend.snapshot_exists(s) for s in image.snapshot_ids])


async def test_deregistering_what_is_gone_is_success(backend: Backend) -> None:
    cloud = backend.cloud
    (builder,) = await cloud.run_instances(SPEC, 1, "token-builder")
    image_id = await cloud.create_image(builder.instance_id, "hpc-node-twice")

    await cloud.deregister_image(image_id)
    await cloud.deregister_image(image_id)
    await cloud.deregister_image(UNKNOWN_IMAGE)


async def test_deregister_can_keep_the_snapshots(backend: Backend) -> None:
    cloud = backend.cloud
    (builder,) = await cloud.run_instances(SPEC, 1, "token-builder")
    image_id = await cloud.create_image(builder.instance_id, "hpc-node-keep")
    (image,) = await cloud.describe_images(ids=[image_id])

    await cloud.deregister_image(image_id, delete_snapshots=False)
    assert all([await backend.snapshot_exists(s) for s in image.snapshot_ids])


async def test_create_tags_adds_and_overwrites(backend: Backend) -> None:
    cloud = backend.cloud
    (instance,) = await cloud.run_instances(SPEC, 1, "token-tags")
    image_id = await cloud.create_image(instance.instance_id, "hpc-node-tags", {"recipe": "a"})

    await cloud.create_tags([instance.instance_id, image_id], {"role": "drained", "gen": "2"})

    (instance,) = await cloud.describe_instances(ids=[instance.instance_id])
    (image,) = await cloud.describe_images(ids=[image_id])
    assert dict(instance.tags) == {"cluster": "c1", "role": "drained", "gen": "2"}
    assert dict(image.tags) == {"recipe": "a", "role": "drained", "gen": "2"}


UnknownCall = Callable[[Cloud], Awaitable[object]]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.describe_instances(ids=[UNKNOWN_INSTANCE]),
        lambda c: c.start_instances([UNKNOWN_INSTANCE]),
        lambda c: c.stop_instances([UNKNOWN_INSTANCE]),
        lambda c: c.create_image(UNKNOWN_INSTANCE, "orphan"),
        lambda c: c.describe_images(ids=[UNKNOWN_IMAGE]),
    ],
    ids=["describe_instances", "start", "stop", "create_image", "describe_images"],
)
async def test_unknown_ids_raise_not_found(backend: Backend, call: UnknownCall) -> None:
    with pytest.raises(NotFound):
        await call(backend.cloud)


async def test_injected_capacity_error_is_typed_and_launches_nothing(backend: Backend) -> None:
    cloud = backend.cloud
    backend.fail_next("run_instances", "InsufficientInstanceCapacity")

    with pytest.raises(InsufficientCapacity) as raised:
        await cloud.run_instances(SPEC, 2, "intent-ice")
    assert raised.value.code == "InsufficientInstanceCapacity"
    assert await cloud.describe_instances() == []
    assert len(await cloud.run_instances(SPEC, 2, "intent-ice")) == 2  # the retry launches


async def test_injected_throttle_is_typed(backend: Backend) -> None:
    cloud = backend.cloud
    backend.fail_next("describe_instances", "RequestLimitExceeded")

    with pytest.raises(Throttled):
        await cloud.describe_instances()
    assert await cloud.describe_instances() == []


@pytest.mark.parametrize(("count", "token"), [(0, "t"), (1, ""), (1, "x" * 65), (1, "é")])
async def test_bad_arguments_are_refused_before_any_call(
    backend: Backend, count: int, token: str
) -> None:
    with pytest.raises(ValueError):
        await backend.cloud.run_instances(SPEC, count, token)
