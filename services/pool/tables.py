"""pool's own tables."""

from sqlalchemy import Column, String, Table

from shared.outbox import mailbox_tables
from shared.store import UtcDateTime, metadata

MAILBOX = mailbox_tables("pool")

images = Table(
    "pool_images",
    metadata,
    Column("image_id", String(64), primary_key=True),
    Column("region", String(32), nullable=False),
    Column("recipe", String(100), nullable=False, index=True),
    Column("version", String(64), nullable=False),
    Column("base_image", String(64), nullable=False),
    Column("billing", String(20), nullable=False),
    Column("built_at", UtcDateTime, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
)
