"""What only AwsCloud does: its lifecycle, credentials, retries, pagination, botocore errors."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from cloud_harness import REGION, TEST_CREDENTIALS

from shared.cloud import CloudError, LaunchSpec
from shared.cloud.aws import AwsCloud, session_from_provider
from shared.cloud.moto_server import MotoServer

SPEC = LaunchSpec(image_id="ami-12345678", instance_type="c5.large", tags={"cluster": "c1"})


async def test_calls_before_start_are_refused() -> None:
    cloud = AwsCloud(REGION, endpoint_url="http://127.0.0.1:9", session=lambda: TEST_CREDENTIALS)
    with pytest.raises(RuntimeError):
        await cloud.describe_instances()
    await cloud.close()  # closing a cloud that never started is harmless


async def test_credentials_come_from_an_async_provider_and_are_re_read(moto: MotoServer) -> None:
    fetched = 0

    async def provider() -> tuple[str, str, str | None]:
        nonlocal fetched
        fetched += 1
        return TEST_CREDENTIALS

    # refresh_seconds=0 leaves each fetch inside botocore's refresh window: re-read every call
    session = session_from_provider(provider, refresh_seconds=0)
    async with AwsCloud(REGION, endpoint_url=moto.endpoint, session=session) as cloud:
        await cloud.describe_instances()
        await cloud.describe_images()
    assert fetched >= 2


async def test_a_transient_throttle_is_retried(moto: MotoServer, aws_session: Any) -> None:
    moto.inject_fault("DescribeInstances", "RequestLimitExceeded", status=503)
    async with AwsCloud(
        REGION, endpoint_url=moto.endpoint, session=aws_session, max_attempts=2
    ) as cloud:
        assert await cloud.describe_instances() == []
    assert moto.middleware.faults() == []  # the fault was used up by the first attempt


async def test_describe_follows_pages(moto: MotoServer, aws_session: Any) -> None:
    async with AwsCloud(
        REGION, endpoint_url=moto.endpoint, session=aws_session, page_size=5
    ) as cloud:
        for n in range(7):  # moto pages by reservation, so launch seven
            await cloud.run_instances(SPEC, 1, f"page-{n}")
        assert len(await cloud.describe_instances(tags={"cluster": "c1"})) == 7


async def test_an_unreachable_endpoint_is_a_cloud_error(aws_session: Any) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with AwsCloud(
        REGION, endpoint_url=f"http://127.0.0.1:{port}", session=aws_session, max_attempts=1
    ) as cloud:
        with pytest.raises(CloudError) as raised:
            await cloud.describe_instances()
    assert raised.value.code == "EndpointConnectionError"


async def test_describe_names_the_subnet_and_status_covers_many_ids(
    moto: MotoServer, aws_session: Any
) -> None:
    async with AwsCloud(REGION, endpoint_url=moto.endpoint, session=aws_session) as cloud:
        (instance,) = await cloud.run_instances(SPEC, 1, "subnet-1")
        assert instance.subnet_id is not None and instance.subnet_id.startswith("subnet-")
        many = [i.instance_id for i in await cloud.run_instances(SPEC, 120, "many")]
        assert await cloud.booted_instances(many) == set(many)  # two DescribeInstanceStatus calls
