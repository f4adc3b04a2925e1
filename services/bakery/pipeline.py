"""What both build back-ends share: the build's context, progress reporting, and the EC2/SSM moves
(launch, wait, run a script, retry a throttle) with the clock injected.

A back-end turns a recipe and a resolved base image into an available image in the recipe's home
region, and removes its builder and temporary resources before it returns or raises, whatever
happened. Validation, copies and publishing are the runner's.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from services.bakery.aws import BakeryAws
from services.bakery.recipes import Recipe
from services.bakery.settings import BakerySettings
from shared.clock import Clock
from shared.cloud import CloudError, ImageState, InstanceState, LaunchSpec, NotFound, Throttled

T = TypeVar("T")

ROLE_TAG = "hpcfleet:role"
BUILD_TAG = "hpcfleet:build"
RECIPE_TAG = "hpcfleet:recipe"
BUILDER_ROLE = "bakery-builder"
VALIDATOR_ROLE = "bakery-validator"
TAIL_CHARS = 2000


class BuildFailed(Exception):
    """The build cannot succeed; the message is what the API shows as the build's error."""


class Progress(Protocol):
    """Where a build reports what it does, as it does it (the API shows it step by step)."""

    async def start_step(self, name: str) -> int: ...

    async def finish_step(self, seq: int, status: str, detail: str | None = None) -> None: ...

    async def log(self, text: str) -> None: ...

    async def note(self, **fields: Any) -> None:
        """Remember ids on the build (builder_id, image_id, ...) so a restart can find them."""
        ...


@asynccontextmanager
async def step(progress: Progress, name: str) -> AsyncIterator[None]:
    """A step with its timing; a failure is recorded with its message and re-raised."""
    seq = await progress.start_step(name)
    try:
        yield
    except BaseException as exc:
        detail = str(exc) if isinstance(exc, BuildFailed | CloudError) else type(exc).__name__
        await progress.finish_step(seq, "failed", detail[:TAIL_CHARS])
        raise
    await progress.finish_step(seq, "succeeded")


@dataclass(frozen=True)
class BuildContext:
    build_id: str
    attempt: int
    recipe: Recipe
    version: str
    base_image: str
    image_name: str
    image_tags: Mapping[str, str]
    progress: Progress

    @property
    def token(self) -> str:
        """Client-token prefix: a retry within one attempt never launches twice."""
        return f"bakery-{self.build_id}-{self.attempt}"

    def instance_tags(self, role: str) -> dict[str, str]:
        return {
            **self.recipe.tags,
            ROLE_TAG: role,
            BUILD_TAG: self.build_id,
            RECIPE_TAG: self.recipe.name,
            "Name": f"{role}-{self.recipe.name}-{self.version}",
        }

    def script_environment(self) -> dict[str, str]:
        return {
            "HPCFLEET_RECIPE": self.recipe.name,
            "HPCFLEET_VERSION": self.version,
            "HPCFLEET_BASE_IMAGE": self.base_image,
        }


class Backend(Protocol):
    async def build(self, ctx: BuildContext) -> str:
        """Build the image; return its id (available) in the recipe's home region."""
        ...


def tail(text: str, limit: int = TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def with_environment(platform: str, environment: Mapping[str, str], script: str) -> str:
    """Prefix a script with exported variables, quoted for its shell."""
    if platform == "windows":
        doubled = {k: v.replace("'", "''") for k, v in environment.items()}
        lines = [f"$env:{k} = '{v}'" for k, v in doubled.items()]
    else:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in environment.items()]
    return "\n".join([*lines, script])


def first_boot_installer(recipe: Recipe) -> str | None:
    """A script that bakes the rendered first-boot template into the image.

    Linux: a cloud-init per-instance script (runs once on every new instance, not on the builder,
    whose first boot is over). Windows: a startup task that runs once and removes itself. The
    content travels base64-encoded so no quoting or heredoc delimiter can break it.
    `HPCFLEET_ROOT` (empty on a real builder) relocates the files in rehearsals.
    """
    if recipe.first_boot is None:
        return None
    payload = base64.b64encode(recipe.first_boot.render().encode()).decode()
    if recipe.platform == "windows":
        return "\n".join(
            [
                "$ErrorActionPreference = 'Stop'",
                '$dir = "$($env:HPCFLEET_ROOT)C:\\ProgramData\\hpcfleet"',
                "New-Item -ItemType Directory -Force -Path $dir | Out-Null",
                "$script = Join-Path $dir 'firstboot.ps1'",
                f"[IO.File]::WriteAllBytes($script, [Convert]::FromBase64String('{payload}'))",
                "$run = \"-NoProfile -ExecutionPolicy Bypass -Command & '$script'; "
                'Unregister-ScheduledTask -TaskName hpcfleet-firstboot -Confirm:`$false"',
                "$action = New-ScheduledTaskAction -Execute 'powershell.exe' -Argument $run",
                "Register-ScheduledTask -TaskName 'hpcfleet-firstboot' -Action $action "
                "-Trigger (New-ScheduledTaskTrigger -AtStartup) -User 'SYSTEM' -RunLevel Highest "
                "-Force | Out-Null",
            ]
        )
    return "\n".join(
        [
            "set -euo pipefail",
            'target="${HPCFLEET_ROOT:-}/var/lib/cloud/scripts/per-instance/hpcfleet-firstboot.sh"',
            'mkdir -p "$(dirname "$target")"',
            f"echo '{payload}' | base64 -d > \"$target\"",
            'chmod 0755 "$target"',
            'echo "first-boot script baked into $target"',
        ]
    )


