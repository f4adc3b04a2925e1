"""auth's settings (prefix `HPCFLEET_AUTH_`), read once by the composition root.

Secrets are never values here, only references (`file:/run/secrets/x` or `env:NAME`) that are read
when used, so a rotated file is picked up and no secret sits in the process environment dump or in
a settings repr. Nothing is required: an auth with no configuration starts, refuses every token and
credential request with a 503 that names the missing setting, and so cannot hand out anything by
accident (this is also what the single-process mode gets until it configures the dev IdP).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.auth.saml import AWS_RELYING_PARTY, AWS_SIGNIN_URL
from shared.tokens import SecretError, SecretRef

_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_PROVIDER_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:saml-provider/[\w+=,.@-]{1,128}")
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"


def _secret_ref(value: object) -> object:
    """A reference string becomes a SecretRef; a literal is refused without echoing it."""
    if isinstance(value, str):
        try:
            return SecretRef.parse(value)
        except SecretError as exc:
            raise ValueError(str(exc)) from None
    return value


SecretReference = Annotated[SecretRef, BeforeValidator(_secret_ref)]


class RoleSettings(BaseModel):
    """One broker role: the IAM role, and the AD FS service account whose assertion grants it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role_arn: str = Field(description="arn:aws:iam::<account>:role/<name>")
    username: str = Field(
        min_length=3, max_length=256, description="AD FS account: DOMAIN\\user or a UPN."
    )
    password: SecretReference = Field(description="file:<path> or env:<NAME>, never a literal.")
    principal_arn: str | None = Field(
        default=None, description="SAML provider ARN; defaults to HPCFLEET_AUTH_SAML_PROVIDER_ARN."
    )
    duration_seconds: int = Field(
        default=3600, ge=900, le=43200, description="STS DurationSeconds (≤ MaxSessionDuration)."
    )

    @field_validator("role_arn")
    @classmethod
    def _role_arn(cls, value: str) -> str:
        if not _ROLE_ARN.fullmatch(value):
            raise ValueError("role_arn must look like arn:aws:iam::123456789012:role/NAME")
        return value

    @field_validator("principal_arn")
    @classmethod
    def _principal_arn(cls, value: str | None) -> str | None:
        if value is not None and not _PROVIDER_ARN.fullmatch(value):
            raise ValueError(
                "principal_arn must look like arn:aws:iam::123456789012:saml-provider/NAME"
            )
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if "\\" not in value and "@" not in value:
            raise ValueError('AD FS wants the user name as "DOMAIN\\user" or "user@domain"')
        return value


class AuthSettings(BaseSettings):
    """Where AD FS and STS are, which roles to keep fresh, and how tokens are signed."""

    model_config = SettingsConfigDict(env_prefix="HPCFLEET_AUTH_", extra="ignore")

    environment: Literal["development", "production"] = Field(
        default="production",
        description="development allows plain-http AD FS and an ephemeral token-signing key.",
    )
    adfs_url: AnyHttpUrl | None = Field(
        default=None, description="AD FS base URL, e.g. https://adfs.example.com"
    )
    adfs_ca_bundle: Path | None = Field(
        default=None, description="PEM CA bundle to verify AD FS's TLS certificate (else system)."
    )
    adfs_signing_certificates: Path | None = Field(
        default=None,
        description="PEM file with AD FS's token-signing certificate(s) (two during a rollover).",
    )
    adfs_issuer: str | None = Field(
        default=None,
        description="AD FS Federation Service Identifier, e.g. http://adfs.example.com/adfs/services/trust",
    )
    relying_party: str = Field(
        default=AWS_RELYING_PARTY, min_length=1, description="loginToRp of the sign-on page."
    )
    saml_audiences: list[str] = Field(
        default=[AWS_RELYING_PARTY, AWS_SIGNIN_URL],
        min_length=1,
        description="Audiences an assertion may name to be accepted.",
    )
    saml_provider_arn: str | None = Field(
        default=None, description="IAM SAML provider of AD FS (identity.yaml's SamlProviderArn)."
    )
    roles: dict[str, RoleSettings] = Field(
        default_factory=dict,
        description='JSON: {"pool": {"role_arn": ..., "username": ..., "password": "file:..."}}',
    )
    sts_endpoint_url: AnyHttpUrl | None = Field(
        default=None, description="STS endpoint override; defaults to HPCFLEET_AWS_ENDPOINT_URL."
    )
    signing_key: SecretReference | None = Field(
        default=None, description="Ed25519 PKCS#8 PEM private key that signs tokens (reference)."
    )
    previous_public_keys: list[Path] = Field(
        default_factory=list,
        description="PEM public keys of retired signing keys, still accepted during a rotation.",
    )
    token_ttl_seconds: int = Field(
        default=900, ge=60, le=3600, description="Lifetime of issued tokens."
    )
    clients: dict[str, SecretReference] = Field(
        default_factory=dict,
        description='Service clients for the client-credentials grant: {"pool": "file:..."}.',
    )
    role_prefix: str = Field(
        default="hpcfleet-",
        description="IAM role-name prefix (identity.yaml's NamePrefix plus '-'): "
        "arn:...:role/hpcfleet-operator is the 'operator' role of the scope map.",
    )

    @field_validator("roles", "clients")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a name of 1-32 lowercase letters, digits or -")
        return value

    @field_validator("saml_provider_arn")
    @classmethod
    def _provider(cls, value: str | None) -> str | None:
        if value is not None and not _PROVIDER_ARN.fullmatch(value):
            raise ValueError("must look like arn:aws:iam::123456789012:saml-provider/NAME")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> AuthSettings:
        if self.roles and self.adfs_url is None:
            raise ValueError("HPCFLEET_AUTH_ROLES needs HPCFLEET_AUTH_ADFS_URL")
        if self.adfs_url is not None and self.adfs_signing_certificates is None:
            raise ValueError(
                "HPCFLEET_AUTH_ADFS_URL needs HPCFLEET_AUTH_ADFS_SIGNING_CERTIFICATES (a PEM file)"
            )
        for name, role in self.roles.items():
            if role.principal_arn is None and self.saml_provider_arn is None:
                raise ValueError(
                    f"role {name!r} needs a principal_arn or HPCFLEET_AUTH_SAML_PROVIDER_ARN"
                )
        if self.environment == "production":
            if self.adfs_url is not None and self.adfs_url.scheme != "https":
                raise ValueError("HPCFLEET_AUTH_ADFS_URL must be https outside development")
            if (self.adfs_url is not None or self.clients) and self.signing_key is None:
                raise ValueError(
                    "HPCFLEET_AUTH_SIGNING_KEY (file:<path> of an Ed25519 PEM key) is required "
                    "outside development"
                )
        return self

    def principal_arn(self, role: str) -> str:
        """The SAML provider a role is assumed through."""
        configured = self.roles[role]
        principal = configured.principal_arn or self.saml_provider_arn
        assert principal is not None  # checked by _coherent
        return principal
