"""Alembic environment: runs on the connection handed in by `deploy.migrations.upgrade`."""

from typing import Any, Literal

from alembic import context

import services.audit.tables
import services.auth.tables
import services.autogrow.tables
import services.bakery.tables
import services.pool.tables  # noqa: F401  (each service's tables join the one metadata)
from shared.store import UtcDateTime, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `hpcfleet migrate` (deploy.migrations.upgrade)")


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Write our UtcDateTime as a plain timezone-aware DateTime in migrations."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    render_item=render_item,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
