"""Our services' AWS credentials, read from auth's credentials endpoint and refreshed before expiry.

botocore's own container provider accepts plain http only to loopback and link-local hosts, and
https to other hosts only from botocore 1.42.5 (aioboto3 15.5 pins 1.40.61), so a service on
another host cannot point `AWS_CONTAINER_CREDENTIALS_FULL_URI` at `http://auth:8000/...`. This
provider does that job with httpx over any host: it fetches the same container-credentials JSON
with a service token and hands botocore refreshable credentials carrying the real `Expiration`,
so botocore refreshes them 15 minutes before they lapse (auth never hands out less than ~20).
No long-term key is involved anywhere: the service holds only its auth client secret.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import aioboto3
import httpx
from aiobotocore.credentials import AioCredentialResolver, AioDeferredRefreshableCredentials
from aiobotocore.session import AioSession

from shared.tokens import SecretError, SecretRef

Credentials = tuple[str, str, str | None]
"""(access key, secret key, session token): what `AwsCloud` accepts from a provider callable."""

METHOD = "hpcfleet-auth"
_CONTAINER_KEYS = ("AccessKeyId", "SecretAccessKey", "Token", "Expiration")


class CredentialsError(Exception):
    """Credentials or a token could not be obtained; the message never holds a secret."""


@dataclass(frozen=True)
class VendedCredentials:
    """One role's temporary credentials as auth vended them."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str = field(repr=False)
    expiration: datetime

    def as_tuple(self) -> Credentials:
        return (self.access_key, self.secret_key, self.token)


def read_secret(reference: str) -> Callable[[], str]:
    """A reader for a `file:`/`env:` secret reference, re-read on each call so a rotated secret is
    picked up; a literal is refused."""
    try:
        secret = SecretRef.parse(reference)
    except SecretError as exc:
        raise CredentialsError(str(exc)) from None

    def read() -> str:
        try:
            return secret.read().strip()
        except SecretError as exc:
            raise CredentialsError(str(exc)) from None

    return read


class TokenSource(Protocol):
    """Where the service token that authorises a credentials request comes from."""

    async def token(self) -> str: ...

    def invalidate(self) -> None:
        """Forget a cached token (auth answered 401 to it)."""


class StaticToken:
    """A fixed token (tests, or a token minted by hand)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def invalidate(self) -> None:
        pass

    def __repr__(self) -> str:
        return "StaticToken(***)"


class TokenFile:
    """A token kept fresh in a file by someone else (e.g. `hpcfleet login`), read at each use."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def token(self) -> str:
        try:
            value = (await asyncio.to_thread(self.path.read_text, encoding="utf-8")).strip()
        except OSError as exc:
            raise CredentialsError(f"cannot read token file {self.path}: {exc.strerror}") from None
        if not value:
            raise CredentialsError(f"token file {self.path} is empty")
        return value

    def invalidate(self) -> None:
        pass


