"""bakery: builds with steps, leases and logs; published images; the schedule's progress

Revision ID: 0002_bakery
Revises: 0001
Create Date: 2026-11-29 16:43:44.022625

Touches only bakery_ tables. Builds recorded by the skeleton before this revision never ran;
they are closed as skipped, so that the one-unfinished-build-per-recipe index can be created.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_bakery"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bakery_build_steps",
        sa.Column("build_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=60), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("build_id", "seq", name=op.f("pk_bakery_build_steps")),
    )
    op.create_table(
        "bakery_images",
        sa.Column("image_id", sa.String(length=64), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("recipe", sa.String(length=100), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("build_id", sa.String(length=36), nullable=False),
        sa.Column("base_image", sa.String(length=64), nullable=False),
        sa.Column("billing", sa.String(length=20), nullable=False),
        sa.Column("built_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deprecated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deprecation", sa.String(length=20), nullable=True),
        sa.Column("deregistered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retire_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_bakery_images")),
    )
    with op.batch_alter_table("bakery_images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bakery_images_recipe"), ["recipe"], unique=False)

    op.create_table(
        "bakery_schedule",
        sa.Column("recipe", sa.String(length=100), nullable=False),
        sa.Column("anchor", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("recipe", name=op.f("pk_bakery_schedule")),
    )
    with op.batch_alter_table("bakery_builds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("backend", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("version", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("base_image", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("image_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("images", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("builder_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("validator_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("phase", sa.String(length=60), nullable=True))
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("waiting", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("log", sa.Text(), nullable=True))
    op.execute(
        "UPDATE bakery_builds SET status = 'skipped', finished_at = updated_at, "
        "error = 'recorded before bakery could build (migration 0002_bakery); request it again'"
    )
    with op.batch_alter_table("bakery_builds", schema=None) as batch_op:
        batch_op.create_index(
            "ux_bakery_builds_active_recipe",
            ["recipe"],
            unique=True,
            postgresql_where=sa.text("finished_at IS NULL"),
            sqlite_where=sa.text("finished_at IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("bakery_builds", schema=None) as batch_op:
        batch_op.drop_index(
            "ux_bakery_builds_active_recipe",
            postgresql_where=sa.text("finished_at IS NULL"),
            sqlite_where=sa.text("finished_at IS NULL"),
        )
        batch_op.drop_column("log")
        batch_op.drop_column("error")
        batch_op.drop_column("waiting")
        batch_op.drop_column("finished_at")
        batch_op.drop_column("started_at")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("owner")
        batch_op.drop_column("attempt")
        batch_op.drop_column("phase")
        batch_op.drop_column("validator_id")
        batch_op.drop_column("builder_id")
        batch_op.drop_column("images")
        batch_op.drop_column("image_id")
        batch_op.drop_column("base_image")
        batch_op.drop_column("version")
        batch_op.drop_column("backend")

    op.drop_table("bakery_schedule")
    with op.batch_alter_table("bakery_images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bakery_images_recipe"))

    op.drop_table("bakery_images")
    op.drop_table("bakery_build_steps")
