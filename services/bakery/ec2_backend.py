"""The native EC2 back-end: a builder from the base image, the steps through SSM Run Command, stop,
CreateImage, wait until available. The builder is terminated on every way out, failure included.
"""

from __future__ import annotations

import asyncio

from services.bakery.pipeline import (
    BUILD_TAG,
    BUILDER_ROLE,
    BuildContext,
    Machines,
    first_boot_installer,
    generalize_script,
    read_script,
    step,
    with_environment,
)
from shared.cloud import InstanceState, LaunchSpec


class Ec2Backend:
    def __init__(self, machines: Machines) -> None:
        self.machines = machines

    async def build(self, ctx: BuildContext) -> str:
        recipe, progress, machines = ctx.recipe, ctx.progress, self.machines
        region = recipe.home_region
        cloud = await machines.aws.cloud(region)
        builder: str | None = None
        try:
            async with step(progress, "launch-builder"):
                spec = LaunchSpec(
                    image_id=ctx.base_image,
                    instance_type=recipe.instance_type,
                    subnet_id=recipe.subnet_id,
                    security_group_ids=recipe.security_group_ids,
                    iam_instance_profile=recipe.iam_instance_profile,
                    tags=ctx.instance_tags(BUILDER_ROLE),
                )
                builder = await machines.launch(region, spec, f"{ctx.token}-builder")
                await progress.note(builder_id=builder)
                await progress.log(f"builder {builder} launched from {ctx.base_image}")
                await machines.wait_instance(region, builder, InstanceState.RUNNING)
            scripts = [(s.name, read_script(s.script), s.timeout_seconds) for s in recipe.steps]
            installer = first_boot_installer(recipe)
            if installer is not None:
                scripts.append(("bake-first-boot", installer, 600))
            scripts.append(("generalize", generalize_script(recipe.platform), 600))
            for name, script, timeout in scripts:
                async with step(progress, name):
                    await machines.run_script(
                        region,
                        builder,
                        platform=recipe.platform,
                        script=with_environment(recipe.platform, ctx.script_environment(), script),
                        seconds=timeout,
                        label=name,
                        progress=progress,
                    )
            async with step(progress, "stop-builder"):
                await machines.call("StopInstances", lambda: cloud.stop_instances([builder]))
                await machines.wait_instance(region, builder, InstanceState.STOPPED)
            async with step(progress, "create-image"):
                image_id = await self._create_image(ctx, builder)
                await progress.note(image_id=image_id)
                await progress.log(f"image {image_id} created from builder {builder}")
                await machines.wait_image(region, image_id)
            return image_id
        finally:
            if builder is not None:
                # shielded: a cancelled build (service stopping) still removes its builder
                await asyncio.shield(machines.terminate(region, [builder]))
                await progress.log(f"builder {builder} terminated")

    async def _create_image(self, ctx: BuildContext, builder: str) -> str:
        """CreateImage has no client token: an image tagged with this build is reused instead."""
        cloud = await self.machines.aws.cloud(ctx.recipe.home_region)

        async def create() -> str:
            existing = await cloud.describe_images(tags={BUILD_TAG: ctx.build_id})
            if existing:
                return existing[0].image_id
            return await cloud.create_image(
                builder,
                ctx.image_name,
                tags=ctx.image_tags,
                description=f"hpcfleet {ctx.recipe.name} {ctx.version} from {ctx.base_image}",
            )

        return await self.machines.call("CreateImage", create)
