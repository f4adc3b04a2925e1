"""A development directory: the accounts of the development IdP and auth's trust in it.

`hpcfleet up` and the end-to-end tests sign in the way production does: an operator through the
AD FS client code (`hpcfleet login`), and auth, for each service's AWS role, through its STS broker
(AD FS sign-in, signed SAML, `AssumeRoleWithSAML`). What that needs (a service account per role and
an operator in the IdP, their passwords and the services' client secrets in private files, the
IdP's signing certificate and TLS certificate, auth's token-signing key) is made here in one
folder, with the environment that configures auth and each service to use it. Every password and
secret is random, written with mode 0600 and referenced as ``file:`` as production references them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives import serialization

from services.auth.devidp import (
    DevIdp,
    DevIdpConfig,
    DevUser,
    LoopbackTls,
    SigningKeyPair,
    role_value,
)
from shared.clock import Clock
from shared.tokens import generate_signing_key, public_key_pem

ACCOUNT = "123456789012"
"""moto's account: the ARNs must name it for moto's STS to hand out its credentials."""
PROVIDER_ARN = f"arn:aws:iam::{ACCOUNT}:saml-provider/ADFS"
ISSUER = "http://adfs.example.test/adfs/services/trust"
ROLE_PREFIX = "hpcfleet-"
OPERATOR = "EXAMPLE\\operator"
AWS_SERVICES = ("pool", "bakery", "audit")
"""The services that call AWS, each with its own role and auth client."""


def role_arn(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{ROLE_PREFIX}{name}"


def _private(path: Path, text: str) -> Path:
    """Write `text` readable by this user only (no trailing newline: secrets are read verbatim)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path


@dataclass(frozen=True)
class DevDirectory:
    """The files of one development sign-in setup, in `folder`."""

    folder: Path
    signing: SigningKeyPair
    tls: LoopbackTls
    operator: DevUser
    services: dict[str, DevUser]
    client_secrets: dict[str, Path]
    token_signing_key: Path
    token_public_keys: Path
    adfs_certificate: Path
    passwords: dict[str, Path] = field(repr=False)

    @classmethod
    def create(
        cls,
        folder: Path,
        now: datetime,
        services: Sequence[str] = AWS_SERVICES,
        *,
        other_clients: Sequence[str] = (),
    ) -> DevDirectory:
        """Fresh accounts, keys and secrets in `folder` (created; files there are replaced): an
        IdP account, an AWS role and an auth client for each of `services`, and an auth client
        alone for each of `other_clients` (e.g. ``slurm``, Slurm's power hooks)."""
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        signing = SigningKeyPair.generate("ADFS Signing - adfs.example.test", now)
        tls = LoopbackTls.generate(folder, now)
        operator = DevUser(
            OPERATOR,
            secrets.token_urlsafe(18),
            roles=(role_value(role_arn("operator"), PROVIDER_ARN),),
            session_name="operator@example.test",
        )
        accounts = {
            name: DevUser(
                f"svc-{name}@example.test",
                secrets.token_urlsafe(18),
                # one role per account: moto's STS fails on an assertion with two
                roles=(role_value(role_arn(name), PROVIDER_ARN),),
            )
            for name in services
        }
        passwords = {
            name: _private(folder / f"{name}.adfs-password", user.password)
            for name, user in accounts.items()
        }
        clients = {
            name: _private(folder / f"{name}.client-secret", secrets.token_urlsafe(24))
            for name in (*services, *other_clients)
        }
        key = generate_signing_key()
        token_key = _private(
            folder / "token-signing-key.pem",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
        )
        public = folder / "token-public-keys.pem"
        public.write_text(public_key_pem(key.public_key()))
        certificate = folder / "adfs-signing.crt"
        certificate.write_bytes(signing.cert_pem)
        return cls(
            folder=folder,
            signing=signing,
            tls=tls,
            operator=operator,
            services=accounts,
            client_secrets=clients,
            token_signing_key=token_key,
            token_public_keys=public,
            adfs_certificate=certificate,
            passwords=passwords,
        )

    def idp(self, clock: Clock) -> DevIdp:
        """The development AD FS that knows the operator and every service account."""
        users = (self.operator, *self.services.values())
        return DevIdp(
            DevIdpConfig(environment="development", users=users, issuer=ISSUER),
            self.signing,
            clock,
        )

    def auth_environment(self, adfs_url: str, *, environment: str = "production") -> dict[str, str]:
        """auth's settings: trust this IdP as AD FS, keep each service role fresh through it,
        sign tokens with this key, and know each service client."""
        roles = {
            name: {
                "role_arn": role_arn(name),
                "username": user.username,
                "password": f"file:{self.passwords[name]}",
            }
            for name, user in self.services.items()
        }
        clients = {name: f"file:{path}" for name, path in self.client_secrets.items()}
        return {
            "HPCFLEET_AUTH_ENVIRONMENT": environment,
            "HPCFLEET_AUTH_ADFS_URL": adfs_url,
            "HPCFLEET_AUTH_ADFS_CA_BUNDLE": str(self.tls.cert),
            "HPCFLEET_AUTH_ADFS_SIGNING_CERTIFICATES": str(self.adfs_certificate),
            "HPCFLEET_AUTH_ADFS_ISSUER": ISSUER,
            "HPCFLEET_AUTH_SAML_PROVIDER_ARN": PROVIDER_ARN,
            "HPCFLEET_AUTH_ROLE_PREFIX": ROLE_PREFIX,
            "HPCFLEET_AUTH_ROLES": json.dumps(roles),
            "HPCFLEET_AUTH_CLIENTS": json.dumps(clients),
            "HPCFLEET_AUTH_SIGNING_KEY": f"file:{self.token_signing_key}",
        }

    def client_environment(self, auth_url: str) -> dict[str, str]:
        """Each AWS-calling service's settings: its credentials come from auth at `auth_url`."""
        env: dict[str, str] = {"HPCFLEET_TOKEN_PUBLIC_KEYS": str(self.token_public_keys)}
        for name in self.services:
            path = self.client_secrets[name]
            prefix = f"HPCFLEET_{name.upper()}_"
            env[prefix + "AUTH_URL"] = auth_url
            env[prefix + "AUTH_CLIENT_SECRET"] = f"file:{path}"
        return env


def idp_server(idp: DevIdp, tls: LoopbackTls, *, port: int = 0) -> uvicorn.Server:
    """The IdP under uvicorn over https on 127.0.0.1 (`port` 0: a free one); run it with
    `serve()` in an event loop or `run()` in a thread, then read `served_url`."""
    config = uvicorn.Config(
        idp.app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
        lifespan="off",
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
    )
    return uvicorn.Server(config)


def served_url(server: uvicorn.Server) -> str:
    """The https URL a started `idp_server` listens on."""
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"https://127.0.0.1:{port}"
