"""bakery's settings (prefix `HPCFLEET_BAKERY_`), read once by the composition root.

AWS credentials come from auth (`auth_url` + a client id and a secret reference), never from a
long-term key and never from botocore's default chain, which would probe the instance metadata
service. With no auth configured but `HPCFLEET_AWS_ENDPOINT_URL` set (a moto rehearsal), placeholder
credentials are used. With neither, builds wait in `queued` and say why, rather than fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EXAMPLE_RECIPES = Path(__file__).parent / "examples" / "recipes.json"


class BakerySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HPCFLEET_BAKERY_", extra="ignore")

    recipes: Path = Field(
        default=EXAMPLE_RECIPES,
        description="Recipes file (.toml or .json); paths inside it are relative to the file.",
    )
    work_dir: Path = Field(
        default=Path(".hpcfleet/bakery"),
        description="Scratch space for Packer templates and manifests, one folder a build.",
    )
    packer: str = Field(default="packer", min_length=1, description="The packer executable.")
    packer_communicator: str = Field(
        default="ssh",
        pattern=r"^(ssh|winrm|none)$",
        description="Packer communicator. `none` (moto rehearsals) runs steps with shell-local on "
        "this host, with HPCFLEET_ROOT pointing into the build's scratch folder.",
    )
    max_concurrent_builds: int = Field(default=2, ge=1, le=32, description="Builds at once.")
    max_attempts: int = Field(
        default=2, ge=1, le=10, description="Runs of one build that restarts may interrupt."
    )
    lease_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A running build whose worker has not renewed its lease for this long is "
        "taken over (picked up or cleaned up) by another worker or a restarted one.",
    )
    poll_seconds: float = Field(
        default=5.0, gt=0, description="Period of polls on instances, images and commands."
    )
    cloud_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries of one throttled EC2/SSM call before failing."
    )
    retry_seconds: float = Field(
        default=2.0, gt=0, description="First back-off of a throttled call (doubles, jittered)."
    )
    boot_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="Time for a builder or test instance to run and answer."
    )
    image_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="Time for CreateImage or CopyImage to be available."
    )
    schedule_interval: float = Field(default=60.0, gt=0, description="Schedule check period, s.")
    build_interval: float = Field(default=30.0, gt=0, description="Build reconcile period, s.")
    retention_interval: float = Field(default=3600.0, gt=0, description="Retention pass period, s.")
    auth_url: str | None = Field(
        default=None, description="auth's base URL, for the bakery role's AWS credentials."
    )
    auth_client_id: str = Field(default="bakery", min_length=1, description="auth client id.")
    auth_client_secret: str | None = Field(
        default=None, description="file:<path> or env:<NAME> holding the auth client secret."
    )
    aws_role: str = Field(default="bakery", min_length=1, description="Role asked of auth.")

    @model_validator(mode="after")
    def _lease_outlives_renewals(self) -> Self:
        if self.build_interval * 2 > self.lease_seconds:
            raise ValueError(
                "lease_seconds must be at least twice build_interval (the pass that renews it)"
            )
        return self
