"""bakery's own tables: builds and their steps, the images it published, the schedule's progress."""

from enum import StrEnum

from sqlalchemy import JSON, Column, Index, Integer, String, Table, Text

from shared.outbox import mailbox_tables
from shared.store import UtcDateTime, metadata

MAILBOX = mailbox_tables("bakery")


class BuildStatus(StrEnum):
    QUEUED = "queued"  # waiting for a worker (or for AWS to be reachable)
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # validated and published
    FAILED = "failed"
    SKIPPED = "skipped"  # another build of the recipe was already under way


ACTIVE = (BuildStatus.QUEUED, BuildStatus.RUNNING)

builds = Table(
    "bakery_builds",
    metadata,
    Column("build_id", String(36), primary_key=True),
    Column("recipe", String(100), nullable=False, index=True),
    Column("reason", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("requested_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("backend", String(20), nullable=True),
    Column("version", String(40), nullable=True),
    Column("base_image", String(64), nullable=True),
    Column("image_id", String(64), nullable=True),  # in the recipe's home region
    Column("images", JSON, nullable=True),  # region -> image id, copies included
    Column("builder_id", String(32), nullable=True),
    Column("validator_id", String(32), nullable=True),
    Column("phase", String(60), nullable=True),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("owner", String(64), nullable=True),
    Column("lease_until", UtcDateTime, nullable=True),
    Column("started_at", UtcDateTime, nullable=True),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("waiting", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("log", Text, nullable=True),
)
# at most one unfinished build per recipe, whatever the number of API and worker processes
Index(
    "ux_bakery_builds_active_recipe",
    builds.c.recipe,
    unique=True,
    postgresql_where=builds.c.finished_at.is_(None),
    sqlite_where=builds.c.finished_at.is_(None),
)

build_steps = Table(
    "bakery_build_steps",
    metadata,
    Column("build_id", String(36), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("name", String(60), nullable=False),
    Column("status", String(20), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("detail", Text, nullable=True),
)

images = Table(
    "bakery_images",
    metadata,
    Column("image_id", String(64), primary_key=True),
    Column("region", String(32), nullable=False),
    Column("recipe", String(100), nullable=False, index=True),
    Column("version", String(40), nullable=False),
    Column("build_id", String(36), nullable=False),
    Column("base_image", String(64), nullable=False),
    Column("billing", String(20), nullable=False),
    Column("built_at", UtcDateTime, nullable=False),
    Column("status", String(20), nullable=False),
    Column("published_at", UtcDateTime, nullable=False),
    Column("deprecated_at", UtcDateTime, nullable=True),
    Column("deprecation", String(20), nullable=True),  # "ec2", or "tag" where EC2 lacks it
    Column("deregistered_at", UtcDateTime, nullable=True),
    Column("retire_reason", Text, nullable=True),
)

schedule = Table(
    "bakery_schedule",
    metadata,
    Column("recipe", String(100), primary_key=True),
    Column("anchor", UtcDateTime, nullable=False),  # the last slot handled
    Column("updated_at", UtcDateTime, nullable=False),
)
