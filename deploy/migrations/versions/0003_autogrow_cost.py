"""autogrow: running intervals of the pool's nodes, for the cost so far

Revision ID: 0003_autogrow_cost
Revises: 0002_autogrow
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_autogrow_cost"
down_revision: str | None = "0002_autogrow"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "autogrow_power_intervals",
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("billing", sa.String(length=20), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "started_at", name=op.f("pk_autogrow_power_intervals")),
    )


def downgrade() -> None:
    op.drop_table("autogrow_power_intervals")
