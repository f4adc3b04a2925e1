"""`hpcfleet login`: AD FS sign-in (with MFA) from the operator's machine, the SAML exchanged at
auth over real HTTP, and the token kept in a private file."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jwt
import pytest
import typer
from auth_kit import ISSUER, USERS, Tls, serve
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from services.auth.adfs import MfaChallenge
from services.auth.devidp import DevIdp, DevIdpConfig, SigningKeyPair
from services.auth.login import (
    LoginError,
    default_token_path,
    login,
    login_command,
    logout_command,
    read_token,
)
from services.auth.service import assemble
from services.auth.settings import AuthSettings
from shared.api import create_app
from shared.clock import SystemClock
from shared.service import Runtime
from shared.settings import Settings
from shared.tokens import SecretRef, TokenVerifier, generate_signing_key

ALICE, CAROL, _, _ = USERS


@dataclass(frozen=True)
class Servers:
    adfs: str
    auth: str
    tls: Tls


@pytest.fixture(scope="module")
def servers(
    signing: SigningKeyPair, tls: Tls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("login")
    idp = DevIdp(DevIdpConfig(environment="development", users=USERS), signing, SystemClock())
    key = folder / "signing.pem"
    key.write_bytes(
        generate_signing_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert = folder / "adfs.crt"
    cert.write_bytes(signing.cert_pem)
    settings = AuthSettings(
        environment="production",
        adfs_url="https://adfs.example.test",
        adfs_signing_certificates=cert,
        adfs_issuer=ISSUER,
        signing_key=SecretRef.parse(f"file:{key}"),
    )
    runtime = Runtime.from_settings(Settings(database_url=f"sqlite+aiosqlite:///{folder}/a.db"))
    service, _ = assemble(runtime, settings)
    app = create_app(title="auth", routers=[service.router])
    with serve(idp.app, tls) as adfs_url, serve(app) as auth_url:
        yield Servers(adfs_url, auth_url, tls)


def verify(servers: Servers, token: str) -> set[str]:
    keys = httpx.get(f"{servers.auth}/auth/keys").json()["keys"]
    verifier = TokenVerifier([jwt.PyJWK(k).key for k in keys])
    return set(verifier.verify(token, datetime.now(UTC)).scopes)


async def test_login_keeps_a_private_token(servers: Servers, tmp_path: Path) -> None:
    path = tmp_path / "config" / "hpcfleet" / "token"

    result = await login(
        auth_url=servers.auth,
        adfs_url=servers.adfs,
        username=ALICE.username,
        password=ALICE.password,
        token_path=path,
        adfs_verify=servers.tls.client_context(),
    )

    token = path.read_text()
    assert token == token.strip()  # no newline: usable as AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "pool:write" in verify(servers, token) == set(result.scopes)
    assert read_token(path) == token
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temporary file left


async def test_login_answers_the_mfa_step(servers: Servers, tmp_path: Path) -> None:
    shown: list[MfaChallenge] = []

    async def code(challenge: MfaChallenge) -> str:
        shown.append(challenge)
        return CAROL.mfa_code or ""

    result = await login(
        auth_url=servers.auth,
        adfs_url=servers.adfs,
        username=CAROL.username,
        password=CAROL.password,
        token_path=tmp_path / "token",
        mfa=code,
        scope="pool:read",
        adfs_verify=servers.tls.client_context(),
    )

    assert result.scopes == ("pool:read",)
    assert [c.auth_method for c in shown] == ["SecurIDAuthentication"]


async def test_a_failed_login_says_why_and_writes_nothing(servers: Servers, tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(LoginError, match="Incorrect user ID or password"):
        await login(
            auth_url=servers.auth,
            adfs_url=servers.adfs,
            username=ALICE.username,
            password="not-her-password",
            token_path=path,
            adfs_verify=servers.tls.client_context(),
        )
    with pytest.raises(LoginError, match="must be https"):
        await login(
            auth_url="http://auth.example.com",
            adfs_url=servers.adfs,
            username=ALICE.username,
            password=ALICE.password,
            token_path=path,
        )
    with pytest.raises(LoginError, match="not granted to you: aws:pool"):
        await login(
            auth_url=servers.auth,
            adfs_url=servers.adfs,
            username=ALICE.username,
            password=ALICE.password,
            token_path=path,
            scope="aws:pool",
            adfs_verify=servers.tls.client_context(),
        )
    assert not path.exists()
    with pytest.raises(LoginError, match="run hpcfleet login"):
        read_token(path)


def test_the_token_lives_under_the_users_config_dir() -> None:
    assert default_token_path({"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/hpcfleet/token")
    assert default_token_path({}) == Path.home() / ".config" / "hpcfleet" / "token"


def test_the_cli_prompts_for_password_and_code(servers: Servers, tmp_path: Path) -> None:
    cli = typer.Typer()
    cli.command("login")(login_command)
    cli.command("logout")(logout_command)
    env = {
        "HPCFLEET_AUTH_URL": servers.auth,
        "HPCFLEET_ADFS_URL": servers.adfs,
        "HPCFLEET_TOKEN_FILE": str(tmp_path / "token"),
    }
    args = ["login", "--username", CAROL.username, "--ca-bundle", str(servers.tls.cert)]
    runner = CliRunner()

    done = runner.invoke(cli, args, input=f"{CAROL.password}\n{CAROL.mfa_code}\n", env=env)
    assert done.exit_code == 0, done.output
    assert "logged in until" in done.output
    assert CAROL.password not in done.output
    assert (tmp_path / "token").exists()

    refused = runner.invoke(cli, args, input="wrong\n", env=env)
    assert refused.exit_code == 1
    assert "Incorrect user ID or password" in refused.output

    out = runner.invoke(cli, ["logout"], env=env)
    assert out.exit_code == 0
    assert not (tmp_path / "token").exists()
