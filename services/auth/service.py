"""auth: identity and credentials. This module wires its settings, API and STS broker together.

The STS broker runs in the process that serves `GET /auth/credentials/{role}` (the API), started
and stopped by the auth router's lifespan, which FastAPI merges into the app's; the worker process
has nothing to refresh, so it neither signs in to AD FS nor calls STS.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import sys
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.api import CLIENT_SCOPES, AuthContext, make_router
from services.auth.saml import SamlTrust, load_certificates
from services.auth.settings import AuthSettings
from services.auth.tables import MAILBOX
from shared.clock import ScaledClock, SystemClock
from shared.service import Runtime, Service
from shared.settings import ConfigurationError, load_settings
from shared.tokens import (
    SecretError,
    TokenIssuer,
    TokenVerifier,
    generate_signing_key,
    load_signing_key,
)

CONSUMER = "auth"

log = logging.getLogger(__name__)


def make_context(settings: AuthSettings, runtime: Runtime) -> AuthContext:
    """Read the keys and certificates the settings point at; a bad one is a ConfigurationError."""
    unknown = sorted(set(settings.clients) - set(CLIENT_SCOPES))
    if unknown:
        raise ConfigurationError(
            f"invalid configuration: HPCFLEET_AUTH_CLIENTS: {', '.join(unknown)} not in the "
            f"scope map (known clients: {', '.join(sorted(CLIENT_SCOPES))})"
        )
    try:
        if settings.signing_key is not None:
            key = load_signing_key(settings.signing_key)
        elif settings.environment == "development":
            log.warning("auth: an ephemeral token-signing key; tokens die with this process")
            key = generate_signing_key()
        else:
            key = None
    except SecretError as exc:
        raise ConfigurationError(
            f"invalid configuration: HPCFLEET_AUTH_SIGNING_KEY: {exc}"
        ) from None
    public_keys: list[Ed25519PublicKey] = [key.public_key()] if key is not None else []
    for path in settings.previous_public_keys:
        public_keys.append(_public_key(path))
    trust = None
    if settings.adfs_signing_certificates is not None:
        try:
            certificates = load_certificates(settings.adfs_signing_certificates.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                "invalid configuration: HPCFLEET_AUTH_ADFS_SIGNING_CERTIFICATES: "
                f"{settings.adfs_signing_certificates} is not a readable PEM certificate file "
                f"({type(exc).__name__})"
            ) from None
        trust = SamlTrust(
            certificates,
            issuer=settings.adfs_issuer,
            audiences=frozenset(settings.saml_audiences),
        )
    verify: ssl.SSLContext | bool = True
    if settings.adfs_ca_bundle is not None:
        try:
            verify = ssl.create_default_context(cafile=str(settings.adfs_ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"invalid configuration: HPCFLEET_AUTH_ADFS_CA_BUNDLE: {exc}"
            ) from None
    if key is None and not settings.roles:
        log.warning(
            "auth is not configured (no HPCFLEET_AUTH_SIGNING_KEY): it refuses every token "
            "and credentials request"
        )
    endpoint = settings.sts_endpoint_url or runtime.settings.aws_endpoint_url
    return AuthContext(
        settings=settings,
        clock=runtime.clock,
        region=runtime.settings.aws_region,
        sts_endpoint_url=str(endpoint) if endpoint is not None else None,
        issuer=TokenIssuer(key, ttl=_ttl(settings)) if key is not None else None,
        verifier=TokenVerifier(public_keys) if public_keys else None,
        public_keys=tuple(public_keys),
        trust=trust,
        adfs_verify=verify,
    )


def _ttl(settings: AuthSettings) -> timedelta:
    return timedelta(seconds=settings.token_ttl_seconds)


def _public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"invalid configuration: HPCFLEET_AUTH_PREVIOUS_PUBLIC_KEYS: {path}: "
            f"{type(exc).__name__}"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(
            f"invalid configuration: HPCFLEET_AUTH_PREVIOUS_PUBLIC_KEYS: {path} is not Ed25519"
        )
    return key


def _settings_or_exit() -> AuthSettings:
    """The composition root's path: one line and exit status 2 on a bad setting."""
    try:
        return load_settings(AuthSettings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def assemble(runtime: Runtime, settings: AuthSettings) -> tuple[Service, AuthContext]:
    """The service and the context its routes share (tests reach the broker through it)."""
    context = make_context(settings, runtime)
    router = make_router(context)
    return Service.create(CONSUMER, runtime, runtime.mailbox(MAILBOX), router=router), context


def real_time(runtime: Runtime) -> Runtime:
    """auth's runtime on real time: tokens and STS credentials expire in real time, so a
    rehearsal's accelerated clock (HPCFLEET_CLOCK_SPEED) would hand out tokens other APIs reject
    and credentials botocore thinks are stale."""
    if isinstance(runtime.clock, ScaledClock):
        return dataclasses.replace(runtime, clock=SystemClock())
    return runtime


def build(runtime: Runtime, settings: AuthSettings | None = None) -> Service:
    """auth's service; `settings` default to the HPCFLEET_AUTH_ environment."""
    runtime = real_time(runtime)
    if settings is not None:
        return assemble(runtime, settings)[0]
    settings = _settings_or_exit()
    try:
        return assemble(runtime, settings)[0]
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
