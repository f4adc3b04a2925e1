"""MotoServer's additions to moto: the /_fault endpoint, ClientToken replay, reset, the CLI."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import aioboto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from shared.cloud import LaunchSpec, Throttled
from shared.cloud.aws import AwsCloud, translate
from shared.cloud.moto_server import MotoServer

SPEC = LaunchSpec(image_id="ami-12345678", instance_type="c5.large")


async def test_faults_are_set_listed_and_cleared_over_http(moto: MotoServer, aws: AwsCloud) -> None:
    async with httpx.AsyncClient(base_url=moto.endpoint) as http:
        posted = await http.post(
            "/_fault",
            json={"action": "DescribeInstances", "code": "RequestLimitExceeded", "count": 2},
        )
        assert posted.status_code == 200
        for _ in range(2):
            with pytest.raises(Throttled):
                await aws.describe_instances()
        assert await aws.describe_instances() == []
        assert (await http.get("/_fault")).json() == {"faults": []}

        await http.post("/_fault", json={"action": "*", "code": "Throttling", "rate": 1.0})
        assert (await http.get("/_fault")).json()["faults"][0]["count"] is None  # until cleared
        with pytest.raises(Throttled):
            await aws.describe_images()
        assert (await http.delete("/_fault")).json() == {"faults": []}
        assert await aws.describe_images() == []


@pytest.mark.parametrize(
    "body",
    ["not json", "[]", '{"action": "RunInstances"}', '{"action": "X", "code": "Y", "rate": 2}'],
)
async def test_a_bad_fault_is_refused(moto: MotoServer, body: str) -> None:
    async with httpx.AsyncClient(base_url=moto.endpoint) as http:
        response = await http.post("/_fault", content=body)
        assert response.status_code == 400
        assert (await http.get("/_fault")).json() == {"faults": []}


async def test_random_faults_fail_some_calls(aws: AwsCloud, moto: MotoServer) -> None:
    moto.inject_fault("DescribeInstances", "RequestLimitExceeded", count=None, rate=0.5)
    outcomes = []
    for _ in range(20):
        try:
            await aws.describe_instances()
            outcomes.append(True)
        except Throttled:
            outcomes.append(False)
    assert 0 < outcomes.count(False) < 20
    (fault,) = moto.middleware.faults()
    assert fault.hits == outcomes.count(False)  # what a chaos run reports it injected


async def test_faults_reach_json_protocol_services(
    moto: MotoServer, aws_session: aioboto3.Session
) -> None:
    moto.inject_fault("DescribeParameters", "ThrottlingException", message="slow down")
    no_retries = Config(retries={"total_max_attempts": 1})
    async with aws_session.client("ssm", endpoint_url=moto.endpoint, config=no_retries) as ssm:
        with pytest.raises(ClientError) as raised:
            await ssm.describe_parameters()
    error = translate(raised.value)
    assert isinstance(error, Throttled)
    assert error.message == "slow down"


async def test_concurrent_launches_with_one_token_launch_once(ec2: Any) -> None:
    async def launch() -> list[str]:
        response = await ec2.run_instances(
            ImageId="ami-12345678",
            InstanceType="c5.large",
            MinCount=2,
            MaxCount=2,
            ClientToken="intent-9",
        )
        return sorted(i["InstanceId"] for i in response["Instances"])

    results = await asyncio.gather(*(launch() for _ in range(5)))

    assert all(r == results[0] for r in results)
    described = await ec2.describe_instances()
    assert sum(len(r["Instances"]) for r in described["Reservations"]) == 2


async def test_reset_forgets_tokens_and_faults(moto: MotoServer, aws: AwsCloud) -> None:
    first = await aws.run_instances(SPEC, 1, "intent-1")
    moto.inject_fault("DescribeImages", "RequestLimitExceeded")

    await asyncio.to_thread(moto.reset)

    assert await aws.describe_images() == []
    again = await aws.run_instances(SPEC, 1, "intent-1")
    assert again[0].instance_id != first[0].instance_id


def test_the_endpoint_needs_a_started_server() -> None:
    server = MotoServer()
    with pytest.raises(RuntimeError):
        _ = server.endpoint
    server.stop()  # stopping a server that never started is harmless


async def test_runs_as_its_own_process() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.cloud.moto_server",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        endpoint = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=endpoint) as http:
            assert (await http.get("/_fault")).json() == {"faults": []}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_ec2_times_on_a_rehearsal_clock_and_a_start_restarts_launch_time() -> None:
    """Found by the chaos run: moto kept an instance's first LaunchTime across stop and start (EC2
    restarts it), and stamped real time while the services ran on an accelerated clock, so the
    pool reported each later run as starting at the first launch, hours "ago", and autogrow billed
    none of them. One hour a second here: a fifth of a second is twelve minutes."""
    epoch = time.time()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.cloud.moto_server",
        "--port",
        "0",
        "--clock-speed",
        "3600",
        "--clock-epoch",
        repr(epoch),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        endpoint = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        session = aioboto3.Session(
            aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        async with session.client("ec2", endpoint_url=endpoint) as ec2:
            launched = await ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)
            instance_id = launched["Instances"][0]["InstanceId"]
            first = launched["Instances"][0]["LaunchTime"].timestamp()
            await asyncio.sleep(0.3)
            await ec2.stop_instances(InstanceIds=[instance_id])
            await asyncio.sleep(0.3)
            await ec2.start_instances(InstanceIds=[instance_id])
            described = await ec2.describe_instances(InstanceIds=[instance_id])
            again = described["Reservations"][0]["Instances"][0]["LaunchTime"].timestamp()
        scaled = epoch + (time.time() - epoch) * 3600
        assert abs(again - scaled) < 0.3 * 3600  # on the rehearsal's clock, not the wall clock
        assert again - first >= 0.5 * 3600  # the start restarted it: >= 0.6 s later, at x3600
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)
