"""autogrow: each pool's policy as the operator set it

Revision ID: 0004_autogrow_policies
Revises: 0003_autogrow_cost

Touches only autogrow_ tables. A pool without a row follows the service's default policy, so
every pool keeps deciding as before this revision.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_autogrow_policies"
down_revision: str | None = "0003_autogrow_cost"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "autogrow_policies",
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("pool", name=op.f("pk_autogrow_policies")),
    )


def downgrade() -> None:
    op.drop_table("autogrow_policies")
