"""Running builds: claim queued ones, drive each through its back-end, validate, copy, publish;
take over builds whose worker died; terminate whatever builder or test instance no build owns.

A worker claims a build with a lease it renews while the build runs. A build whose lease lapsed
(its worker was killed) is taken over at the next pass: its instances are terminated, then it is
picked up where that is safe (an image already exists: validate and publish it) or started again
(up to `max_attempts`), or failed saying why. A worker stopped gracefully cleans up and puts its
builds back in the queue. Nothing is published that was not validated: `ImageReady` is emitted in
the same transaction that marks the build succeeded, after the smoke check passed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, insert, select, update
from sqlalchemy.engine import RowMapping

from services.bakery.aws import BakeryAws
from services.bakery.pipeline import (
    BUILD_TAG,
    BUILDER_ROLE,
    RECIPE_TAG,
    ROLE_TAG,
    VALIDATOR_ROLE,
    Backend,
    BuildContext,
    BuildFailed,
    Machines,
    read_script,
    step,
    with_environment,
)
from services.bakery.recipes import Recipe, Recipes
from services.bakery.retention import ImageStatus
from services.bakery.settings import BakerySettings
from services.bakery.tables import BuildStatus, build_steps, builds, images
from shared.clock import Clock
from shared.cloud import CloudError, ImageState, InstanceState, LaunchSpec, NotFound
from shared.credentials import CredentialsError
from shared.events import ImageReady
from shared.loop import ReconcileLoop
from shared.outbox import Mailbox

log = logging.getLogger(__name__)

LOG_LIMIT = 16_000  # characters of log kept per build (the tail)
LIVE = (InstanceState.PENDING, InstanceState.RUNNING, InstanceState.STOPPING, InstanceState.STOPPED)


def version_for(now: datetime, earlier_this_month: int) -> str:
    """2026.02.3 = the third build of the recipe started in February 2026."""
    return f"{now:%Y.%m}.{earlier_this_month + 1}"


def image_tags(
    recipe: Recipe, build_id: str, version: str, base: str, now: datetime
) -> dict[str, str]:
    return {
        **recipe.tags,
        RECIPE_TAG: recipe.name,
        "hpcfleet:version": version,
        "hpcfleet:base-image": base,
        "hpcfleet:built-at": now.isoformat(timespec="seconds"),
        BUILD_TAG: build_id,
        "hpcfleet:billing": recipe.billing.value,
        "Name": f"hpcfleet-{recipe.name}-{version}",
    }


class DbProgress:
    """A build's progress in bakery_builds / bakery_build_steps; each write renews the lease."""

    def __init__(self, runner: BuildRunner, build_id: str) -> None:
        self.runner = runner
        self.build_id = build_id

    async def _touch(self, conn: Any, **values: Any) -> None:
        now = self.runner.clock.now()
        await conn.execute(
            update(builds)
            .where(builds.c.build_id == self.build_id)
            .values(updated_at=now, lease_until=now + self.runner.lease, **values)
        )

    async def start_step(self, name: str) -> int:
        async with self.runner.mailbox.engine.begin() as conn:
            seq = (
                await conn.execute(
                    select(func.coalesce(func.max(build_steps.c.seq), 0)).where(
                        build_steps.c.build_id == self.build_id
                    )
                )
            ).scalar_one() + 1
            await conn.execute(
                insert(build_steps).values(
                    build_id=self.build_id,
                    seq=seq,
                    name=name,
                    status="running",
                    started_at=self.runner.clock.now(),
                )
            )
            await self._touch(conn, phase=name)
        return int(seq)

    async def finish_step(self, seq: int, status: str, detail: str | None = None) -> None:
        async with self.runner.mailbox.engine.begin() as conn:
            await conn.execute(
                update(build_steps)
                .where(build_steps.c.build_id == self.build_id, build_steps.c.seq == seq)
                .values(status=status, finished_at=self.runner.clock.now(), detail=detail)
            )
            await self._touch(conn)

    async def log(self, text: str) -> None:
        stamp = self.runner.clock.now().strftime("%H:%M:%S")
        lines = "".join(f"{stamp} {line}\n" for line in text.splitlines() if line.strip())
        # one UPDATE appends, so two writers never lose each other's lines (a read, then a write,
        # did: SQLite's driver runs the read outside the write's transaction)
        log = func.coalesce(builds.c.log, "") + lines
        tail = case(
            (func.length(log) > LOG_LIMIT, func.substr(log, func.length(log) - LOG_LIMIT + 1)),
            else_=log,
        )
        async with self.runner.mailbox.engine.begin() as conn:
            await self._touch(conn, log=tail)

    async def note(self, **fields: Any) -> None:
        async with self.runner.mailbox.engine.begin() as conn:
            await self._touch(conn, **fields)


