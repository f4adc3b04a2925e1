"""bakery's own tables."""

from sqlalchemy import Column, String, Table, Text

from shared.outbox import mailbox_tables
from shared.store import UtcDateTime, metadata

MAILBOX = mailbox_tables("bakery")

builds = Table(
    "bakery_builds",
    metadata,
    Column("build_id", String(36), primary_key=True),
    Column("recipe", String(100), nullable=False, index=True),
    Column("reason", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("requested_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
