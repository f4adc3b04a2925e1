"""The STS broker end to end: dev IdP over HTTPS → signed SAML → moto's AssumeRoleWithSAML."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aioboto3
import pytest
from auth_kit import ACCOUNT, PROVIDER, Tls, eventually, role_arn, serve

from services.auth.adfs import AdfsClient
from services.auth.broker import (
    CredentialsUnavailable,
    RoleBinding,
    RoleStatus,
    ServiceAccount,
    StsBroker,
    UnknownRole,
)
from services.auth.devidp import DevIdp, DevUser, role_value
from services.auth.saml import SamlTrust
from shared.clock import ManualClock
from shared.cloud.moto_server import MotoServer
from shared.tokens import SecretRef

SERVICES = ("bakery", "pool", "autogrow", "operator")
# One AD FS service account per role: least privilege, and moto fails on multi-role assertions.
USERS = tuple(
    DevUser(
        f"svc-{name}@example.test",
        f"{name}-Passw0rd-{i}",
        roles=(role_value(role_arn(name), PROVIDER),),
    )
    for i, name in enumerate(SERVICES)
)


@dataclass
class Stack:
    idp: DevIdp
    broker: StsBroker
    password_files: dict[str, Path]
    responses: list[str]

    def status(self, role: str) -> RoleStatus:
        return next(s for s in self.broker.status() if s.name == role)


@pytest.fixture
async def stack(
    make_idp: Callable[..., DevIdp],
    tls: Tls,
    trust: SamlTrust,
    clock: ManualClock,
    moto: MotoServer,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    # An AD FS session shorter than the refresh period, so refreshing needs the password again.
    idp = make_idp(users=USERS, sso_lifetime=timedelta(minutes=10))
    responses: list[str] = []
    issue = idp.issue_response

    def counted(user: DevUser) -> str:
        responses.append(issue(user))
        return responses[-1]

    idp.issue_response = counted  # type: ignore[method-assign]
    files = {}
    for name, user in zip(SERVICES, USERS, strict=True):
        files[name] = tmp_path / f"{name}.password"
        files[name].write_text(user.password + "\n")  # as `echo` writes it
    with serve(idp.app, tls) as url:
        bindings = [
            RoleBinding(
                name=name,
                role_arn=role_arn(name),
                principal_arn=PROVIDER,
                account=ServiceAccount(user.username, SecretRef.parse(f"file:{files[name]}")),
            )
            for name, user in zip(SERVICES, USERS, strict=True)
        ]
        broker = StsBroker(
            bindings,
            adfs_client=lambda: AdfsClient(url, verify=tls.client_context()),
            trust=trust,
            clock=clock,
            sts_endpoint_url=moto.endpoint,
        )
        async with broker:
            await eventually(broker.ready)
            yield Stack(idp, broker, files, responses)


async def test_every_role_gets_working_credentials(stack: Stack, moto: MotoServer) -> None:
    assert len(stack.responses) == len(SERVICES)  # one sign-in per service account
    session = aioboto3.Session()
    for name, user in zip(SERVICES, USERS, strict=True):
        credentials = stack.broker.credentials(name)
        async with session.client(
            "sts",
            endpoint_url=moto.endpoint,
            region_name="us-east-1",
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token,
        ) as sts:
            identity = await sts.get_caller_identity()
        assert identity["Arn"] == (
            f"arn:aws:sts::{ACCOUNT}:assumed-role/hpcfleet-{name}/{user.username}"
        )
        assert credentials.account_id == ACCOUNT
    with pytest.raises(UnknownRole, match="'admin'"):
        stack.broker.credentials("admin")


async def test_credentials_are_refreshed_before_expiry_with_a_new_sign_in(
    stack: Stack, clock: ManualClock
) -> None:
    before = stack.broker.credentials("pool")

    clock.advance(31 * 60)  # the refresh point: 30 min before expiry
    assert stack.broker.credentials("pool") == before  # still 29 min left: served meanwhile

    await eventually(lambda: stack.broker.credentials("pool") != before)
    assert stack.broker.credentials("pool").access_key_id != before.access_key_id
    await eventually(lambda: len(stack.responses) == 2 * len(SERVICES))  # assertions lapsed
    assert all(s.failures == 0 and s.ready for s in stack.broker.status())


async def test_a_failed_refresh_is_retried_with_backoff(stack: Stack, clock: ManualClock) -> None:
    before = stack.broker.credentials("pool")
    password = stack.password_files["pool"].read_text()
    stack.password_files["pool"].write_text("rotated-wrongly")

    clock.advance(31 * 60)
    await eventually(lambda: stack.status("pool").failures == 1)
    assert "Incorrect user ID or password" in (stack.status("pool").last_error or "")

    stack.password_files["pool"].write_text(password)
    clock.advance(5)  # the first retry
    await eventually(lambda: stack.status("pool").failures == 0)
    assert stack.broker.credentials("pool").access_key_id != before.access_key_id


async def test_credentials_too_close_to_expiry_are_never_handed_out(
    stack: Stack, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # These log request bodies, canonicalised assertions or Set-Cookie headers at DEBUG: the
    # process's logging setup must keep them at WARNING, as it does botocore.
    for chatty in ("botocore", "aiobotocore", "signxml", "httpcore"):
        caplog.set_level(logging.WARNING, logger=chatty)
    first = {name: stack.broker.credentials(name) for name in SERVICES}
    stack.password_files["pool"].write_text("rotated-wrongly")

    clock.advance(31 * 60)
    await eventually(lambda: stack.status("pool").failures == 1)
    others = [name for name in SERVICES if name != "pool"]
    await eventually(lambda: all(stack.broker.credentials(n) != first[n] for n in others))
    refreshed = [stack.broker.credentials(name) for name in others]
    assert stack.broker.credentials("pool") == first["pool"]  # 29 min left: still served
    clock.advance(10 * 60)  # 19 min left: under the 20 min floor

    with pytest.raises(CredentialsUnavailable, match="Incorrect user ID or password"):
        stack.broker.credentials("pool")
    assert not stack.status("pool").ready
    assert "refreshing credentials for role pool failed" in caplog.text
    secrets = [u.password for u in USERS] + ["rotated-wrongly", *stack.responses]
    for credentials in [*first.values(), *refreshed]:
        secrets += [credentials.secret_access_key, credentials.session_token]
    assert [s[:12] for s in secrets if s in caplog.text] == []
