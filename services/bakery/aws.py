"""bakery's AWS adapter: the shared `Cloud` per region, plus what `Cloud` lacks (SSM Run Command,
CopyImage, image deprecation, "which instances use this image").

One long-lived client per service and region, made on first use and closed with `close()`. botocore
errors become `shared.cloud` typed errors, so callers retry `Throttled` and nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from shared.cloud import Cloud, CloudError
from shared.cloud.aws import AwsCloud, translate

FINAL_COMMAND_STATES = frozenset({"Success", "Failed", "Cancelled", "TimedOut"})
LIVE_INSTANCE_STATES = ("pending", "running", "stopping", "stopped")


@dataclass(frozen=True)
class CommandResult:
    """One SSM command on one instance; `status` is SSM's (InProgress, Success, Failed, ...)."""

    status: str
    exit_code: int | None
    stdout: str
    stderr: str

    @property
    def finished(self) -> bool:
        return self.status in FINAL_COMMAND_STATES


class BakeryAws:
    """EC2 (through `Cloud`) and SSM in every region a recipe names.

    `endpoint_url` set means a rehearsal against a moto server: there, an operation the endpoint
    does not implement (image deprecation) is reported as unsupported instead of as an error.
    """

    def __init__(
        self,
        session: aioboto3.Session,
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.session = session
        self.endpoint_url = endpoint_url
        self._max_attempts = max_attempts
        self._config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=60,
        )
        self._stack = AsyncExitStack()
        self._clouds: dict[str, AwsCloud] = {}
        self._clients: dict[tuple[str, str], Any] = {}

    async def close(self) -> None:
        clouds, self._clouds, self._clients = self._clouds, {}, {}
        for cloud in clouds.values():
            await cloud.close()
        await self._stack.aclose()
        self._stack = AsyncExitStack()

    async def cloud(self, region: str) -> Cloud:
        """The shared EC2 interface in `region`."""
        cloud = self._clouds.get(region)
        if cloud is None:
            cloud = AwsCloud(
                region,
                endpoint_url=self.endpoint_url,
                session=self.session,
                max_attempts=self._max_attempts,
            )
            await cloud.start()
            self._clouds[region] = cloud
        return cloud

    async def _client(self, service: str, region: str) -> Any:
        client = self._clients.get((service, region))
        if client is None:
            client = await self._stack.enter_async_context(
                self.session.client(
                    service, region_name=region, endpoint_url=self.endpoint_url, config=self._config
                )
            )
            self._clients[(service, region)] = client
        return client

    @asynccontextmanager
    async def _call(self, service: str, region: str) -> AsyncIterator[Any]:
        client = await self._client(service, region)
        try:
            yield client
        except ClientError as error:
            raise translate(error) from error
        except (BotoCoreError, ResponseParserError) as error:  # the latter: a non-AWS answer
            raise CloudError(type(error).__name__, str(error)[:300]) from error

    async def send_command(
        self,
        region: str,
        instance_id: str,
        *,
        document: str,
        commands: list[str],
        timeout_seconds: int,
        comment: str,
    ) -> str:
        async with self._call("ssm", region) as ssm:
            response = await ssm.send_command(
                InstanceIds=[instance_id],
                DocumentName=document,
                Parameters={"commands": commands, "executionTimeout": [str(timeout_seconds)]},
                Comment=comment[:100],
            )
        return str(response["Command"]["CommandId"])

    async def command_result(
        self, region: str, command_id: str, instance_id: str
    ) -> CommandResult | None:
        """The command's state on the instance, or None until SSM knows the invocation."""
        try:
            async with self._call("ssm", region) as ssm:
                item = await ssm.get_command_invocation(
                    CommandId=command_id, InstanceId=instance_id
                )
        except CloudError as error:
            if error.code == "InvocationDoesNotExist":
                return None
            raise
        code = item.get("ResponseCode")
        return CommandResult(
            status=str(item.get("Status", "")),
            exit_code=int(code) if code is not None and int(code) >= 0 else None,
            stdout=str(item.get("StandardOutputContent") or ""),
            stderr=str(item.get("StandardErrorContent") or ""),
        )

    async def copy_image(
        self, source_region: str, image_id: str, target_region: str, name: str, token: str
    ) -> str:
        async with self._call("ec2", target_region) as ec2:
            response = await ec2.copy_image(
                SourceRegion=source_region,
                SourceImageId=image_id,
                Name=name,
                ClientToken=token[:64],
            )
        return str(response["ImageId"])

    async def deprecate_image(self, region: str, image_id: str, at: datetime) -> bool:
        """Set EC2's deprecation time; False if the endpoint does not implement it (moto)."""
        try:
            async with self._call("ec2", region) as ec2:
                await ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=at)
        except CloudError as error:
            unimplemented = error.code in ("NotImplemented", "InvalidAction") or (
                self.endpoint_url is not None and isinstance(error.__cause__, ResponseParserError)
            )
            if unimplemented:
                return False
            raise
        return True

    async def instances_using(self, region: str, image_id: str) -> list[str]:
        """Instances not terminated (stopped ones included) launched from `image_id`."""
        found: list[str] = []
        async with self._call("ec2", region) as ec2:
            paginator = ec2.get_paginator("describe_instances")
            async for page in paginator.paginate(
                Filters=[
                    {"Name": "image-id", "Values": [image_id]},
                    {"Name": "instance-state-name", "Values": list(LIVE_INSTANCE_STATES)},
                ]
            ):
                for reservation in page["Reservations"]:
                    found.extend(i["InstanceId"] for i in reservation["Instances"])
        return sorted(found)
