"""pool: pools, their nodes, capacity back-offs, the scheduler's busy nodes; retired images

Revision ID: 0002_pool
Revises: 0001
Create Date: 2026-11-30 09:00:00.000000

Touches only pool_ tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_pool"
down_revision: str | None = "0002_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pool_backoffs",
        sa.Column("pool", sa.String(length=32), nullable=False),
        sa.Column("instance_type", sa.String(length=32), nullable=False),
        sa.Column("zone", sa.String(length=32), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("pool", "instance_type", "zone", name=op.f("pk_pool_backoffs")),
    )
    op.create_table(
        "pool_nodes",
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("pool", sa.String(length=32), nullable=False),
        sa.Column("client_token", sa.String(length=64), nullable=False),
        sa.Column("scheduler_node_name", sa.String(length=64), nullable=False),
        sa.Column("image_id", sa.String(length=64), nullable=False),
        sa.Column("instance_type", sa.String(length=32), nullable=False),
        sa.Column("subnet_id", sa.String(length=32), nullable=True),
        sa.Column("zone", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instance_id", sa.String(length=32), nullable=True),
        sa.Column("launched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provisioned", sa.Boolean(), nullable=False),
        sa.Column("retiring", sa.String(length=20), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("launch", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_pool_nodes")),
        sa.UniqueConstraint("client_token", name=op.f("uq_pool_nodes_client_token")),
        sa.UniqueConstraint("instance_id", name=op.f("uq_pool_nodes_instance_id")),
        sa.UniqueConstraint("scheduler_node_name", name=op.f("uq_pool_nodes_scheduler_node_name")),
    )
    with op.batch_alter_table("pool_nodes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pool_nodes_pool"), ["pool"], unique=False)

    op.create_table(
        "pool_pools",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("passed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("problems", sa.JSON(), nullable=True),
        sa.Column("actions", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pool_pools")),
    )
    op.create_table(
        "pool_scheduler",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("busy", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pool_scheduler")),
    )
    with op.batch_alter_table("pool_images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("retire_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pool_images", schema=None) as batch_op:
        batch_op.drop_column("retire_reason")
        batch_op.drop_column("retired_at")

    op.drop_table("pool_scheduler")
    op.drop_table("pool_pools")
    with op.batch_alter_table("pool_nodes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pool_nodes_pool"))

    op.drop_table("pool_nodes")
    op.drop_table("pool_backoffs")