def generalize_script(platform: str) -> str:
    """Make the image boot like a new machine: first-boot machinery runs again on each instance."""
    if platform == "windows":
        return "\n".join(
            [
                '$ec2launch = "$env:ProgramFiles\\Amazon\\EC2Launch\\EC2Launch.exe"',
                "if (-not $env:HPCFLEET_ROOT -and (Test-Path $ec2launch)) "
                "{ & $ec2launch reset --clean }",
            ]
        )
    return "\n".join(
        [
            "set -eu",
            'if [ -z "${HPCFLEET_ROOT:-}" ] && command -v cloud-init >/dev/null; then',
            "  cloud-init clean --logs",
            "fi",
            "rm -f /root/.bash_history /home/*/.bash_history 2>/dev/null || true",
            'echo "generalized"',
        ]
    )


class Machines:
    """EC2 and SSM moves with the polling, deadlines and throttle retries a build needs."""

    def __init__(self, aws: BakeryAws, settings: BakerySettings, clock: Clock) -> None:
        self.aws = aws
        self.settings = settings
        self.clock = clock

    async def call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a cloud call, backing off on throttling; give up with a message that says so."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Throttled),
            stop=stop_after_attempt(self.settings.cloud_attempts),
            wait=wait_exponential_jitter(initial=self.settings.retry_seconds, max=60),
            sleep=self.clock.sleep,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await operation()
        except RetryError as exc:
            error = exc.last_attempt.exception()
            raise BuildFailed(
                f"{what} throttled: gave up after {self.settings.cloud_attempts} attempts ({error})"
            ) from error
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _until(
        self, what: str, seconds: float, probe: Callable[[], Awaitable[T | None]]
    ) -> T:
        """Poll `probe` on the injected clock (not asyncio.timeout: tests step time by hand)."""
        deadline = self.clock.now().timestamp() + seconds
        while True:
            result = await probe()
            if result is not None:
                return result
            if self.clock.now().timestamp() >= deadline:
                raise BuildFailed(f"timed out after {seconds:.0f} s waiting for {what}")
            await self.clock.sleep(self.settings.poll_seconds)

    async def launch(self, region: str, spec: LaunchSpec, token: str) -> str:
        cloud = await self.aws.cloud(region)
        launched = await self.call("RunInstances", lambda: cloud.run_instances(spec, 1, token))
        return launched[0].instance_id

    async def wait_instance(self, region: str, instance_id: str, state: InstanceState) -> None:
        cloud = await self.aws.cloud(region)

        async def probe() -> bool | None:
            found = await self.call(
                "DescribeInstances", lambda: cloud.describe_instances(ids=[instance_id])
            )
            current = found[0].state if found else InstanceState.TERMINATED
            if current is state:
                return True
            if current in (InstanceState.SHUTTING_DOWN, InstanceState.TERMINATED):
                raise BuildFailed(f"instance {instance_id} is {current} (wanted {state})")
            return None

        await self._until(f"{instance_id} to be {state}", self.settings.boot_timeout_seconds, probe)

    async def terminate(self, region: str, instance_ids: list[str]) -> None:
        """Terminate, retrying throttles; an instance already gone is success."""
        if instance_ids:
            cloud = await self.aws.cloud(region)
            await self.call("TerminateInstances", lambda: cloud.terminate_instances(instance_ids))

    async def wait_image(self, region: str, image_id: str) -> None:
        cloud = await self.aws.cloud(region)

        async def probe() -> bool | None:
            try:
                found = await self.call(
                    "DescribeImages", lambda: cloud.describe_images(ids=[image_id])
                )
            except NotFound:
                found = []
            if not found:
                raise BuildFailed(f"image {image_id} disappeared")
            if found[0].state is ImageState.AVAILABLE:
                return True
            if found[0].state is not ImageState.PENDING:
                raise BuildFailed(f"image {image_id} is {found[0].state}")
            return None

        await self._until(
            f"image {image_id} to be available", self.settings.image_timeout_seconds, probe
        )

    async def run_script(
        self,
        region: str,
        instance_id: str,
        *,
        platform: str,
        script: str,
        seconds: int,
        label: str,
        progress: Progress,
    ) -> None:
        """Run a script through SSM Run Command and wait; a non-zero exit fails the build.

        An instance whose SSM agent has not registered yet answers InvalidInstanceId: that is
        retried until the boot timeout, as it is a matter of seconds on a healthy image.
        """
        document = "AWS-RunPowerShellScript" if platform == "windows" else "AWS-RunShellScript"

        async def send() -> str | None:
            try:
                return await self.call(
                    "SendCommand",
                    lambda: self.aws.send_command(
                        region,
                        instance_id,
                        document=document,
                        commands=[script],
                        timeout_seconds=seconds,
                        comment=f"hpcfleet bakery: {label}",
                    ),
                )
            except CloudError as error:
                if error.code == "InvalidInstanceId":
                    return None
                raise

        command_id = await self._until(
            f"the SSM agent of {instance_id}", self.settings.boot_timeout_seconds, send
        )
        await progress.log(f"{label}: SSM command {command_id} on {instance_id}")

        async def finished() -> Any:
            result = await self.call(
                "GetCommandInvocation",
                lambda: self.aws.command_result(region, command_id, instance_id),
            )
            return result if result is not None and result.finished else None

        result = await self._until(f"{label} to finish", seconds + 60, finished)
        for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text.strip():
                await progress.log(f"{label} {stream}: {tail(text, 1000)}")
        if result.status != "Success":
            raise BuildFailed(
                f"{label} {result.status.lower()} (exit code {result.exit_code}): "
                f"{tail(result.stderr or result.stdout, 500) or 'no output'}"
            )


def read_script(path: Path) -> str:
    return path.read_text(encoding="utf-8")
