"""audit's settings (prefix `HPCFLEET_AUDIT_`), read once by the composition root.

The queue, dead-letter queue and topic come from audit.yaml's outputs (`SecurityEventsQueueUrl`,
`SecurityEventsDeadLetterQueueUrl`, `AlertTopicArn`). AWS credentials come from auth for the
`audit` role, as for bakery; with no auth but `HPCFLEET_AWS_ENDPOINT_URL` set (a moto rehearsal),
placeholder credentials are used; with neither, the queue is not read and readiness says why.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.audit.alerts import DEFAULT_ESCALATION, Escalation
from services.audit.rules import Severity


class EscalationOverride(BaseModel):
    """One severity's timing; durations in seconds or ISO 8601 (`PT15M`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    renotify_every: timedelta = Field(
        gt=timedelta(0), description="Repeat an open alert this often."
    )
    escalate_after: timedelta | None = Field(
        ge=timedelta(0), description="Escalate this long after the alert opened; null: never."
    )


class AuditSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HPCFLEET_AUDIT_", extra="ignore")

    queue_url: str | None = Field(
        default=None, description="The security-event queue (audit.yaml SecurityEventsQueueUrl)."
    )
    dlq_url: str | None = Field(
        default=None,
        description="Its dead-letter queue (SecurityEventsDeadLetterQueueUrl); every message "
        "there becomes an alert too.",
    )
    topic_arn: str | None = Field(
        default=None,
        pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]+$",
        description="SNS topic for notifications (audit.yaml AlertTopicArn).",
    )
    webhook_url: AnyHttpUrl | None = Field(
        default=None,
        description="Also POST each notification as JSON here; https, except to a loopback host.",
    )
    webhook_timeout: float = Field(default=10.0, gt=0, le=60, description="Webhook timeout, s.")
    api_url: AnyHttpUrl | None = Field(
        default=None, description="The audit API's public base URL, for the link in notifications."
    )
    aws_region: str | None = Field(
        default=None,
        min_length=1,
        description="Region of the queue and topic (where audit.yaml is deployed); default "
        "HPCFLEET_AWS_REGION.",
    )
    wait_seconds: int = Field(
        default=20,
        ge=1,
        le=20,
        description="Long-poll wait of each receive: an empty queue costs one call per this.",
    )
    retry_seconds: float = Field(
        default=1.0, gt=0, description="First back-off after SQS or a notification failed."
    )
    retry_max_seconds: float = Field(
        default=300.0, gt=0, description="Longest back-off (it doubles, jittered, up to this)."
    )
    notify_interval: float = Field(
        default=60.0,
        gt=0,
        description="Longest sleep of the notifier: it wakes when the next notification is due, "
        "when an alert arrives in this process, and at least this often for the others.",
    )
    notify_batch: int = Field(
        default=50, ge=1, le=1000, description="Notifications per pass; the rest follow at once."
    )
    escalation: Annotated[dict[Severity, EscalationOverride], NoDecode] = Field(
        default_factory=dict,
        description='Per-severity override as JSON, e.g. {"critical": {"renotify_every": 300, '
        '"escalate_after": 900}}; unnamed severities keep their defaults.',
    )
    auth_url: str | None = Field(
        default=None, description="auth's base URL, for the audit role's AWS credentials."
    )
    auth_client_id: str = Field(default="audit", min_length=1, description="auth client id.")
    auth_client_secret: str | None = Field(
        default=None, description="file:<path> or env:<NAME> holding the auth client secret."
    )
    aws_role: str = Field(default="audit", min_length=1, description="Role asked of auth.")

    @field_validator("escalation", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        """Decoded here, not by pydantic-settings, so bad JSON names its variable like any error."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError as exc:
            example = '{"high": {"renotify_every": 600, "escalate_after": null}}'
            raise ValueError(f"not JSON ({exc}); e.g. {example}") from None

    @field_validator("webhook_url")
    @classmethod
    def _encrypted_in_transit(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        """Alerts describe the account's security: they leave the host only over TLS."""
        if value is None or value.scheme == "https" or _is_loopback(value.host or ""):
            return value
        raise ValueError("use an https:// URL (plain http only to a loopback host)")

    def policy(self) -> Mapping[Severity, Escalation]:
        """The escalation policy: the defaults, with this setting's overrides."""
        overrides = {
            severity: Escalation(o.renotify_every, o.escalate_after)
            for severity, o in self.escalation.items()
        }
        return {**DEFAULT_ESCALATION, **overrides}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
