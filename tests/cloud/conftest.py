"""Fixtures for the cloud tests: one moto server per module, reset before each test, and a
`backend` fixture that runs the contract suite against FakeCloud and AwsCloud-on-moto alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioboto3
import pytest
from botocore.exceptions import ClientError
from cloud_harness import EC2_STATUS, REGION, TEST_CREDENTIALS, Backend, action_name

from shared.cloud.aws import AwsCloud
from shared.cloud.fake import FakeCloud
from shared.cloud.moto_server import MotoServer


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    """The module's moto server, empty: no instances, images, faults or client tokens."""
    moto_server.reset()
    return moto_server


@pytest.fixture(scope="module")
def aws_session() -> aioboto3.Session:
    """One session per module: each new session parses the EC2 model again (~0.4 s)."""
    access_key, secret_key, token = TEST_CREDENTIALS
    return aioboto3.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=token,
        region_name=REGION,
    )


@pytest.fixture
async def ec2(moto: MotoServer, aws_session: aioboto3.Session) -> AsyncIterator[Any]:
    """A raw aioboto3 EC2 client on the moto server, to look behind AwsCloud's back."""
    async with aws_session.client("ec2", endpoint_url=moto.endpoint) as client:
        yield client


@pytest.fixture
async def aws(moto: MotoServer, aws_session: aioboto3.Session) -> AsyncIterator[AwsCloud]:
    """AwsCloud on the moto server, no retries: an injected fault surfaces at once."""
    async with AwsCloud(
        REGION, endpoint_url=moto.endpoint, session=aws_session, max_attempts=1
    ) as cloud:
        yield cloud


@pytest.fixture(params=["fake", "aws"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Sync on purpose: it pulls the async moto fixtures only for the "aws" run."""
    if request.param == "fake":
        fake = FakeCloud()

        async def fake_snapshot_exists(snapshot_id: str) -> bool:
            return snapshot_id in fake.snapshots

        return Backend("fake", fake, lambda op, code: fake.fail(op, code), fake_snapshot_exists)

    moto: MotoServer = request.getfixturevalue("moto")
    cloud: AwsCloud = request.getfixturevalue("aws")
    client = request.getfixturevalue("ec2")

    def moto_fail(operation: str, code: str) -> None:
        moto.inject_fault(action_name(operation), code, status=EC2_STATUS.get(code, 400))

    async def moto_snapshot_exists(snapshot_id: str) -> bool:
        try:
            await client.describe_snapshots(SnapshotIds=[snapshot_id])
        except ClientError:
            return False
        return True

    return Backend("aws", cloud, moto_fail, moto_snapshot_exists)
