"""autogrow's own tables."""

from sqlalchemy import Column, String, Table

from shared.outbox import mailbox_tables
from shared.store import UtcDateTime, metadata

MAILBOX = mailbox_tables("autogrow")

nodes = Table(
    "autogrow_nodes",
    metadata,
    Column("node_id", String(64), primary_key=True),
    Column("scheduler_node_name", String(64), nullable=True, index=True),
    Column("instance_id", String(32), nullable=True),
    Column("image_id", String(64), nullable=True),
    Column("power_state", String(20), nullable=False),
    Column("since", UtcDateTime, nullable=False),
    Column("billing", String(20), nullable=False),
    Column("retired_at", UtcDateTime, nullable=True),
)
