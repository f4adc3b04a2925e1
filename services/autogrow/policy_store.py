"""Each pool's power policy: the service's default, overridden knob by knob by what the operator
set for the pool (`PUT /autogrow/policies/{pool}`).

Only the knobs the operator named are stored, so the others keep following the service's settings
(`HPCFLEET_AUTOGROW_POLICY__...`) when those change. Both halves are checked again when they are
combined: a stored `min_running` may exceed a `max_running` the default got later, and then the
pool falls back to the default and says why (`Resolved.problem`) rather than deciding on nonsense.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.autogrow.policy import BillingOverride, PolicySettings
from services.autogrow.settings import AutogrowSettings
from services.autogrow.tables import nodes, policies
from shared.events import BillingModel
from shared.store import upsert

DEFAULT_POOL = "default"
"""The pool of a node whose events named none (the column's server default)."""


class PoolPolicy(PolicySettings):
    """One pool's policy as the API takes and shows it: every knob of `PolicySettings` (so a knob
    added there is editable here at once) plus the billing override; unknown knobs are refused.
    `decide()` takes it as the `PolicySettings` it is; the billing override reaches it through the
    pool's node views."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    billing: BillingOverride = None


@dataclass(frozen=True)
class StoredPolicy:
    pool: str
    overrides: dict[str, Any]  # the knobs the operator set, as JSON
    updated_at: datetime
    updated_by: str | None


@dataclass(frozen=True)
class Resolved:
    """The policy a pool's decisions use, and why its stored overrides are ignored, if they are."""

    policy: PoolPolicy
    problem: str | None = None


def default_policy(settings: AutogrowSettings) -> PoolPolicy:
    """The policy of a pool with no overrides: the service's settings."""
    return PoolPolicy.model_validate({**settings.policy.model_dump(), "billing": settings.billing})


def overrides_of(body: PoolPolicy) -> dict[str, Any]:
    """The knobs a request named (an explicit null included), as stored."""
    return body.model_dump(mode="json", include=set(body.model_fields_set))


def combine(default: PoolPolicy, overrides: Mapping[str, Any]) -> PoolPolicy:
    """The default with `overrides` on top; raises `ValidationError` if they do not fit together."""
    return PoolPolicy.model_validate({**default.model_dump(), **overrides})


def resolve(default: PoolPolicy, overrides: Mapping[str, Any] | None) -> Resolved:
    """What a pool decides with: `combine`, or the default (saying why) if that fails. A stored
    knob that no longer exists (renamed in a later release) is skipped and named."""
    if not overrides:
        return Resolved(default)
    known = {k: v for k, v in overrides.items() if k in PoolPolicy.model_fields}
    gone = sorted(set(overrides) - set(known))
    try:
        policy = combine(default, known)
    except ValidationError as exc:
        return Resolved(
            default,
            f"the pool's settings do not fit the service's default, which is used instead: "
            f"{describe(exc)}",
        )
    problem = f"unknown settings ignored: {', '.join(gone)}" if gone else None
    return Resolved(policy, problem)


def describe(exc: ValidationError) -> str:
    """A validation failure in one line, as an operator reads it."""
    parts = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


async def load_stored(
    conn: AsyncConnection, pools: Iterable[str] | None = None
) -> dict[str, StoredPolicy]:
    """The stored policies (of these pools, or all), by pool."""
    query = select(policies)
    if pools is not None:
        query = query.where(policies.c.pool.in_(list(pools)))
    return {
        row.pool: StoredPolicy(row.pool, dict(row.settings), row.updated_at, row.updated_by)
        for row in await conn.execute(query)
    }


async def load_policies(
    conn: AsyncConnection, default: PoolPolicy, pools: Iterable[str]
) -> dict[str, Resolved]:
    """The policy each of these pools decides with."""
    wanted = list(pools)
    stored = await load_stored(conn, wanted)
    return {
        pool: resolve(default, stored[pool].overrides if pool in stored else None)
        for pool in wanted
    }


async def known_pools(conn: AsyncConnection) -> set[str]:
    """Pools autogrow has heard of: those of its nodes (from the pool's events) and those with a
    stored policy."""
    from_nodes = await conn.execute(select(nodes.c.pool).distinct())
    from_policies = await conn.execute(select(policies.c.pool))
    return {row[0] for row in from_nodes} | {row[0] for row in from_policies}


async def save_policy(
    conn: AsyncConnection,
    pool: str,
    overrides: Mapping[str, Any],
    now: datetime,
    by: str | None,
) -> None:
    values = {"pool": pool, "settings": dict(overrides), "updated_at": now, "updated_by": by}
    await upsert(conn, policies, values, ["pool"])


async def billing_of(conn: AsyncConnection, pool: str, default: PoolPolicy) -> BillingModel | None:
    """The pool's billing override, if any (for the cost of a run starting now)."""
    stored = await load_stored(conn, [pool])
    return resolve(default, stored[pool].overrides if pool in stored else None).policy.billing
