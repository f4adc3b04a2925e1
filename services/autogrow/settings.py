"""autogrow's settings (prefix `HPCFLEET_AUTOGROW_`), read once by the composition root.

The policy is nested: `HPCFLEET_AUTOGROW_POLICY__MIN_RUNNING=2`, `..._POLICY__IDLE_SECONDS=600`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import hostlist
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.autogrow.policy import BillingOverride, PolicySettings
from services.autogrow.swf import BUNDLED_TRACES

Mode = Literal["hpcfleet-decides", "slurm-decides"]
SchedulerKind = Literal["slurm", "simulated"]


class AutogrowSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HPCFLEET_AUTOGROW_", env_nested_delimiter="__", extra="ignore"
    )

    scheduler: SchedulerKind = Field(
        default="slurm",
        description="slurm: the real controller through its client programs; simulated: a "
        "bundled workload trace replayed on the pool's nodes (single-process mode, simulator).",
    )
    mode: Mode = Field(
        default="hpcfleet-decides",
        description="hpcfleet-decides: autogrow reads the queue and powers nodes on and off. "
        "slurm-decides: Slurm's ResumeProgram/SuspendProgram call `hpcfleet slurm-resume` / "
        "`slurm-suspend`, autogrow powers on what Slurm asks for and still chooses, billing-aware, "
        "when idle nodes go down (set Slurm's SuspendTime high).",
    )
    poll_interval: float = Field(
        default=2.0, gt=0, description="Seconds between reads of the queue and between decisions."
    )
    stale_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A queue read older than this is no basis for a decision: nothing is decided "
        "until the scheduler answers again.",
    )
    command_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A PowerOn/PowerOff the pool has not acted on by then is forgotten, so the "
        "policy may ask again (the pool refused it, or the command was lost).",
    )
    refusal_backoff_seconds: float = Field(
        default=600.0,
        ge=0,
        description="A node the pool refused to start (capacity, being replaced, ...) is left "
        "out of the policy's view this long, so that another node is powered on instead; a new "
        "power report from the pool ends it sooner.",
    )
    policy: PolicySettings = Field(
        default_factory=PolicySettings,
        description="The power policy of every pool without its own (PUT /autogrow/policies/...); "
        "a pool's own policy overrides only the knobs it names.",
    )
    billing: BillingOverride = None  # the same knob as a pool's own `billing`
    slurm_bin_dir: Path | None = Field(
        default=None, description="Where squeue, sinfo and scontrol are; default: on PATH."
    )
    slurm_conf: Path | None = Field(
        default=None, description="SLURM_CONF for the client programs; default: Slurm's own."
    )
    slurm_timeout: float = Field(
        default=15.0, gt=0, description="Seconds a Slurm client program may take."
    )
    simulated_trace: str = Field(
        default=BUNDLED_TRACES[0], description="Bundled SWF trace the simulated scheduler replays."
    )
    simulated_nodes: str = Field(
        default="node[001-064]",
        description="Scheduler node names of the simulated cluster, as a host list; the pool's "
        "nodes must carry these names.",
    )
    simulated_boot_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Simulated scheduler: seconds from the pool reporting a node running to the "
        "node registering.",
    )

    @field_validator("simulated_trace")
    @classmethod
    def _bundled(cls, value: str) -> str:
        if value not in BUNDLED_TRACES:
            raise ValueError(f"choose one of {', '.join(BUNDLED_TRACES)}")
        return value

    @field_validator("simulated_nodes")
    @classmethod
    def _hostlist(cls, value: str) -> str:
        try:
            names = hostlist.expand_hostlist(value)
        except hostlist.BadHostlist as exc:
            raise ValueError(f"not a host list: {exc}") from None
        if not names:
            raise ValueError("names no node")
        return value

    @model_validator(mode="after")
    def _mode_needs_slurm(self) -> AutogrowSettings:
        if self.mode == "slurm-decides" and self.scheduler != "slurm":
            raise ValueError("mode slurm-decides needs scheduler slurm")
        return self

    @property
    def simulated_node_names(self) -> list[str]:
        return list(hostlist.expand_hostlist(self.simulated_nodes))
