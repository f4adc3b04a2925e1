"""autogrow: what it asked of each node and the pool's answers, images, the queue, the decisions

Revision ID: 0002_autogrow
Revises: 0001
Create Date: 2026-11-29 18:00:00

Touches only autogrow_ tables. Nodes recorded before this revision keep their rows: they are in
the default pool, not drained by autogrow, not retiring, with no command under way.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_autogrow"
down_revision: str | None = "0002_pool"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("autogrow_nodes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "pool", sa.String(length=64), server_default=sa.text("'default'"), nullable=False
            )
        )
        batch_op.add_column(
            sa.Column("drain_requested", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("requested_power", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("retiring", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("refused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("refusal", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "autogrow_images",
        sa.Column("image_id", sa.String(length=64), nullable=False),
        sa.Column("built_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_autogrow_images")),
    )
    op.create_table(
        "autogrow_queue",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("snapshot", sa.JSON(), nullable=True),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_autogrow_queue")),
    )
    op.create_table(
        "autogrow_decisions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("decision_id", sa.String(length=36), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trigger", sa.String(length=20), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("actions", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_autogrow_decisions")),
        sa.UniqueConstraint("decision_id", name=op.f("uq_autogrow_decisions_decision_id")),
    )
    with op.batch_alter_table("autogrow_decisions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_autogrow_decisions_decided_at"), ["decided_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("autogrow_decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_autogrow_decisions_decided_at"))

    op.drop_table("autogrow_decisions")
    op.drop_table("autogrow_queue")
    op.drop_table("autogrow_images")
    with op.batch_alter_table("autogrow_nodes", schema=None) as batch_op:
        batch_op.drop_column("reported_at")
        batch_op.drop_column("refusal")
        batch_op.drop_column("refused_at")
        batch_op.drop_column("retiring")
        batch_op.drop_column("requested_at")
        batch_op.drop_column("requested_power")
        batch_op.drop_column("drain_requested")
        batch_op.drop_column("pool")
