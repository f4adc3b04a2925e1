"""autogrow's own tables: the pool as its events told it, the latest queue, the decisions."""

from sqlalchemy import JSON, BigInteger, Boolean, Column, Integer, String, Table, Text, false, text

from shared.outbox import mailbox_tables
from shared.store import UtcDateTime, metadata

MAILBOX = mailbox_tables("autogrow")

# One row per pool node, from the pool's events (provisioned, power changed, retiring, retired,
# power refused), plus what autogrow itself asked of it: `drain_requested` survives a power cycle
# (the scheduler keeps a drain across reboots, and the policy resumes such a node when it is
# wanted); `requested_power` is a command the pool has not acted on yet, so the policy does not ask
# twice; `refused_at` keeps a node the pool would not start out of the policy's view for a while.
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
    Column("pool", String(64), nullable=False, server_default=text("'default'")),
    Column("drain_requested", Boolean, nullable=False, server_default=false()),
    Column("requested_power", String(20), nullable=True),  # on, off, or slurm-off (see decisions)
    Column("requested_at", UtcDateTime, nullable=True),
    Column("retiring", Boolean, nullable=False, server_default=false()),
    Column("refused_at", UtcDateTime, nullable=True),
    Column("refusal", Text, nullable=True),
    # when the pool sent the event the power state comes from: events may arrive out of order,
    # and an older one must not undo a newer one (None: the state is only a guess)
    Column("reported_at", UtcDateTime, nullable=True),
)

# Images announced by bakery: fresher images are powered on first.
images = Table(
    "autogrow_images",
    metadata,
    Column("image_id", String(64), primary_key=True),
    Column("built_at", UtcDateTime, nullable=False),
)

# The latest queue snapshot (one row, id 1) and how the last read of the scheduler went.
queue = Table(
    "autogrow_queue",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("snapshot", JSON, nullable=True),
    Column("taken_at", UtcDateTime, nullable=True),
    Column("changed_at", UtcDateTime, nullable=True),
    Column("read_at", UtcDateTime, nullable=True),  # the last successful read
    Column("error", Text, nullable=True),  # why the last read failed; None once one succeeds
    Column("error_at", UtcDateTime, nullable=True),
)

# Every decision that did something, with the numbers it was made on and each action's reason.
decisions = Table(
    "autogrow_decisions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),  # newest last
    Column("decision_id", String(36), nullable=False, unique=True),
    Column("decided_at", UtcDateTime, nullable=False, index=True),
    Column("trigger", String(20), nullable=False),  # policy, slurm-resume, slurm-suspend
    Column("summary", Text, nullable=False),
    Column("inputs", JSON, nullable=False),
    Column("actions", JSON, nullable=False),
)

# Each stretch a node was running (billing runs from `started_at`), for the cost so far.
power_intervals = Table(
    "autogrow_power_intervals",
    metadata,
    Column("node_id", String(64), primary_key=True),
    Column("started_at", UtcDateTime, primary_key=True),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("billing", String(20), nullable=False),
)

# Each pool's policy as the operator set it (PUT /autogrow/policies/{pool}): only the knobs given,
# so a knob left out follows the service's default (HPCFLEET_AUTOGROW_POLICY__...) as it changes.
policies = Table(
    "autogrow_policies",
    metadata,
    Column("pool", String(64), primary_key=True),
    Column("settings", JSON, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("updated_by", String(256), nullable=True),  # the token's subject, if the API checks them
)