@dataclass(frozen=True)
class Claim:
    build_id: str
    recipe: Recipe
    attempt: int
    version: str
    base_image: str
    image_id: str | None  # set when resuming after the image was made


class BuildRunner:
    """The build loop's pass (`reconcile`) and the builds it runs as tasks."""

    def __init__(
        self,
        mailbox: Mailbox,
        recipes: Recipes,
        settings: BakerySettings,
        clock: Clock,
        aws: BakeryAws | None,
        *,
        unavailable: str = "",
        backends: Mapping[str, Backend] | None = None,
        on_published: Callable[[], None] = lambda: None,
    ) -> None:
        self.mailbox = mailbox
        self.recipes = recipes
        self.settings = settings
        self.clock = clock
        self.aws = aws
        self.unavailable = unavailable
        self.machines = Machines(aws, settings, clock) if aws is not None else None
        self.backends = dict(backends or {})
        self.on_published = on_published
        self.lease = timedelta(seconds=settings.lease_seconds)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:64]
        self.tasks: dict[str, asyncio.Task[None]] = {}

    # --- the reconcile pass -------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Renew leases, take over orphans, start queued builds, terminate stray instances."""
        await self._renew_leases()
        if self.aws is None:
            await self._mark_waiting(self.unavailable)
            return
        await self._take_over_orphans()
        await self._start_queued()
        await self._collect_strays()

    async def _renew_leases(self) -> None:
        if not self.tasks:
            return
        now = self.clock.now()
        async with self.mailbox.engine.begin() as conn:
            await conn.execute(
                update(builds)
                .where(builds.c.build_id.in_(list(self.tasks)), builds.c.owner == self.worker_id)
                .values(lease_until=now + self.lease)
            )

    async def _mark_waiting(self, why: str) -> None:
        async with self.mailbox.engine.begin() as conn:
            await conn.execute(
                update(builds)
                .where(
                    builds.c.status == BuildStatus.QUEUED, builds.c.waiting.is_distinct_from(why)
                )
                .values(waiting=why, updated_at=self.clock.now())
            )

    async def _take_over_orphans(self) -> None:
        now = self.clock.now()
        async with self.mailbox.engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        select(builds).where(
                            builds.c.status == BuildStatus.RUNNING, builds.c.lease_until < now
                        )
                    )
                )
                .mappings()
                .all()
            )
        for row in rows:
            if row["build_id"] in self.tasks:
                continue
            async with self.mailbox.engine.begin() as conn:
                taken = await conn.execute(
                    update(builds)
                    .where(
                        builds.c.build_id == row["build_id"],
                        builds.c.status == BuildStatus.RUNNING,
                        builds.c.lease_until == row["lease_until"],
                    )
                    .values(owner=self.worker_id, lease_until=now + self.lease, updated_at=now)
                )
            if taken.rowcount == 1:
                self._spawn(row["build_id"], self._resume(row))

    async def _start_queued(self) -> None:
        free = self.settings.max_concurrent_builds - len(self.tasks)
        if free <= 0:
            return
        async with self.mailbox.engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        select(builds)
                        .where(builds.c.status == BuildStatus.QUEUED)
                        .order_by(builds.c.requested_at)
                        .limit(free)
                    )
                )
                .mappings()
                .all()
            )
        for row in rows:
            recipe = self.recipes.get(row["recipe"])
            if recipe is None:
                await self._finish_unstarted(row, f"recipe {row['recipe']!r} is not configured")
                continue
            try:
                base = await self._resolve_base(recipe)
            except BuildFailed as failure:
                await self._finish_unstarted(row, str(failure))
                continue
            except (CloudError, CredentialsError) as error:  # AWS unreachable: wait, do not fail
                await self._set(row["build_id"], waiting=f"cannot reach AWS yet: {error}")
                continue
            claim = await self._claim(row, recipe, base)
            if claim is not None:
                self._spawn(claim.build_id, self._run(claim))

    async def _resolve_base(self, recipe: Recipe) -> str:
        assert self.aws is not None
        cloud = await self.aws.cloud(recipe.home_region)
        if recipe.base.image_id is not None:
            try:
                found = await cloud.describe_images(ids=[recipe.base.image_id])
            except NotFound:
                found = []
            if not found or found[0].state is not ImageState.AVAILABLE:
                raise BuildFailed(f"base image {recipe.base.image_id} is not available")
            return recipe.base.image_id
        wanted = recipe.base.filter
        assert wanted is not None
        candidates = [
            image
            for image in await cloud.describe_images(
                owners=list(wanted.owners), name_pattern=wanted.name
            )
            if image.state is ImageState.AVAILABLE
        ]
        if not candidates:
            raise BuildFailed(
                f"base filter matches no available image (owners {', '.join(wanted.owners)}, "
                f"name {wanted.name!r}, region {recipe.home_region})"
            )
        return max(candidates, key=lambda image: image.created_at).image_id

    async def _claim(self, row: RowMapping, recipe: Recipe, base: str) -> Claim | None:
        now = self.clock.now()
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        async with self.mailbox.engine.begin() as conn:
            version = row["version"]
            if version is None:
                earlier = (
                    await conn.execute(
                        select(func.count()).where(
                            builds.c.recipe == recipe.name,
                            builds.c.version.is_not(None),
                            builds.c.started_at >= month,
                        )
                    )
                ).scalar_one()
                version = version_for(now, int(earlier))
            claimed = await conn.execute(
                update(builds)
                .where(builds.c.build_id == row["build_id"], builds.c.status == BuildStatus.QUEUED)
                .values(
                    status=BuildStatus.RUNNING,
                    owner=self.worker_id,
                    lease_until=now + self.lease,
                    started_at=func.coalesce(builds.c.started_at, now),
                    updated_at=now,
                    attempt=builds.c.attempt + 1,
                    version=version,
                    base_image=base,
                    backend=recipe.backend,
                    waiting=None,
                )
            )
        if claimed.rowcount != 1:
            return None  # another worker was quicker
        return Claim(row["build_id"], recipe, int(row["attempt"]) + 1, version, base, None)

    def _spawn(self, build_id: str, work: Any) -> None:
        task = asyncio.create_task(work, name=f"bakery-build:{build_id}")
        self.tasks[build_id] = task
        task.add_done_callback(lambda done: self._forget(build_id, done))

    def _forget(self, build_id: str, done: asyncio.Task[None]) -> None:
        # a take-over task that re-queued its build can end after the build's next run started:
        # only the task itself is forgotten, never its successor (whose lease must be renewed)
        if self.tasks.get(build_id) is done:
            del self.tasks[build_id]

    # --- one build ------------------------------------------------------------------------------

    async def _run(self, claim: Claim) -> None:
        progress = DbProgress(self, claim.build_id)
        recipe = claim.recipe
        try:
            image_id = claim.image_id
            if image_id is None:
                async with step(progress, "resolve-base"):
                    await progress.log(
                        f"attempt {claim.attempt}: {recipe.name} {claim.version} from "
                        f"{claim.base_image} with the {recipe.backend} back-end"
                    )
                backend = self.backends[recipe.backend]
                image_id = await backend.build(self._context(claim, progress))
            await self._validate_and_publish(claim, image_id, progress)
        except asyncio.CancelledError:
            await asyncio.shield(self._requeue(claim, progress))
            raise
        except (BuildFailed, CloudError, CredentialsError) as failure:
            await asyncio.shield(self._fail(claim, str(failure), progress))
        except Exception as exc:
            log.exception("bakery build %s failed unexpectedly", claim.build_id)
            await asyncio.shield(
                self._fail(claim, f"internal error: {type(exc).__name__}: {exc}", progress)
            )

    def _context(self, claim: Claim, progress: DbProgress) -> BuildContext:
        recipe = claim.recipe
        return BuildContext(
            build_id=claim.build_id,
            attempt=claim.attempt,
            recipe=recipe,
            version=claim.version,
            base_image=claim.base_image,
            image_name=f"hpcfleet-{recipe.name}-{claim.version}",
            image_tags=image_tags(
                recipe, claim.build_id, claim.version, claim.base_image, self.clock.now()
            ),
            progress=progress,
        )

    async def _validate_and_publish(
        self, claim: Claim, image_id: str, progress: DbProgress
    ) -> None:
        assert self.machines is not None and self.aws is not None
        machines, recipe = self.machines, claim.recipe
        ctx = self._context(claim, progress)
        region = recipe.home_region
        async with step(progress, "validate"):
            spec = LaunchSpec(
                image_id=image_id,
                instance_type=recipe.validation.instance_type or recipe.instance_type,
                subnet_id=recipe.subnet_id,
                security_group_ids=recipe.security_group_ids,
                iam_instance_profile=recipe.iam_instance_profile,
                tags=ctx.instance_tags(VALIDATOR_ROLE),
            )
            validator = await machines.launch(region, spec, f"{ctx.token}-validator")
            await progress.note(validator_id=validator)
            await progress.log(f"test instance {validator} launched from {image_id}")
            try:
                await machines.wait_instance(region, validator, InstanceState.RUNNING)
                check = with_environment(
                    recipe.platform,
                    {**ctx.script_environment(), "HPCFLEET_IMAGE": image_id},
                    read_script(recipe.validation.smoke_check),
                )
                await machines.run_script(
                    region,
                    validator,
                    platform=recipe.platform,
                    script=check,
                    seconds=recipe.validation.timeout_seconds,
                    label="smoke-check",
                    progress=progress,
                )
            except BuildFailed as failure:
                raise BuildFailed(f"validation failed: {failure}") from None
            finally:
                await asyncio.shield(machines.terminate(region, [validator]))
                await progress.log(f"test instance {validator} terminated")
        regional = {region: image_id}
        for target in recipe.regions[1:]:
            async with step(progress, f"copy-{target}"):
                regional[target] = await self._copy(ctx, image_id, target)
                await progress.note(images=dict(regional))
        async with step(progress, "publish"):
            await self._publish(claim, regional)
        self.on_published()

    async def _copy(self, ctx: BuildContext, image_id: str, target: str) -> str:
        """CopyImage, made idempotent by the image's name (unique per region and account)."""
        assert self.machines is not None and self.aws is not None
        aws, machines = self.aws, self.machines
        cloud = await aws.cloud(target)

        async def copy() -> str:
            same_name = await cloud.describe_images(name_pattern=ctx.image_name)
            if same_name:
                return same_name[0].image_id
            return await aws.copy_image(
                ctx.recipe.home_region, image_id, target, ctx.image_name, f"{ctx.token}-{target}"
            )

        copied = await machines.call("CopyImage", copy)
        await ctx.progress.log(f"copy {copied} in {target}")
        await machines.wait_image(target, copied)
        # tags do not travel with a copy (moto ignores CopyImageTags): set them here
        await machines.call("CreateTags", lambda: cloud.create_tags([copied], ctx.image_tags))
        return copied

    async def _publish(self, claim: Claim, regional: Mapping[str, str]) -> None:
        recipe = claim.recipe
        async with self.mailbox.transaction() as tx:
            now = tx.now
            await tx.conn.execute(
                update(builds)
                .where(builds.c.build_id == claim.build_id)
                .values(
                    status=BuildStatus.SUCCEEDED,
                    finished_at=now,
                    updated_at=now,
                    image_id=regional[recipe.home_region],
                    images=dict(regional),
                    phase=None,
                    lease_until=None,
                    error=None,
                )
            )
            await tx.conn.execute(
                insert(images),
                [
                    {
                        "image_id": image_id,
                        "region": region,
                        "recipe": recipe.name,
                        "version": claim.version,
                        "build_id": claim.build_id,
                        "base_image": claim.base_image,
                        "billing": recipe.billing.value,
                        "built_at": now,
                        "status": ImageStatus.AVAILABLE,
                        "published_at": now,
                    }
                    for region, image_id in regional.items()
                ],
            )
            tx.emit(
                ImageReady(
                    recipe=recipe.name,
                    images=dict(regional),
                    version=claim.version,
                    base_image=claim.base_image,
                    built_at=now,
                    billing=recipe.billing,
                    occurred_at=now,
                )
            )

    async def _fail(self, claim: Claim, error: str, progress: DbProgress) -> None:
        """Record the failure and leave nothing behind: instances, and images never validated."""
        await progress.log(f"failed: {error}")
        try:
            await self._cleanup(claim.build_id, claim.recipe, progress, images_too=True)
        except CloudError as problem:  # the garbage collection pass will finish the job
            await progress.log(f"cleanup incomplete ({problem}); the next pass retries it")
        await self._set(
            claim.build_id,
            status=BuildStatus.FAILED,
            finished_at=self.clock.now(),
            error=error,
            phase=None,
            lease_until=None,
        )

    async def _requeue(self, claim: Claim, progress: DbProgress) -> None:
        """The worker is stopping: remove the build's instances and hand the build back."""
        try:
            await self._cleanup(claim.build_id, claim.recipe, progress, images_too=False)
        except CloudError as problem:
            await progress.log(f"cleanup incomplete ({problem}); the next pass retries it")
        await progress.log("interrupted: the worker stopped; the build starts again")
        await self._set(
            claim.build_id,
            status=BuildStatus.QUEUED,
            owner=None,
            lease_until=None,
            phase=None,
            waiting="interrupted by a worker stop; starts again at the next pass",
        )

    async def _resume(self, row: RowMapping) -> None:
        """A build whose worker died: clean up, then pick it up, start it again, or fail it."""
        build_id = row["build_id"]
        progress = DbProgress(self, build_id)
        await progress.log(f"taken over by {self.worker_id}: {row['owner']}'s lease lapsed")
        recipe = self.recipes.get(row["recipe"])
        if recipe is None:
            await self._set(
                build_id,
                status=BuildStatus.FAILED,
                finished_at=self.clock.now(),
                error=f"interrupted, and recipe {row['recipe']!r} is no longer configured",
                lease_until=None,
            )
            return
        claim = Claim(
            build_id,
            recipe,
            int(row["attempt"]),
            row["version"],
            row["base_image"],
            None,
        )
        try:
            await self._cleanup(build_id, recipe, progress, images_too=False)
            image_id = await self._image_of(build_id, recipe)
        except CloudError as error:
            await progress.log(f"take-over postponed: {error}")
            await self._set(build_id, lease_until=self.clock.now())  # the next pass tries again
            return
        if image_id is not None:
            await progress.log(f"picked up: image {image_id} exists; validating it")
            await self._run(replace(claim, image_id=image_id))
        elif claim.attempt < self.settings.max_attempts:
            await progress.log("started again: the interrupted attempt made no image")
            await self._set(
                build_id,
                status=BuildStatus.QUEUED,
                owner=None,
                lease_until=None,
                phase=None,
                waiting="interrupted; starts again",
            )
        else:
            await self._fail(
                claim, f"interrupted {claim.attempt} times by worker restarts; gave up", progress
            )

    async def _image_of(self, build_id: str, recipe: Recipe) -> str | None:
        """The available image this build made in its home region, if any."""
        assert self.aws is not None
        cloud = await self.aws.cloud(recipe.home_region)
        made = await cloud.describe_images(tags={BUILD_TAG: build_id})
        available = [i for i in made if i.state is ImageState.AVAILABLE]
        return available[0].image_id if available else None

    async def _cleanup(
        self, build_id: str, recipe: Recipe, progress: DbProgress, *, images_too: bool
    ) -> None:
        """Terminate the build's instances (found by tag, so launches not yet recorded count)."""
        assert self.machines is not None and self.aws is not None
        for region in recipe.regions:
            cloud = await self.aws.cloud(region)
            live = await cloud.describe_instances(tags={BUILD_TAG: build_id}, states=LIVE)
            ids = [i.instance_id for i in live]
            if ids:
                await self.machines.terminate(region, ids)
                await progress.log(f"terminated {', '.join(ids)} in {region}")
            if images_too:
                for image in await cloud.describe_images(tags={BUILD_TAG: build_id}):
                    await cloud.deregister_image(image.image_id, delete_snapshots=True)
                    await progress.log(
                        f"deregistered {image.image_id} in {region}: it was never validated"
                    )

    async def _finish_unstarted(self, row: RowMapping, error: str) -> None:
        """Fail a queued build that cannot start (no recipe, no base image), with one step."""
        now = self.clock.now()
        async with self.mailbox.engine.begin() as conn:
            done = await conn.execute(
                update(builds)
                .where(builds.c.build_id == row["build_id"], builds.c.status == BuildStatus.QUEUED)
                .values(
                    status=BuildStatus.FAILED,
                    started_at=now,
                    finished_at=now,
                    updated_at=now,
                    attempt=builds.c.attempt + 1,
                    error=error,
                    waiting=None,
                )
            )
            if done.rowcount == 1:
                await conn.execute(
                    insert(build_steps).values(
                        build_id=row["build_id"],
                        seq=1,
                        name="resolve-base",
                        status="failed",
                        started_at=now,
                        finished_at=now,
                        detail=error,
                    )
                )

    async def _set(self, build_id: str, **values: Any) -> None:
        async with self.mailbox.engine.begin() as conn:
            await conn.execute(
                update(builds)
                .where(builds.c.build_id == build_id)
                .values(updated_at=self.clock.now(), **values)
            )

    # --- garbage collection ---------------------------------------------------------------------

    async def _collect_strays(self) -> None:
        """Terminate builder and test instances that no running build holds a valid lease on."""
        assert self.aws is not None and self.machines is not None
        now = self.clock.now()
        async with self.mailbox.engine.connect() as conn:
            held = set(
                (
                    await conn.execute(
                        select(builds.c.build_id).where(
                            and_(
                                builds.c.status == BuildStatus.RUNNING, builds.c.lease_until >= now
                            )
                        )
                    )
                ).scalars()
            )
        held |= set(self.tasks)
        regions = sorted(
            {region for recipe in self.recipes.recipes.values() for region in recipe.regions}
        )
        for region in regions:
            cloud = await self.aws.cloud(region)
            strays: list[str] = []
            for role in (BUILDER_ROLE, VALIDATOR_ROLE):
                for instance in await cloud.describe_instances(tags={ROLE_TAG: role}, states=LIVE):
                    if instance.tags.get(BUILD_TAG) not in held:
                        strays.append(instance.instance_id)
            if strays:
                log.warning("bakery: terminating stray instances %s in %s", strays, region)
                await self.machines.terminate(region, strays)

    # --- stopping -------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Cancel running builds; each cleans up and goes back to the queue."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class BuildLoop(ReconcileLoop):
    """The build reconcile loop; stopping it also stops the builds it started."""

    def __init__(self, runner: BuildRunner, *, interval: float, clock: Clock) -> None:
        super().__init__("bakery.builds", runner.reconcile, interval=interval, clock=clock)
        self.runner = runner

    async def stop(self) -> None:
        await super().stop()
        await self.runner.stop()
        if self.runner.aws is not None:
            await self.runner.aws.close()
