"""What it costs to build the warm pool before the first job: the pool's own `plan()`, replayed.

The only use the simulator makes of the pool service, kept here so that a change to `plan()`'s
still-moving API touches one small module: an empty pool is planned tick by tick until every node
is provisioned (launched from the image, first boot, stopped), and each launch is billed for its
`launch_seconds`. The figure is reported beside a policy's cost, not inside it: it is paid once
per pool, whatever the power rule, and the always-on cluster is not charged its own first boot
either.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from services.autogrow.billing import BillingRules, billed_seconds
from services.pool.plan import (
    Launch,
    NodeRecord,
    NodeState,
    ObservedInstance,
    Provision,
    RecordState,
    Stop,
    plan,
)
from services.pool.spec import PoolSpec, Subnet
from shared.events import BillingModel

_IMAGE = "ami-simulated"
_TYPE = "simulated.node"
_ZONE = "sim-1a"
MAX_TICKS = 100  # a pool that is not provisioned after this many plans has a bug, not a slow boot


@dataclass(frozen=True, slots=True)
class Provisioning:
    """The warm pool as `plan()` built it: node ids in launch order, and what building it cost."""

    node_ids: tuple[str, ...]
    launches: int
    billed_seconds: float
    ticks: int


def provision_warm_pool(
    size: int,
    launch_seconds: float,
    billing: BillingModel,
    rules: BillingRules,
    now: datetime,
) -> Provisioning:
    """Plan an empty pool of `size` nodes to the warm (stopped) state; EC2 answers at once.

    Each tick advances `launch_seconds`: a launched instance has booted by the next tick, so it
    is stopped there, and provisioned on the tick after.
    """
    spec = PoolSpec(
        name="sim",
        size=size,
        instance_types=(_TYPE,),
        subnets=(Subnet(subnet_id="subnet-sim", zone=_ZONE),),
        image_id=_IMAGE,
    )
    rows: dict[str, NodeRecord] = {}
    instances: dict[str, ObservedInstance] = {}
    launches = 0
    billed = 0.0
    step = timedelta(seconds=max(launch_seconds, 1.0))
    for tick in range(1, MAX_TICKS + 1):
        result = plan(spec, list(rows.values()), list(instances.values()), now)
        if result.problems:
            raise RuntimeError(f"the pool refused to plan: {'; '.join(result.problems)}")
        for action in result.actions:
            if isinstance(action, Launch):
                instance_id = f"i-{len(instances):08x}"
                rows[action.node.node_id] = replace(
                    action.node,
                    instance_id=instance_id,
                    state=NodeState.RUNNING,
                    launched_at=now,
                )
                instances[instance_id] = ObservedInstance(
                    instance_id=instance_id,
                    state=NodeState.RUNNING,
                    image_id=_IMAGE,
                    instance_type=_TYPE,
                    zone=_ZONE,
                    launch_time=now,
                    booted=True,
                    client_token=action.node.client_token,
                )
                launches += 1
                billed += billed_seconds(billing, launch_seconds, rules)
            elif isinstance(action, Stop):
                rows[action.node_id] = replace(
                    rows[action.node_id], state=NodeState.STOPPED, since=now
                )
                instances[action.instance_id] = replace(
                    instances[action.instance_id], state=NodeState.STOPPED, booted=False
                )
            elif isinstance(action, RecordState):
                rows[action.node_id] = replace(
                    rows[action.node_id], state=action.state, since=action.since
                )
            elif isinstance(action, Provision):
                rows[action.node_id] = replace(rows[action.node_id], provisioned=True)
            else:
                raise RuntimeError(f"unexpected pool action while provisioning: {action}")
        if len(rows) == size and all(row.provisioned for row in rows.values()):
            return Provisioning(tuple(rows), launches, billed, tick)
        now += step
    raise RuntimeError(f"the pool was not provisioned after {MAX_TICKS} plans")
