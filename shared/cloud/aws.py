"""`AwsCloud`: the Cloud interface on EC2 through aioboto3 (real AWS, or a moto server).

One long-lived client per instance (`async with AwsCloud(...)`, or `start()` / `close()`), so calls
reuse its connection pool. botocore errors become the typed errors of `shared.cloud.base`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import aioboto3
import botocore.session
from aiobotocore.credentials import AioCredentialResolver, AioDeferredRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.cloud.base import (
    CloudError,
    Image,
    ImageState,
    Instance,
    InstanceState,
    LaunchSpec,
    NotFound,
    check_client_token,
    error_for_code,
)

Credentials = tuple[str, str, str | None]
"""(access key, secret key, session token): what the auth service hands out."""

CredentialProvider = Callable[[], Credentials | Awaitable[Credentials]]

_BOTOCORE_ADVISORY_REFRESH = 15 * 60  # botocore refreshes when this much validity is left
_INSTANCE_ID = re.compile(r"i-[0-9a-zA-Z]+")
_STATUS_IDS_PER_CALL = 100  # DescribeInstanceStatus takes at most 100 explicit ids
# "User initiated (2026-01-01 12:00:00 GMT)": the only place EC2 says when a stop happened
_TRANSITION_TIME = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")


class _FixedProvider:
    """Hands botocore our refreshable credentials instead of searching env, files and metadata."""

    METHOD = CANONICAL_NAME = "hpcfleet-provider"

    def __init__(self, credentials: AioDeferredRefreshableCredentials) -> None:
        self._credentials = credentials

    async def load(self) -> AioDeferredRefreshableCredentials:
        return self._credentials


def session_from_provider(
    provider: CredentialProvider, refresh_seconds: float = 300.0
) -> aioboto3.Session:
    """A session that re-reads credentials from `provider` every `refresh_seconds`.

    A long-lived client outlives STS credentials (1 h by default). botocore only refreshes
    credentials that carry an expiry, and the provider gives none, so each fetch is stamped to
    expire 15 min (botocore's advisory window) plus `refresh_seconds` later. The auth service never
    hands out credentials with less than ~20 min left, so those in use are always valid.
    """

    async def refresh() -> dict[str, str | None]:
        result = provider()
        access_key, secret_key, token = await result if inspect.isawaitable(result) else result
        expiry = datetime.now(UTC) + timedelta(seconds=_BOTOCORE_ADVISORY_REFRESH + refresh_seconds)
        return {
            "access_key": access_key,
            "secret_key": secret_key,
            "token": token,
            "expiry_time": expiry.isoformat(),
        }

    credentials = AioDeferredRefreshableCredentials(
        refresh_using=refresh, method=_FixedProvider.METHOD
    )
    botocore_session = AioSession()
    botocore_session.register_component(
        "credential_provider", AioCredentialResolver([_FixedProvider(credentials)])
    )
    return aioboto3.Session(botocore_session=botocore_session)


@functools.cache
def instance_types() -> frozenset[str]:
    """Every instance type EC2's API model (as pinned with aioboto3) names; loading it takes about
    half a second, so it is read once, on first use."""
    model = botocore.session.get_session().get_service_model("ec2")
    return frozenset(model.shape_for("InstanceType").enum or ())


def translate(error: ClientError) -> CloudError:
    """The typed error for a botocore ClientError."""
    details = error.response.get("Error", {})
    return error_for_code(str(details.get("Code", "Unknown")), str(details.get("Message") or ""))


class AwsCloud:
    """The Cloud interface on EC2.

    `session` is an `aioboto3.Session`, or a callable returning (access key, secret key, session
    token), sync or async, that is re-read periodically (see `session_from_provider`); `None` uses
    botocore's default chain. `max_attempts` counts the first try: botocore's standard retries
    handle a short throttle, and the caller's reconcile loop handles the rest.
    """

    def __init__(
        self,
        region: str,
        *,
        endpoint_url: str | None = None,
        session: aioboto3.Session | CredentialProvider | None = None,
        max_attempts: int = 3,
        page_size: int = 1000,
    ) -> None:
        if session is None:
            resolved = aioboto3.Session()
        elif callable(session):  # a Session is not callable
            resolved = session_from_provider(session)
        else:
            resolved = session
        self.region = region
        self._session = resolved
        self._endpoint_url = endpoint_url
        self._config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=64,
        )
        self._page_size = page_size
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    async def start(self) -> None:
        """Create the EC2 client; idempotent."""
        if self._stack is not None:
            return
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(
            self._session.client(
                "ec2",
                region_name=self.region,
                endpoint_url=self._endpoint_url,
                config=self._config,
            )
        )
        self._stack = stack

    async def close(self) -> None:
        """Close the client and its connections; idempotent."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def _ec2(self) -> AsyncIterator[Any]:
        """The client, with botocore's errors translated to ours."""
        if self._client is None:
            raise RuntimeError("AwsCloud is not started: use `async with` or call start()")
        try:
            yield self._client
        except ClientError as error:
            raise translate(error) from error
        except BotoCoreError as error:
            raise CloudError(type(error).__name__, str(error)) from error

    async def run_instances(
        self, spec: LaunchSpec, count: int, client_token: str
    ) -> list[Instance]:
        if count < 1:
            raise ValueError("count must be at least 1")
        check_client_token(client_token)
        params: dict[str, Any] = {
            "ImageId": spec.image_id,
            "InstanceType": spec.instance_type,
            "MinCount": count,  # Min == Max: all or nothing, like a pool expects
            "MaxCount": count,
            "ClientToken": client_token,
        }
        if spec.subnet_id:
            params["SubnetId"] = spec.subnet_id
        if spec.zone:
            params["Placement"] = {"AvailabilityZone": spec.zone}
        if spec.security_group_ids:
            params["SecurityGroupIds"] = list(spec.security_group_ids)
        if spec.tags:
            params["TagSpecifications"] = [
                {"ResourceType": kind, "Tags": _tag_list(spec.tags)}
                for kind in ("instance", "volume")
            ]
        if spec.user_data is not None:
            params["UserData"] = spec.user_data  # botocore base64-encodes it
        if spec.iam_instance_profile:
            key = "Arn" if spec.iam_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: spec.iam_instance_profile}
        if spec.launch_template:
            ref = spec.launch_template
            key = "LaunchTemplateId" if ref.template.startswith("lt-") else "LaunchTemplateName"
            params["LaunchTemplate"] = {key: ref.template, "Version": ref.version}
        async with self._ec2() as ec2:
            response = await ec2.run_instances(**params)
        return [_instance(item) for item in response["Instances"]]

    async def start_instances(self, ids: Sequence[str]) -> None:
        if ids:
            async with self._ec2() as ec2:
                await ec2.start_instances(InstanceIds=list(ids))

    async def stop_instances(self, ids: Sequence[str]) -> None:
        if ids:
            async with self._ec2() as ec2:
                await ec2.stop_instances(InstanceIds=list(ids))

    async def terminate_instances(self, ids: Sequence[str]) -> None:
        """EC2 refuses the whole call if one id is unknown, so drop those it names and retry."""
        remaining = list(dict.fromkeys(ids))
        while remaining:
            try:
                async with self._ec2() as ec2:
                    await ec2.terminate_instances(InstanceIds=remaining)
                return
            except NotFound as error:
                missing = set(_INSTANCE_ID.findall(error.message)) & set(remaining)
                if not missing:  # the message named no id we sent: go one by one
                    if len(remaining) == 1:
                        return
                    for instance_id in remaining:
                        await self.terminate_instances([instance_id])
                    return
                remaining = [i for i in remaining if i not in missing]

    async def describe_instances(
        self,
        ids: Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        states: Collection[InstanceState] | None = None,
    ) -> list[Instance]:
        if (ids is not None and not ids) or (states is not None and not states):
            return []
        filters = _tag_filters(tags)
        if states:
            filters.append({"Name": "instance-state-name", "Values": [str(s) for s in states]})
        params: dict[str, Any] = {"Filters": filters}
        if ids is not None:
            params["InstanceIds"] = list(ids)
        else:  # EC2 refuses a page size together with InstanceIds
            params["PaginationConfig"] = {"PageSize": self._page_size}
        found: list[Instance] = []
        async with self._ec2() as ec2:
            async for page in ec2.get_paginator("describe_instances").paginate(**params):
                for reservation in page["Reservations"]:
                    found.extend(_instance(item) for item in reservation["Instances"])
        # tag filters take wildcards, so `*` in a value would widen the match: check exactly
        return [i for i in found if _has_tags(i.tags, tags)]

    async def booted_instances(self, ids: Sequence[str]) -> set[str]:
        """Ask in chunks of 100; an id EC2 no longer knows is dropped and the chunk asked again."""
        booted: set[str] = set()
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _STATUS_IDS_PER_CALL):
            chunk = unique[start : start + _STATUS_IDS_PER_CALL]
            while chunk:
                try:
                    booted.update(await self._booted(chunk))
                    break
                except NotFound as error:
                    missing = set(_INSTANCE_ID.findall(error.message)) & set(chunk)
                    if not missing:
                        raise
                    chunk = [i for i in chunk if i not in missing]
        return booted

    async def _booted(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        async with self._ec2() as ec2:
            async for page in ec2.get_paginator("describe_instance_status").paginate(
                InstanceIds=ids
            ):
                for status in page["InstanceStatuses"]:
                    checks = (status.get("InstanceStatus", {}), status.get("SystemStatus", {}))
                    if all(check.get("Status") == "ok" for check in checks):
                        found.add(status["InstanceId"])
        return found

    async def create_image(
        self,
        instance_id: str,
        name: str,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> str:
        params: dict[str, Any] = {"InstanceId": instance_id, "Name": name}
        if description is not None:
            params["Description"] = description
        if tags:
            # image tags only: moto answers 500 to ResourceType=snapshot (notes §1)
            params["TagSpecifications"] = [{"ResourceType": "image", "Tags": _tag_list(tags)}]
        async with self._ec2() as ec2:
            response = await ec2.create_image(**params)
        return str(response["ImageId"])

    async def describe_images(
        self,
        ids: Sequence[str] | None = None,
        owners: Sequence[str] | None = None,
        name_pattern: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Image]:
        if ids is not None and not ids:
            return []
        filters = _tag_filters(tags)
        if name_pattern is not None:
            filters.append({"Name": "name", "Values": [name_pattern]})
        params: dict[str, Any] = {"Filters": filters}
        if ids is not None:
            params["ImageIds"] = list(ids)
        else:
            params["PaginationConfig"] = {"PageSize": self._page_size}
        if owners is not None:
            params["Owners"] = list(owners)
        elif ids is None:
            params["Owners"] = ["self"]
        found: list[Image] = []
        async with self._ec2() as ec2:
            async for page in ec2.get_paginator("describe_images").paginate(**params):
                found.extend(_image(item) for item in page["Images"])
        return [i for i in found if _has_tags(i.tags, tags)]

    async def deregister_image(self, image_id: str, delete_snapshots: bool = True) -> None:
        """Read the snapshot ids first: once deregistered, the image no longer names them.

        AWS deletes them itself with DeleteAssociatedSnapshots; moto ignores that flag, so delete
        them explicitly too (an already-deleted snapshot is success).
        """
        try:
            images = await self.describe_images(ids=[image_id])
        except NotFound:
            return
        try:
            async with self._ec2() as ec2:
                await ec2.deregister_image(
                    ImageId=image_id, DeleteAssociatedSnapshots=delete_snapshots
                )
        except NotFound:
            pass  # deregistered meanwhile: its snapshots may still need deleting
        if not delete_snapshots:
            return
        for snapshot_id in (s for image in images for s in image.snapshot_ids):
            try:
                async with self._ec2() as ec2:
                    await ec2.delete_snapshot(SnapshotId=snapshot_id)
            except NotFound:
                pass

    async def create_tags(self, resource_ids: Sequence[str], tags: Mapping[str, str]) -> None:
        if resource_ids and tags:
            async with self._ec2() as ec2:
                await ec2.create_tags(Resources=list(resource_ids), Tags=_tag_list(tags))


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _tag_filters(tags: Mapping[str, str] | None) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in (tags or {}).items()]


def _has_tags(actual: Mapping[str, str], wanted: Mapping[str, str] | None) -> bool:
    return all(actual.get(k) == v for k, v in (wanted or {}).items())


def _tags(item: Mapping[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


def _instance(item: Mapping[str, Any]) -> Instance:
    state = InstanceState(item["State"]["Name"])
    launch_time = item["LaunchTime"].astimezone(UTC)
    return Instance(
        instance_id=item["InstanceId"],
        state=state,
        image_id=item.get("ImageId", ""),
        instance_type=item["InstanceType"],
        zone=item.get("Placement", {}).get("AvailabilityZone", ""),
        tags=_tags(item),
        launch_time=launch_time,
        private_ip=item.get("PrivateIpAddress") or None,
        client_token=item.get("ClientToken") or None,
        subnet_id=item.get("SubnetId") or None,
        state_since=_state_since(state, launch_time, item.get("StateTransitionReason") or ""),
    )


def _state_since(state: InstanceState, launch_time: datetime, reason: str) -> datetime | None:
    """When the instance entered `state`: a start is its LaunchTime, a stop or termination the
    time in its StateTransitionReason (to the second, UTC); None where EC2 does not say."""
    if state in (InstanceState.PENDING, InstanceState.RUNNING):
        return launch_time
    match = _TRANSITION_TIME.search(reason)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def _image(item: Mapping[str, Any]) -> Image:
    return Image(
        image_id=item["ImageId"],
        name=item.get("Name", ""),
        state=ImageState(item["State"]),
        tags=_tags(item),
        created_at=datetime.fromisoformat(item["CreationDate"]).astimezone(UTC),
        description=item.get("Description") or None,
        snapshot_ids=tuple(
            m["Ebs"]["SnapshotId"]
            for m in item.get("BlockDeviceMappings", [])
            if m.get("Ebs", {}).get("SnapshotId")
        ),
        owner_id=item.get("OwnerId"),
    )
