"""What only FakeCloud does: timed transitions, EC2's state rules, call recording, failures."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.clock import ManualClock
from shared.cloud import (
    CloudError,
    ImageState,
    InstanceState,
    InsufficientCapacity,
    InvalidState,
    LaunchSpec,
    NotFound,
    Throttled,
)
from shared.cloud.fake import FakeCloud

SPEC = LaunchSpec(image_id="ami-12345678", instance_type="c5.large", tags={"cluster": "c1"})


async def state_of(cloud: FakeCloud, instance_id: str) -> InstanceState:
    (instance,) = await cloud.describe_instances(ids=[instance_id])
    return instance.state


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def slow(clock: ManualClock) -> FakeCloud:
    """Transitions take 30 s and images 10 min of the manual clock."""
    return FakeCloud(clock=clock, transition_seconds=30, image_seconds=600)


async def test_every_call_is_recorded_with_its_arguments() -> None:
    cloud = FakeCloud()
    (instance,) = await cloud.run_instances(SPEC, 1, "t1")
    await cloud.stop_instances([instance.instance_id])
    await cloud.describe_instances(tags={"cluster": "c1"})

    assert cloud.calls == [
        ("run_instances", {"spec": SPEC, "count": 1, "client_token": "t1"}),
        ("stop_instances", {"ids": [instance.instance_id]}),
        ("describe_instances", {"ids": None, "tags": {"cluster": "c1"}, "states": None}),
    ]


async def test_without_a_delay_a_transition_settles_at_the_next_call() -> None:
    cloud = FakeCloud(clock=ManualClock())
    (instance,) = await cloud.run_instances(SPEC, 1, "t1")

    assert instance.state is InstanceState.PENDING
    assert await state_of(cloud, instance.instance_id) is InstanceState.RUNNING


async def test_transitions_follow_the_injected_clock(slow: FakeCloud, clock: ManualClock) -> None:
    (instance,) = await slow.run_instances(SPEC, 1, "t1")
    iid = instance.instance_id
    clock.advance(29)
    assert await state_of(slow, iid) is InstanceState.PENDING
    clock.advance(1)
    assert await state_of(slow, iid) is InstanceState.RUNNING

    await slow.stop_instances([iid])
    assert await state_of(slow, iid) is InstanceState.STOPPING
    clock.advance(30)
    assert await state_of(slow, iid) is InstanceState.STOPPED

    clock.advance(600)
    await slow.start_instances([iid])
    (started,) = await slow.describe_instances(ids=[iid])
    assert (started.state, started.launch_time) == (InstanceState.PENDING, clock.now())

    await slow.terminate_instances([iid])
    assert await state_of(slow, iid) is InstanceState.SHUTTING_DOWN
    clock.advance(30)
    (gone,) = await slow.describe_instances(ids=[iid])
    assert (gone.state, gone.private_ip) == (InstanceState.TERMINATED, None)


async def test_terminated_instances_vanish_after_an_hour(
    slow: FakeCloud, clock: ManualClock
) -> None:
    (instance,) = await slow.run_instances(SPEC, 1, "t1")
    await slow.terminate_instances([instance.instance_id])
    clock.advance(30 + 3599)  # nobody looked meanwhile: the hour still counts from t=30
    assert await state_of(slow, instance.instance_id) is InstanceState.TERMINATED
    clock.advance(1)

    assert await slow.describe_instances() == []
    with pytest.raises(NotFound):
        await slow.describe_instances(ids=[instance.instance_id])
    await slow.terminate_instances([instance.instance_id])


async def test_an_image_is_pending_until_it_is_built(slow: FakeCloud, clock: ManualClock) -> None:
    (instance,) = await slow.run_instances(SPEC, 1, "t1")
    image_id = await slow.create_image(instance.instance_id, "hpc-node-1")
    clock.advance(599)
    assert [i.state for i in await slow.describe_images(ids=[image_id])] == [ImageState.PENDING]
    clock.advance(1)
    assert [i.state for i in await slow.describe_images(ids=[image_id])] == [ImageState.AVAILABLE]


async def test_starting_a_terminated_instance_is_refused_and_changes_nothing() -> None:
    cloud = FakeCloud(clock=ManualClock())
    stopped, doomed = (i.instance_id for i in await cloud.run_instances(SPEC, 2, "t1"))
    await cloud.stop_instances([stopped])
    await cloud.terminate_instances([doomed])

    with pytest.raises(InvalidState) as raised:
        await cloud.start_instances([stopped, doomed])
    assert raised.value.code == "IncorrectInstanceState"
    assert await state_of(cloud, stopped) is InstanceState.STOPPED
    with pytest.raises(InvalidState):
        await cloud.stop_instances([doomed])
    with pytest.raises(InvalidState):
        await cloud.create_image(doomed, "from-the-dead")


async def test_pending_cannot_stop_and_stopping_cannot_start(
    slow: FakeCloud, clock: ManualClock
) -> None:
    (instance,) = await slow.run_instances(SPEC, 1, "t1")
    with pytest.raises(InvalidState):
        await slow.stop_instances([instance.instance_id])

    clock.advance(30)
    await slow.stop_instances([instance.instance_id])
    with pytest.raises(InvalidState):
        await slow.start_instances([instance.instance_id])


async def test_fail_raises_for_the_given_number_of_calls() -> None:
    cloud = FakeCloud()
    cloud.fail("describe_instances", "RequestLimitExceeded", times=2)

    for _ in range(2):
        with pytest.raises(Throttled):
            await cloud.describe_instances()
    assert await cloud.describe_instances() == []
    assert [op for op, _ in cloud.calls] == ["describe_instances"] * 3


async def test_fail_until_cleared_with_a_given_error_object() -> None:
    cloud = FakeCloud()
    cloud.fail("run_instances", InsufficientCapacity("InsufficientInstanceCapacity"), times=None)

    raised = []
    for token in ("a", "b", "c"):
        with pytest.raises(InsufficientCapacity) as info:
            await cloud.run_instances(SPEC, 1, token)
        raised.append(info.value)
    assert len({id(e) for e in raised}) == 3  # a fresh exception each time
    cloud.clear_failures()
    assert len(await cloud.run_instances(SPEC, 1, "a")) == 1


async def test_a_lost_response_is_safe_to_retry_with_the_same_token() -> None:
    cloud = FakeCloud()
    cloud.fail("run_instances", "RequestTimeout", after_effect=True)

    with pytest.raises(CloudError):
        await cloud.run_instances(SPEC, 3, "intent-7")
    retried = await cloud.run_instances(SPEC, 3, "intent-7")

    assert len(retried) == 3
    assert len(await cloud.describe_instances()) == 3


async def test_random_failures_are_reproducible_from_the_seed() -> None:
    async def pattern(seed: int) -> list[bool]:
        cloud = FakeCloud(seed=seed)
        cloud.fail_randomly(0.5, operations=["describe_instances"])
        outcomes = []
        for _ in range(40):
            try:
                await cloud.describe_instances()
                outcomes.append(True)
            except Throttled:
                outcomes.append(False)
        await cloud.describe_images()  # not among the operations: never fails
        return outcomes

    first = await pattern(7)
    assert first == await pattern(7)
    assert first != await pattern(8)
    assert 5 < first.count(False) < 35


def test_failure_controls_check_their_arguments() -> None:
    cloud = FakeCloud()
    with pytest.raises(ValueError):
        cloud.fail("launch", "RequestLimitExceeded")
    with pytest.raises(ValueError):
        cloud.fail_randomly(1.5)
    with pytest.raises(ValueError):
        cloud.fail_randomly(0.1, operations=["launch"])


async def test_image_names_are_unique_per_account() -> None:
    cloud = FakeCloud()
    (instance,) = await cloud.run_instances(SPEC, 1, "t1")
    await cloud.create_image(instance.instance_id, "hpc-node-1")

    with pytest.raises(CloudError) as raised:
        await cloud.create_image(instance.instance_id, "hpc-node-1")
    assert raised.value.code == "InvalidAMIName.Duplicate"


async def test_seeded_images_are_found_by_owner_not_by_default() -> None:
    cloud = FakeCloud()
    base = cloud.add_image("ubuntu-24.04-amd64", tags={"os": "ubuntu"})

    assert await cloud.describe_images() == []
    assert await cloud.describe_images(owners=["amazon"], name_pattern="ubuntu-*") == [base]
    assert await cloud.describe_images(ids=[base.image_id]) == [base]


async def test_tagging_an_unknown_resource_is_not_found() -> None:
    cloud = FakeCloud()
    with pytest.raises(NotFound):
        await cloud.create_tags(["i-0123456789abcdef0"], {"a": "b"})


async def test_a_running_instance_boots_after_boot_seconds_unless_it_hangs(
    clock: ManualClock,
) -> None:
    cloud = FakeCloud(clock=clock, transition_seconds=30, boot_seconds=60)
    ok, hung = (i.instance_id for i in await cloud.run_instances(SPEC, 2, "t1"))
    cloud.hang_boot([hung])
    clock.advance(30 + 59)  # running since t=30
    assert await cloud.booted_instances([ok, hung]) == set()
    clock.advance(1)
    assert await cloud.booted_instances([ok, hung, "i-unknown"]) == {ok}
    (running,) = [i for i in cloud.instances() if i.instance_id == ok]
    assert running.state_since == running.launch_time + timedelta(seconds=30)

    await cloud.stop_instances([ok])
    clock.advance(30)
    assert await cloud.booted_instances([ok]) == set()  # stopped: no status checks
