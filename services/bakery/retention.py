"""Which images to retire: a pure function of the images, the policy, what runs them and the time.

Age counts from when the image was built. The newest `keep_last` versions of a recipe are never
touched, however old, so a recipe whose builds keep failing still has an image. An older version is
deprecated (no new nodes; `ImageRetired` is emitted) once it is `deprecate_after_days` old, and
deregistered with its snapshots once it is `deregister_after_days` old, but never while an instance
still uses it: those are reported as blocked and looked at again on the next pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from services.bakery.recipes import Retention


class ImageStatus(StrEnum):
    AVAILABLE = "available"  # published with ImageReady
    DEPRECATED = "deprecated"  # ImageRetired sent; kept while instances may still use it
    DEREGISTERED = "deregistered"  # gone, with its snapshots


@dataclass(frozen=True)
class ImageRecord:
    """One published image in one region, as bakery's table knows it."""

    image_id: str
    region: str
    version: str
    built_at: datetime
    status: ImageStatus


@dataclass(frozen=True)
class RetentionPlan:
    deprecate: tuple[ImageRecord, ...] = ()
    deregister: tuple[ImageRecord, ...] = ()
    blocked: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Image id -> the instances that keep it from being deregistered."""


def _retirable(images: Iterable[ImageRecord], policy: Retention) -> list[ImageRecord]:
    """Live images outside the newest `keep_last` versions."""
    live = [i for i in images if i.status is not ImageStatus.DEREGISTERED]
    built = {i.version: i.built_at for i in live}
    newest = sorted(built, key=lambda v: built[v], reverse=True)[: policy.keep_last]
    return [i for i in live if i.version not in newest]


def deregistration_candidates(
    images: Iterable[ImageRecord], policy: Retention, now: datetime
) -> list[ImageRecord]:
    """Images old enough to deregister: ask EC2 whether instances still use these."""
    limit = timedelta(days=policy.deregister_after_days)
    return [i for i in _retirable(images, policy) if now - i.built_at >= limit]


def plan_retention(
    images: Sequence[ImageRecord],
    policy: Retention,
    now: datetime,
    in_use: Mapping[str, Sequence[str]],
) -> RetentionPlan:
    """What to do now; `in_use` maps each deregistration candidate to the instances using it."""
    deprecate_limit = timedelta(days=policy.deprecate_after_days)
    candidates = {i.image_id for i in deregistration_candidates(images, policy, now)}
    deprecate: list[ImageRecord] = []
    deregister: list[ImageRecord] = []
    blocked: dict[str, tuple[str, ...]] = {}
    for image in _retirable(images, policy):
        if image.status is ImageStatus.AVAILABLE and now - image.built_at >= deprecate_limit:
            deprecate.append(image)
        if image.image_id in candidates:
            users = tuple(in_use.get(image.image_id, ()))
            if users:
                blocked[image.image_id] = users
            else:
                deregister.append(image)
    return RetentionPlan(tuple(deprecate), tuple(deregister), blocked)