class ClientCredentialsToken:
    """A service token from auth's client-credentials grant, cached until shortly before expiry."""

    def __init__(
        self,
        auth_url: str,
        client_id: str,
        client_secret: Callable[[], str],
        *,
        verify: Any = True,
        timeout: float = 5.0,
        margin: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`client_secret` is called at each fetch (see `read_secret`)."""
        self._url = f"{auth_url.rstrip('/')}/auth/token"
        self._client_id = client_id
        self._secret = client_secret
        self._verify = verify
        self._timeout = timeout
        self._margin = margin
        self._transport = transport
        self._cached: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if self._cached is not None and self._cached[1] - self._margin > time.monotonic():
                return self._cached[0]
            secret = await asyncio.to_thread(self._secret)
            try:
                async with _client(self._verify, self._timeout, self._transport) as http:
                    response = await http.post(
                        self._url,
                        data={"grant_type": "client_credentials"},
                        auth=(self._client_id, secret),
                    )
            except httpx.HTTPError as exc:
                raise CredentialsError(f"cannot reach auth: {type(exc).__name__}") from None
            if response.status_code != 200:
                raise CredentialsError(
                    f"auth refused client {self._client_id!r}: HTTP {response.status_code} "
                    f"{_detail(response)}"
                )
            body = _json(response)
            token, expires_in = body.get("access_token"), body.get("expires_in")
            if not isinstance(token, str) or not isinstance(expires_in, int):
                raise CredentialsError("auth's token answer lacks access_token or expires_in")
            self._cached = (token, time.monotonic() + expires_in)
            return token

    def invalidate(self) -> None:
        self._cached = None


class AuthCredentialProvider:
    """One role's AWS credentials from `GET {auth_url}/auth/credentials/{role}`.

    Use `session()` for an aioboto3 Session whose credentials refresh themselves, or pass the
    provider itself as `AwsCloud(session=provider)` (it is an async callable of the tuple).
    """

    def __init__(
        self,
        auth_url: str,
        role: str,
        token: TokenSource,
        *,
        verify: Any = True,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.url = f"{auth_url.rstrip('/')}/auth/credentials/{role}"
        self.role = role
        self._token = token
        self._verify = verify
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._transport = transport

    async def fetch(self) -> VendedCredentials:
        """Fresh credentials; retries a busy or unreachable auth, and a token auth rejected."""
        problem = "no attempt made"
        renewed_token = False
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            token = await self._token.token()
            try:
                async with _client(self._verify, self._timeout, self._transport) as http:
                    response = await http.get(
                        self.url,
                        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                    )
            except httpx.HTTPError as exc:
                problem = f"cannot reach auth: {type(exc).__name__}"
                continue
            if response.status_code == 200:
                return _parse(response)
            problem = f"HTTP {response.status_code} {_detail(response)}"
            if response.status_code == 401 and not renewed_token:
                self._token.invalidate()  # expired or rotated: one more try with a new one
                renewed_token = True
                continue
            if response.status_code < 500:
                break  # 403 (scope), 404 (role): retrying will not help
        raise CredentialsError(f"no credentials for role {self.role!r} from auth: {problem}")

    async def __call__(self) -> Credentials:
        return (await self.fetch()).as_tuple()

    def session(self) -> aioboto3.Session:
        """An aioboto3 Session that fetches on first use and again 15 min before expiry."""

        async def refresh() -> dict[str, str]:
            vended = await self.fetch()
            return {
                "access_key": vended.access_key,
                "secret_key": vended.secret_key,
                "token": vended.token,
                "expiry_time": vended.expiration.isoformat(),
            }

        credentials = AioDeferredRefreshableCredentials(refresh_using=refresh, method=METHOD)
        botocore_session = AioSession()
        botocore_session.register_component(
            "credential_provider", AioCredentialResolver([_Fixed(credentials)])
        )
        return aioboto3.Session(botocore_session=botocore_session)


class _Fixed:
    """A credential 'chain' of one: never env vars, files or instance metadata."""

    METHOD = CANONICAL_NAME = METHOD

    def __init__(self, credentials: AioDeferredRefreshableCredentials) -> None:
        self._credentials = credentials

    async def load(self) -> AioDeferredRefreshableCredentials:
        return self._credentials


def _client(
    verify: Any, timeout: float, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=verify, timeout=timeout, transport=transport)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise CredentialsError("auth answered with something that is not JSON") from None
    if not isinstance(body, dict):
        raise CredentialsError("auth answered with JSON that is not an object")
    return body


def _detail(response: httpx.Response) -> str:
    """auth's own error text (never a secret), shortened."""
    try:
        body = response.json()
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail)[:300] if detail else ""


def _parse(response: httpx.Response) -> VendedCredentials:
    body = _json(response)
    missing = [key for key in _CONTAINER_KEYS if not isinstance(body.get(key), str)]
    if missing:
        raise CredentialsError(f"auth's credentials lack {', '.join(missing)}")
    try:
        expiration = datetime.fromisoformat(body["Expiration"])
    except ValueError:
        raise CredentialsError("auth's Expiration is not an ISO 8601 time") from None
    if expiration.tzinfo is None:
        raise CredentialsError("auth's Expiration has no time zone")
    return VendedCredentials(
        access_key=body["AccessKeyId"],
        secret_key=body["SecretAccessKey"],
        token=body["Token"],
        expiration=expiration,
    )


@dataclass(frozen=True)
class AwsAccess:
    """How a service reaches AWS: a session (credentials from auth, or placeholders for a moto
    rehearsal) and the endpoint; or, with neither configured, why it cannot."""

    session: aioboto3.Session | None
    endpoint_url: str | None
    unavailable: str = ""


def service_aws_access(
    service: str,
    *,
    endpoint_url: object | None,
    auth_url: str | None,
    client_id: str,
    client_secret: str | None,
    role: str,
) -> AwsAccess:
    """A service's AWS access from its settings: temporary credentials vended by auth when
    `auth_url` is set (the only way in production), else a moto rehearsal at `endpoint_url`.
    A misconfiguration raises ConfigurationError naming the variable."""
    from shared.settings import ConfigurationError

    endpoint = str(endpoint_url).rstrip("/") if endpoint_url else None
    prefix = f"HPCFLEET_{service.upper()}_"
    if auth_url is not None:
        if client_secret is None:
            raise ConfigurationError(
                f"invalid configuration: {prefix}AUTH_CLIENT_SECRET: required with "
                f"{prefix}AUTH_URL (file:<path> or env:<NAME>)"
            )
        try:
            secret = read_secret(client_secret)
        except CredentialsError as exc:
            raise ConfigurationError(
                f"invalid configuration: {prefix}AUTH_CLIENT_SECRET: {exc}"
            ) from None
        token = ClientCredentialsToken(auth_url, client_id, secret)
        return AwsAccess(AuthCredentialProvider(auth_url, role, token).session(), endpoint)
    if endpoint is not None:  # a rehearsal: moto takes any key
        rehearsal = aioboto3.Session(
            aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal"
        )
        return AwsAccess(rehearsal, endpoint)
    return AwsAccess(
        None,
        None,
        f"AWS is not configured for {service}: set {prefix}AUTH_URL (credentials from auth) "
        "or HPCFLEET_AWS_ENDPOINT_URL (a moto rehearsal)",
    )
