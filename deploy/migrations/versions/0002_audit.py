"""audit: alerts, acknowledgements, notifications sent, the worker's status; audit's mailbox

Revision ID: 0002_audit
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000

Touches only audit_ tables, so it can go anywhere after 0001 when the 0002 revisions are put in
one line.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_audit"
down_revision: str | None = "0002_bakery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_alerts",
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("dedup_key", sa.String(length=200), nullable=False),
        sa.Column("rule", sa.String(length=60), nullable=False),
        sa.Column("severity", sa.String(length=10), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("what", sa.Text(), nullable=False),
        sa.Column("who", sa.Text(), nullable=False),
        sa.Column("account", sa.Text(), nullable=True),
        sa.Column("region", sa.Text(), nullable=True),
        sa.Column("source_ip", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("message_id", sa.String(length=100), nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notifications", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("alert_id", name=op.f("pk_audit_alerts")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_audit_alerts_dedup_key")),
    )
    with op.batch_alter_table("audit_alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_alerts_opened_at"), ["opened_at"], unique=False)

    op.create_table(
        "audit_acknowledgements",
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("acknowledged_by", sa.String(length=200), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["audit_alerts.alert_id"],
            name=op.f("fk_audit_acknowledgements_alert_id_audit_alerts"),
        ),
        sa.PrimaryKeyConstraint("alert_id", name=op.f("pk_audit_acknowledgements")),
    )
    op.create_table(
        "audit_notifications",
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("escalated", sa.Boolean(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("channels", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["audit_alerts.alert_id"],
            name=op.f("fk_audit_notifications_alert_id_audit_alerts"),
        ),
        sa.PrimaryKeyConstraint("alert_id", "attempt", name=op.f("pk_audit_notifications")),
    )
    op.create_table(
        "audit_status",
        sa.Column("component", sa.String(length=20), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ok_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("component", name=op.f("pk_audit_status")),
    )
    op.create_table(
        "audit_inbox",
        sa.Column("consumer", sa.String(length=100), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_audit_inbox")),
    )
    op.create_table(
        "audit_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("correlation_id", sa.String(length=36), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_outbox")),
        sa.UniqueConstraint("message_id", name=op.f("uq_audit_outbox_message_id")),
    )
    with op.batch_alter_table("audit_outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_audit_outbox_unpublished",
            ["id"],
            unique=False,
            postgresql_where=sa.text("published_at IS NULL"),
            sqlite_where=sa.text("published_at IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("audit_outbox", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_audit_outbox_unpublished",
            postgresql_where=sa.text("published_at IS NULL"),
            sqlite_where=sa.text("published_at IS NULL"),
        )
    op.drop_table("audit_outbox")
    op.drop_table("audit_inbox")
    op.drop_table("audit_status")
    op.drop_table("audit_notifications")
    op.drop_table("audit_acknowledgements")
    with op.batch_alter_table("audit_alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_alerts_opened_at"))
    op.drop_table("audit_alerts")
