"""The pool's EC2 calls: throttling retried with jittered exponential back-off, errors counted.

Every call the pool makes goes through here, so a throttle never fails a pass on its first
occurrence, and `hpcfleet_pool_cloud_errors_total` shows what EC2 refused, by operation and code.
Back-off sleeps are real time even under an accelerated clock: a rate limit is EC2's, not ours.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import Counter
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from services.pool.spec import POOL_TAG
from shared.cloud import (
    Cloud,
    CloudError,
    ImageState,
    Instance,
    LaunchSpec,
    NotFound,
    Throttled,
)

T = TypeVar("T")

CLOUD_ERRORS = Counter(
    "hpcfleet_pool_cloud_errors_total",
    "EC2 calls of the pool that failed (after retries), by operation and error code",
    ["operation", "code"],
)
_INSTANCE_ID = re.compile(r"i-[0-9a-zA-Z]+")
_CHUNK = 500  # ids per start/stop/terminate call, well inside EC2's limits


class Ec2:
    """`cloud` with retries; `opener` / `closer` manage a client that needs starting (AwsCloud)."""

    def __init__(
        self,
        cloud: Cloud,
        *,
        attempts: int,
        retry_seconds: float,
        opener: Callable[[], Awaitable[None]] | None = None,
        closer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cloud = cloud
        self._attempts = attempts
        self._retry_seconds = retry_seconds
        self._opener = opener
        self._closer = closer
        self._opened = False
        self._lock = asyncio.Lock()

    async def _open(self) -> None:
        if self._opener is None or self._opened:
            return
        async with self._lock:
            if not self._opened:
                await self._opener()
                self._opened = True

    async def close(self) -> None:
        if self._closer is not None and self._opened:
            await self._closer()
            self._opened = False

    async def call(self, operation: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`fn(*args)`, retrying a throttle; a final error is counted and raised."""
        await self._open()
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Throttled),
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(
                multiplier=self._retry_seconds, max=self._retry_seconds * 30
            ),
            reraise=True,
        )
        try:
            return await retrying(fn, *args)
        except CloudError as error:
            CLOUD_ERRORS.labels(operation, error.code).inc()
            raise

    async def pool_instances(self, pool: str) -> list[Instance]:
        """Every instance with the pool's tag, terminated ones included: all or an error."""
        describe = self.cloud.describe_instances
        return await self.call("describe_instances", describe, None, {POOL_TAG: pool})

    async def booted(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        return await self.call("booted_instances", self.cloud.booted_instances, ids)

    async def launch(self, spec: LaunchSpec, client_token: str) -> Instance:
        run = self.cloud.run_instances
        (instance,) = await self.call("run_instances", run, spec, 1, client_token)
        return instance

    async def instances(self, ids: Sequence[str]) -> dict[str, Instance]:
        """These instances by id; those EC2 no longer knows are absent."""
        remaining = list(dict.fromkeys(ids))
        while remaining:
            try:
                found = await self.call(
                    "describe_instances", self.cloud.describe_instances, remaining
                )
                return {i.instance_id: i for i in found}
            except NotFound as error:
                missing = set(_INSTANCE_ID.findall(error.message)) & set(remaining)
                if not missing:
                    raise
                remaining = [i for i in remaining if i not in missing]
        return {}

    async def start(self, ids: Sequence[str]) -> None:
        for chunk in _chunks(ids):
            await self.call("start_instances", self.cloud.start_instances, chunk)

    async def stop(self, ids: Sequence[str]) -> None:
        for chunk in _chunks(ids):
            await self.call("stop_instances", self.cloud.stop_instances, chunk)

    async def terminate(self, ids: Sequence[str]) -> None:
        for chunk in _chunks(ids):
            await self.call("terminate_instances", self.cloud.terminate_instances, chunk)

    async def image_exists(self, image_id: str) -> bool:
        try:
            found = await self.call("describe_images", self.cloud.describe_images, [image_id])
        except NotFound:
            return False
        return any(image.state is ImageState.AVAILABLE for image in found)


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(ids))
    return [unique[i : i + _CHUNK] for i in range(0, len(unique), _CHUNK)]
