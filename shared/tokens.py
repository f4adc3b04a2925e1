"""Service tokens, and the secret references that keep keys and passwords out of configuration.

Tokens are EdDSA (Ed25519) JWTs: only auth holds the private key, and every other service verifies
locally with the published public key, so no shared secret has to be spread around. Issuing and
verifying are pure: the time is passed in, never read from the system clock (PyJWT's own time
checks are switched off and done here against `now`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "hpcfleet-auth"
DEFAULT_AUDIENCE = "hpcfleet"
MAX_TTL = timedelta(hours=1)


class SecretError(Exception):
    """A secret reference is malformed or its secret cannot be read (the secret is never shown)."""


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives: `file:/run/secrets/x` or `env:NAME`; a literal secret is refused."""

    kind: Literal["file", "env"]
    location: str

    @classmethod
    def parse(cls, reference: str) -> SecretRef:
        kind, sep, location = reference.partition(":")
        if not sep or not location or kind not in ("file", "env"):
            raise SecretError(
                "a secret must be given as 'file:<path>' or 'env:<VARIABLE>', never as a literal"
            )
        return cls("file" if kind == "file" else "env", location)

    def read(self) -> str:
        """The secret, read now (so a rotated file is picked up), without its trailing newline."""
        if self.kind == "file":
            try:
                value = Path(self.location).read_text(encoding="utf-8")
            except OSError as exc:
                raise SecretError(
                    f"cannot read secret file {self.location}: {exc.strerror}"
                ) from None
        else:
            value = os.environ.get(self.location, "")
        value = value.rstrip("\r\n")
        if not value:
            raise SecretError(f"the secret at {self} is empty or missing")
        return value

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}"


class TokenError(Exception):
    """A token was refused; the message says why and never contains the token."""


class TokenInvalid(TokenError):
    """Malformed, forged, signed by an unknown key, or for another issuer or audience."""


class TokenExpired(TokenError):
    """Past its expiry."""


class TokenScopeMissing(TokenError):
    """Valid, but without a scope the caller needs."""


@dataclass(frozen=True)
class TokenClaims:
    """Who a verified token speaks for and what it may do."""

    subject: str
    role: str
    scopes: frozenset[str]
    issued_at: datetime
    expires_at: datetime
    token_id: str

    def require(self, scopes: Iterable[str]) -> None:
        missing = sorted(set(scopes) - self.scopes)
        if missing:
            raise TokenScopeMissing(f"the token lacks scope(s): {' '.join(missing)}")


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh key, for the single-process mode and tests; production loads one from a secret."""
    return Ed25519PrivateKey.generate()


def load_signing_key(secret: SecretRef) -> Ed25519PrivateKey:
    """The Ed25519 private key (PKCS#8 PEM) stored at `secret`."""
    try:
        key = serialization.load_pem_private_key(secret.read().encode(), password=None)
    except ValueError:
        raise SecretError(f"the secret at {secret} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecretError(f"the key at {secret} is not an Ed25519 key")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public half, as auth publishes it for the other services."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A short fingerprint of the public key, put in the token header to allow key rotation."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()[:12]).decode().rstrip("=")


class TokenIssuer:
    """Signs short-lived tokens; lives only in the auth service."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        ttl: timedelta = timedelta(minutes=15),
    ) -> None:
        if not timedelta(0) < ttl <= MAX_TTL:
            raise ValueError(f"token lifetime must be positive and at most {MAX_TTL}")
        self._key = key
        self._kid = key_id(key)
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self._key)

    def issue(self, subject: str, role: str, scopes: Iterable[str], now: datetime) -> str:
        scope_list = sorted(set(scopes))
        if any(" " in scope or not scope for scope in scope_list):
            raise ValueError("a scope is a non-empty word without spaces")
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "role": role,
            "scope": " ".join(scope_list),
            "iat": int(now.timestamp()),
            "exp": int((now + self.ttl).timestamp()),
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self._kid})


class TokenVerifier:
    """Checks tokens with auth's public key(s); every service holds one."""

    def __init__(
        self,
        public_keys: Iterable[Ed25519PublicKey | str],
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway: timedelta = timedelta(seconds=30),
    ) -> None:
        keys: dict[str, Ed25519PublicKey] = {}
        for item in public_keys:
            key = (
                serialization.load_pem_public_key(item.encode()) if isinstance(item, str) else item
            )
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("token verification keys must be Ed25519 public keys")
            keys[key_id(key)] = key
        if not keys:
            raise ValueError("TokenVerifier needs at least one public key")
        self._keys: Mapping[str, Ed25519PublicKey] = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def verify(self, token: str, now: datetime, required_scopes: Iterable[str] = ()) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenInvalid("the token is not a JWT") from None
        if header.get("alg") != ALGORITHM:
            raise TokenInvalid(f"the token's algorithm must be {ALGORITHM}")
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise TokenInvalid("the token is signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["iss", "aud", "sub", "role", "scope", "iat", "exp", "jti"],
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenInvalid("the token's signature is not valid") from None
        except jwt.InvalidAudienceError:
            raise TokenInvalid(f"the token is not for audience {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise TokenInvalid(f"the token is not from issuer {self.issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenInvalid(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"the token is not valid: {exc}") from None
        issued_at = _timestamp(claims["iat"])
        expires_at = _timestamp(claims["exp"])
        if now >= expires_at + self.leeway:
            raise TokenExpired(f"the token expired at {expires_at.isoformat()}")
        if issued_at > now + self.leeway:
            raise TokenInvalid("the token is issued in the future")
        result = TokenClaims(
            subject=str(claims["sub"]),
            role=str(claims["role"]),
            scopes=frozenset(str(claims["scope"]).split()),
            issued_at=issued_at,
            expires_at=expires_at,
            token_id=str(claims["jti"]),
        )
        result.require(required_scopes)
        return result


def _timestamp(value: object) -> datetime:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TokenInvalid("the token's times must be numbers")
    return datetime.fromtimestamp(value, UTC)
