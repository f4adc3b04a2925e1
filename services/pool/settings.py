"""pool's settings (prefix `HPCFLEET_POOL_`), read once by the composition root.

The AWS endpoint and region are the runtime's (`HPCFLEET_AWS_ENDPOINT_URL`, `HPCFLEET_AWS_REGION`).
AWS credentials come from auth (`auth_url` + a client id and a secret reference), never from a
long-term key; with no auth but an endpoint set (a moto rehearsal) placeholder credentials are
used; with neither, the pool acts on nothing and says why on every pool it reports.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.pool.spec import PoolSpec


class PoolSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HPCFLEET_POOL_", extra="ignore")

    default_pool: PoolSpec | None = Field(
        default=None,
        description="A pool created at the first pass if no pool of that name exists yet (JSON, "
        "as PUT /pool/pools/{name} takes it, plus its name). Later changes go through the API.",
    )
    reconcile_interval: float = Field(
        default=30.0, gt=0, description="Seconds between reconcile passes when nothing kicks one."
    )
    followups: int = Field(
        default=10,
        ge=0,
        le=100,
        description="Passes run at once after a pass that acted cleanly (so a rollout does not "
        "wait a tick per step); then the interval applies again.",
    )
    capacity_backoff_seconds: float = Field(
        default=600.0,
        gt=0,
        description="How long an instance type is not tried again in a zone after EC2 had no "
        "capacity for it (ParallelCluster's default).",
    )
    launch_concurrency: int = Field(
        default=8, ge=1, le=64, description="RunInstances calls in flight at once."
    )
    cloud_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries of one throttled EC2 call before giving up."
    )
    retry_seconds: float = Field(
        default=1.0, gt=0, description="First back-off of a throttled call (grows, jittered)."
    )
    lock_wait_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a power command waits for the pool's lock held by a pass.",
    )
    auth_url: str | None = Field(
        default=None, description="auth's base URL, for the pool role's AWS credentials."
    )
    auth_client_id: str = Field(default="pool", min_length=1, description="auth client id.")
    auth_client_secret: str | None = Field(
        default=None, description="file:<path> or env:<NAME> holding the auth client secret."
    )
    aws_role: str = Field(default="pool", min_length=1, description="Role asked of auth.")
