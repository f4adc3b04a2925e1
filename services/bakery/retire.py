"""The retention pass: apply `plan_retention` to each recipe's published images.

Deprecation comes first and is when `ImageRetired` is sent (the image must not be used for new
nodes; pool rolls its nodes off it). EC2's own deprecation time is set where the endpoint has it;
moto does not implement EnableImageDeprecation, so there the image is only tagged
`hpcfleet:deprecated-at` and the row records `deprecation = "tag"`, rather than pretending. An image
is deregistered (with its snapshots) only once EC2 reports no instance, stopped ones included,
still launched from it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial

from sqlalchemy import select, update

from services.bakery.aws import BakeryAws
from services.bakery.pipeline import Machines
from services.bakery.recipes import Recipe, Recipes
from services.bakery.retention import (
    ImageRecord,
    ImageStatus,
    deregistration_candidates,
    plan_retention,
)
from services.bakery.tables import images
from shared.events import ImageRetired
from shared.outbox import Mailbox

log = logging.getLogger(__name__)

DEPRECATION_LEAD = timedelta(minutes=5)
"""EC2 refuses a deprecation time in the past and rounds to the minute: aim a little ahead."""


class Retirer:
    def __init__(
        self, mailbox: Mailbox, recipes: Recipes, aws: BakeryAws | None, machines: Machines | None
    ) -> None:
        self.mailbox = mailbox
        self.recipes = recipes
        self.aws = aws
        self.machines = machines

    async def reconcile(self) -> None:
        if self.aws is None:
            return
        for recipe in self.recipes.recipes.values():
            await self._recipe(recipe)

    async def _recipe(self, recipe: Recipe) -> None:
        assert self.aws is not None and self.machines is not None
        aws, machines = self.aws, self.machines
        async with self.mailbox.engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        select(images).where(
                            images.c.recipe == recipe.name,
                            images.c.status != ImageStatus.DEREGISTERED,
                        )
                    )
                )
                .mappings()
                .all()
            )
        records = [
            ImageRecord(
                r["image_id"], r["region"], r["version"], r["built_at"], ImageStatus(r["status"])
            )
            for r in rows
        ]
        now = self.mailbox.clock.now()
        policy = recipe.retention
        in_use = {
            image.image_id: await machines.call(
                "DescribeInstances", partial(aws.instances_using, image.region, image.image_id)
            )
            for image in deregistration_candidates(records, policy, now)
        }
        plan = plan_retention(records, policy, now, in_use)
        reason = (
            f"retention of recipe {recipe.name}: older than {policy.deprecate_after_days} days "
            f"and not among the newest {policy.keep_last}"
        )
        for image in plan.deprecate:
            cloud = await aws.cloud(image.region)
            by_ec2 = await machines.call(
                "EnableImageDeprecation",
                partial(aws.deprecate_image, image.region, image.image_id, now + DEPRECATION_LEAD),
            )
            if not by_ec2:
                marker = {"hpcfleet:deprecated-at": now.isoformat(timespec="seconds")}
                await machines.call(
                    "CreateTags", partial(cloud.create_tags, [image.image_id], marker)
                )
            async with self.mailbox.transaction() as tx:
                await tx.conn.execute(
                    update(images)
                    .where(images.c.image_id == image.image_id)
                    .values(
                        status=ImageStatus.DEPRECATED,
                        deprecated_at=tx.now,
                        deprecation="ec2" if by_ec2 else "tag",
                        retire_reason=reason,
                    )
                )
                tx.emit(ImageRetired(image_id=image.image_id, reason=reason, occurred_at=tx.now))
        for image in plan.deregister:
            cloud = await aws.cloud(image.region)
            await machines.call(
                "DeregisterImage",
                partial(cloud.deregister_image, image.image_id, policy.delete_snapshots),
            )
            async with self.mailbox.engine.begin() as conn:
                await conn.execute(
                    update(images)
                    .where(images.c.image_id == image.image_id)
                    .values(status=ImageStatus.DEREGISTERED, deregistered_at=now)
                )
        for image_id, users in plan.blocked.items():
            log.info("bakery: %s stays registered: used by %s", image_id, ", ".join(users))
            async with self.mailbox.engine.begin() as conn:
                await conn.execute(
                    update(images)
                    .where(images.c.image_id == image_id)
                    .values(
                        retire_reason=f"{reason}; deregistration waits: still used by "
                        f"{', '.join(users)}"
                    )
                )
