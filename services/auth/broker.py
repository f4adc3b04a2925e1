"""The STS broker: AD FS sign-in → SAML → AssumeRoleWithSAML → cached, pre-refreshed credentials.

Each service role (bakery, pool, autogrow, operator ...) is bound to an AD FS service account. The
broker signs in, verifies the assertion, calls STS for every role, keeps the credentials in memory
and refreshes each role in the background well before expiry. Handing out credentials is a
synchronous read of that cache, because botocore's container provider gives the endpoint 2 s and
an AD FS round trip can take longer; credentials with less than `min_remaining` left are never
handed out, since botocore would then re-fetch them on every API call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import aioboto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.auth.adfs import AdfsClient
from services.auth.saml import SamlAssertion, SamlRoleError, SamlTrust, verify_response
from shared.clock import Clock
from shared.tokens import SecretRef

log = logging.getLogger(__name__)

# STS codes that mean "this assertion is no good any more": sign in again and retry once.
_STALE_ASSERTION_CODES = frozenset({"ExpiredTokenException", "InvalidIdentityToken"})


class BrokerError(Exception):
    """Credentials could not be obtained or handed out; never carries a secret."""


class UnknownRole(BrokerError):
    """No role of that name is configured."""


class CredentialsUnavailable(BrokerError):
    """The role has no credentials with enough time left (yet, or since refreshing failed)."""


class StsRefused(BrokerError):
    """STS refused AssumeRoleWithSAML, or returned credentials too short-lived to hand out."""


@dataclass(frozen=True)
class ServiceAccount:
    """An AD FS identity; its password is a reference, read at each sign-in (rotation-safe)."""

    username: str
    password: SecretRef


@dataclass(frozen=True)
class RoleBinding:
    """A service role and the account whose assertion grants it."""

    name: str
    role_arn: str
    principal_arn: str
    account: ServiceAccount
    duration_seconds: int = 3600

    def __post_init__(self) -> None:
        if not 900 <= self.duration_seconds <= 43200:
            raise ValueError(f"{self.name}: duration_seconds must be within 900-43200")


@dataclass(frozen=True)
class RefreshPolicy:
    """When to refresh and what may be handed out (botocore refreshes 15 min before expiry)."""

    refresh_before: timedelta = timedelta(minutes=30)
    min_remaining: timedelta = timedelta(minutes=20)
    min_interval: timedelta = timedelta(minutes=1)
    retry_first: timedelta = timedelta(seconds=5)
    retry_max: timedelta = timedelta(minutes=2)
    assertion_margin: timedelta = timedelta(seconds=60)

    def __post_init__(self) -> None:
        if self.refresh_before <= self.min_remaining:
            raise ValueError("refresh_before must exceed min_remaining, or refreshes come too late")


@dataclass(frozen=True)
class AwsCredentials:
    """Temporary credentials for one role."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime
    account_id: str | None = None

    def container_json(self) -> dict[str, str]:
        """The body of the AWS container-credentials endpoint, as botocore's provider reads it."""
        body = {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            "Expiration": self.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if self.account_id:
            body["AccountId"] = self.account_id
        return body


def can_hand_out(credentials: AwsCredentials | None, now: datetime, policy: RefreshPolicy) -> bool:
    """Enough time left that the consumer's SDK will not start refreshing at once."""
    return credentials is not None and credentials.expiration - now >= policy.min_remaining


def refresh_due(credentials: AwsCredentials | None, now: datetime, policy: RefreshPolicy) -> bool:
    return credentials is None or credentials.expiration - now <= policy.refresh_before


def next_refresh_delay(
    credentials: AwsCredentials | None,
    fetched_at: datetime | None,
    failures: int,
    now: datetime,
    policy: RefreshPolicy,
) -> float:
    """Seconds until the next attempt: at `refresh_before`, backing off after failures, and never
    sooner than `min_interval` after the last fetch (STS must not be hammered when it returns
    short-lived credentials)."""
    if failures > 0:
        backoff = policy.retry_first * (2 ** min(failures - 1, 16))
        return min(backoff, policy.retry_max).total_seconds()
    if credentials is None:
        return 0.0
    due = credentials.expiration - policy.refresh_before
    if fetched_at is not None:
        due = max(due, fetched_at + policy.min_interval)
    return max(0.0, (due - now).total_seconds())


@dataclass(frozen=True)
class RoleStatus:
    """What readiness and the operator see about one role (no secrets)."""

    name: str
    expiration: datetime | None
    ready: bool
    failures: int
    last_error: str | None


@dataclass
class _RoleState:
    binding: RoleBinding
    credentials: AwsCredentials | None = None
    fetched_at: datetime | None = None
    failures: int = 0
    last_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _AccountState:
    client: AdfsClient
    assertion: SamlAssertion | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class StsBroker:
    """Keeps every configured role's credentials fresh; `credentials(role)` serves from memory."""

    def __init__(
        self,
        bindings: Sequence[RoleBinding],
        *,
        adfs_client: Callable[[], AdfsClient],
        trust: SamlTrust,
        clock: Clock,
        sts_endpoint_url: str | None = None,
        region: str = "us-east-1",
        policy: RefreshPolicy | None = None,
        session: aioboto3.Session | None = None,
    ) -> None:
        """`adfs_client` makes one client per service account (each keeps its own cookies)."""
        names = [b.name for b in bindings]
        if len(set(names)) != len(names):
            raise ValueError("role names must be unique")
        self._roles = {b.name: _RoleState(b) for b in bindings}
        self._accounts = {b.account: _AccountState(adfs_client()) for b in bindings}
        self._trust = trust
        self._clock = clock
        self._policy = policy or RefreshPolicy()
        self._sts_endpoint_url = sts_endpoint_url
        self._region = region
        self._session = session or aioboto3.Session()
        self._stack = AsyncExitStack()
        self._sts: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the STS client and start one refresh loop per role; returns without waiting."""
        self._sts = await self._stack.enter_async_context(
            self._session.client(
                "sts",
                endpoint_url=self._sts_endpoint_url,
                region_name=self._region,
                # AssumeRoleWithSAML needs no AWS credentials; unsigned also stops botocore from
                # searching a credential chain that could lead back to this very broker.
                config=Config(
                    signature_version=UNSIGNED,
                    retries={"mode": "standard", "total_max_attempts": 3},
                    connect_timeout=5,
                    read_timeout=15,
                ),
            )
        )
        self._tasks = [
            asyncio.create_task(self._keep_fresh(state), name=f"sts-refresh-{name}")
            for name, state in self._roles.items()
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for account in self._accounts.values():
            await account.client.aclose()
        await self._stack.aclose()

    def credentials(self, role: str) -> AwsCredentials:
        """Cached credentials with at least `min_remaining` left; never does I/O."""
        state = self._state(role)
        credentials = state.credentials
        if credentials is None or not can_hand_out(credentials, self._clock.now(), self._policy):
            reason = f" (last error: {state.last_error})" if state.last_error else ""
            raise CredentialsUnavailable(f"no fresh credentials for role {role!r}{reason}")
        return credentials

    def status(self) -> list[RoleStatus]:
        now = self._clock.now()
        return [
            RoleStatus(
                name=name,
                expiration=s.credentials.expiration if s.credentials else None,
                ready=can_hand_out(s.credentials, now, self._policy),
                failures=s.failures,
                last_error=s.last_error,
            )
            for name, s in self._roles.items()
        ]

    def ready(self) -> bool:
        return all(status.ready for status in self.status())

    async def refresh(self, role: str) -> AwsCredentials:
        """Fetch new credentials for `role` now (the background loops call this)."""
        state = self._state(role)
        async with state.lock:
            try:
                credentials = await self._fetch(state.binding)
            except Exception as exc:
                state.failures += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                raise
            state.credentials = credentials
            state.fetched_at = self._clock.now()
            state.failures = 0
            state.last_error = None
            return credentials

    def _state(self, role: str) -> _RoleState:
        try:
            return self._roles[role]
        except KeyError:
            raise UnknownRole(f"no role named {role!r} is configured") from None

    async def _keep_fresh(self, state: _RoleState) -> None:
        while True:
            delay = next_refresh_delay(
                state.credentials, state.fetched_at, state.failures, self._clock.now(), self._policy
            )
            await self._clock.sleep(delay)
            try:
                credentials = await self.refresh(state.binding.name)
            except Exception:
                log.warning(
                    "refreshing credentials for role %s failed (%d in a row): %s",
                    state.binding.name,
                    state.failures,
                    state.last_error,
                )
            else:
                log.info(
                    "credentials for role %s refreshed, valid until %s",
                    state.binding.name,
                    credentials.expiration.isoformat(),
                )

    async def _fetch(self, binding: RoleBinding) -> AwsCredentials:
        assertion = await self._assertion(binding.account, fresh=False)
        try:
            return await self._assume(binding, assertion)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _STALE_ASSERTION_CODES:
                raise _sts_refused(binding, exc) from None
        assertion = await self._assertion(binding.account, fresh=True)
        try:
            return await self._assume(binding, assertion)
        except ClientError as exc:
            raise _sts_refused(binding, exc) from None

    async def _assertion(self, account: ServiceAccount, *, fresh: bool) -> SamlAssertion:
        """A verified assertion for `account`, reused while it has `assertion_margin` left."""
        state = self._accounts[account]
        async with state.lock:
            now = self._clock.now()
            cached = state.assertion
            if (
                not fresh
                and cached is not None
                and cached.not_on_or_after - now > self._policy.assertion_margin
            ):
                return cached
            password = await asyncio.to_thread(account.password.read)
            response = await state.client.sign_in(account.username, password)
            state.assertion = verify_response(response, self._trust, self._clock.now())
            return state.assertion

    async def _assume(self, binding: RoleBinding, assertion: SamlAssertion) -> AwsCredentials:
        granted = assertion.role(binding.role_arn)
        if granted.principal_arn != binding.principal_arn:
            raise SamlRoleError(
                f"{binding.role_arn} is granted through {granted.principal_arn}, "
                f"not the configured {binding.principal_arn}"
            )
        try:
            answer = await self._sts.assume_role_with_saml(
                RoleArn=binding.role_arn,
                PrincipalArn=binding.principal_arn,
                SAMLAssertion=assertion.response,
                DurationSeconds=binding.duration_seconds,
            )
        except BotoCoreError as exc:
            raise StsRefused(f"cannot reach STS for role {binding.name!r}: {exc}") from None
        raw = answer["Credentials"]
        credentials = AwsCredentials(
            access_key_id=raw["AccessKeyId"],
            secret_access_key=raw["SecretAccessKey"],
            session_token=raw["SessionToken"],
            expiration=raw["Expiration"],
            account_id=_account_id(answer.get("AssumedRoleUser", {}).get("Arn", "")),
        )
        if not can_hand_out(credentials, self._clock.now(), self._policy):
            raise StsRefused(
                f"STS returned credentials for role {binding.name!r} that expire at "
                f"{credentials.expiration.isoformat()}, too soon to hand out: raise the role's "
                "DurationSeconds or the assertion's SessionDuration"
            )
        return credentials


def _sts_refused(binding: RoleBinding, exc: ClientError) -> StsRefused:
    error = exc.response.get("Error", {})
    return StsRefused(
        f"STS refused AssumeRoleWithSAML for role {binding.name!r}: "
        f"{error.get('Code', '?')}: {error.get('Message', '')}"
    )


def _account_id(arn: str) -> str | None:
    """The account of an ARN (`arn:aws:sts::123456789012:assumed-role/...`)."""
    parts = arn.split(":")
    return parts[4] or None if len(parts) > 5 else None
