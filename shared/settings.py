"""Settings read only from the environment (prefix `HPCFLEET_`), validated at start.

Each process builds one `Settings` in its composition root; nothing reads the environment elsewhere.
A bad value stops the process with one line that names the variable (see `load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import AnyUrl, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigurationError(Exception):
    """A setting is missing or invalid; the message says which and how to fix it."""


class Settings(BaseSettings):
    """What every hpcfleet process needs: where the store and the bus are, how to log."""

    model_config = SettingsConfigDict(env_prefix="HPCFLEET_", extra="ignore")

    database_url: str = Field(
        default="sqlite+aiosqlite:///.hpcfleet/hpcfleet.db",
        description="SQLAlchemy URL: postgresql+asyncpg://... or sqlite+aiosqlite:///path.",
    )
    bus_url: str = Field(
        default="memory://",
        description="amqp://user:password@host:port/vhost for RabbitMQ, or memory:// in-process.",
    )
    exchange: str = Field(default="hpcfleet", min_length=1, description="The topic exchange.")
    prefetch: int = Field(default=64, ge=1, le=10_000, description="Unacknowledged deliveries.")
    delivery_limit: int = Field(
        default=5, ge=1, le=100, description="Deliveries of a failing message before dead-letter."
    )
    relay_batch: int = Field(default=200, ge=1, le=10_000, description="Outbox rows per batch.")
    relay_interval: float = Field(default=1.0, gt=0, description="Outbox poll period, seconds.")
    aws_endpoint_url: AnyUrl | None = Field(
        default=None, description="AWS endpoint override (a moto server for rehearsals)."
    )
    aws_region: str = Field(default="us-east-1", min_length=1, description="AWS region.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    api_host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port the API listens on.")
    api_auth: Literal["required", "disabled"] = Field(
        default="required",
        description="Whether service APIs demand a bearer token (disable only to rehearse).",
    )
    token_public_keys: Path | None = Field(
        default=None, description="PEM file with auth's token-verification public key(s)."
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("use postgresql+asyncpg://... or sqlite+aiosqlite:///path")
        return value

    @field_validator("bus_url")
    @classmethod
    def _known_bus(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://", "memory://")):
            raise ValueError("use amqp://user:password@host:5672/ or memory://")
        return value


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S] = Settings) -> S:  # type: ignore[assignment]
    """Build settings from the environment, turning validation errors into one readable line."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = "; ".join(
            f"{prefix}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
