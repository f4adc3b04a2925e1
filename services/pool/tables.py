"""pool's own tables: pools, their nodes, capacity back-offs, images, the scheduler's busy nodes."""

from sqlalchemy import JSON, Boolean, Column, Integer, String, Table, Text

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
    Column("retired_at", UtcDateTime, nullable=True),  # from ImageRetired: never launched again
    Column("retire_reason", Text, nullable=True),
)

# One row per pool: its spec (PoolSpec as JSON) and how its last reconcile pass went.
pools = Table(
    "pool_pools",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("spec", JSON, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("passed_at", UtcDateTime, nullable=True),  # the last pass that observed and planned
    Column("problems", JSON, nullable=True),  # what kept that pass from doing more (strings)
    Column("actions", JSON, nullable=True),  # what that pass did: action kind -> count
)

# The node table (see services/pool/plan.py, NodeRecord): one row per launch intent or instance,
# written before RunInstances so that a crash can be settled against EC2 by its client token.
nodes = Table(
    "pool_nodes",
    metadata,
    Column("node_id", String(64), primary_key=True),
    Column("pool", String(32), nullable=False, index=True),
    Column("client_token", String(64), nullable=False, unique=True),
    Column("scheduler_node_name", String(64), nullable=False, unique=True),
    Column("image_id", String(64), nullable=False),
    Column("instance_type", String(32), nullable=False),
    Column("subnet_id", String(32), nullable=True),
    Column("zone", String(32), nullable=False),
    Column("state", String(20), nullable=False),
    Column("since", UtcDateTime, nullable=False),
    Column("instance_id", String(32), nullable=True, unique=True),
    Column("launched_at", UtcDateTime, nullable=True),
    Column("provisioned", Boolean, nullable=False),
    Column("retiring", String(20), nullable=True),
    Column("last_error", Text, nullable=True),
    # the tags and template of the first RunInstances, so a retry sends exactly the same call
    Column("launch", JSON, nullable=True),
)

# Instance types EC2 had no capacity for in a zone, and until when they are not tried there.
backoffs = Table(
    "pool_backoffs",
    metadata,
    Column("pool", String(32), primary_key=True),
    Column("instance_type", String(32), primary_key=True),
    Column("zone", String(32), primary_key=True),
    Column("until", UtcDateTime, nullable=False),
    Column("reason", Text, nullable=False),
)

# The scheduler's nodes with jobs on them, from the latest QueueDepthChanged (one row, id 1):
# a PowerOff of one of them is refused, so a busy node is never stopped.
scheduler = Table(
    "pool_scheduler",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("taken_at", UtcDateTime, nullable=False),
    Column("busy", JSON, nullable=False),  # scheduler node names
)
