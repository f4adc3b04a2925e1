"""`hpcfleet login`: an operator signs in to AD FS and keeps an hpcfleet token in a private file.

The operator's password and one-time code go only to AD FS, from this process, exactly as a
browser would send them; auth receives the signed SAML response AD FS returns and exchanges it
(once) for a short-lived token scoped by the operator's AD FS roles. The token is written to
`$XDG_CONFIG_HOME/hpcfleet/token` (mode 0600, directory 0700, no trailing newline, so it also
works as an `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import typer

from services.auth.adfs import AdfsClient, AdfsError, CodeProvider, MfaChallenge
from services.auth.saml import AWS_RELYING_PARTY

SAML2_BEARER = "urn:ietf:params:oauth:grant-type:saml2-bearer"


class LoginError(Exception):
    """The sign-in or the token exchange failed; the message never holds a secret."""


@dataclass(frozen=True)
class LoginResult:
    token_path: Path
    scopes: tuple[str, ...]
    expires_at: datetime


def default_token_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/hpcfleet/token`, else `~/.config/hpcfleet/token`."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hpcfleet" / "token"


def save_token(path: Path, token: str) -> None:
    """Write atomically with mode 0600 (never readable by others, even for an instant)."""
    if not token or any(c in token for c in "\r\n"):
        raise LoginError("refusing to save an empty or multi-line token")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".token-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(token)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_token(path: Path) -> str:
    """The saved token, or a LoginError that says to log in."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise LoginError(f"not logged in ({path} does not exist): run hpcfleet login") from None
    if not token:
        raise LoginError(f"{path} is empty: run hpcfleet login")
    return token


def _check_transport(url: str) -> None:
    """A SAML response is a bearer credential: send it over TLS, or to this machine only."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if parts.scheme != "http" or not loopback:
        raise LoginError(f"{url} must be https (plain http only to this machine)")


async def login(
    *,
    auth_url: str,
    adfs_url: str,
    username: str,
    password: str,
    token_path: Path,
    mfa: CodeProvider | None = None,
    scope: str | None = None,
    relying_party: str = AWS_RELYING_PARTY,
    adfs_verify: ssl.SSLContext | bool = True,
    auth_verify: ssl.SSLContext | bool = True,
    auth_transport: httpx.AsyncBaseTransport | None = None,
) -> LoginResult:
    """Sign in to AD FS, exchange the SAML response at auth, save the token."""
    _check_transport(auth_url)
    try:
        async with AdfsClient(
            adfs_url, relying_party=relying_party, verify=adfs_verify, mfa=mfa
        ) as adfs:
            saml_response = await adfs.sign_in(username, password)
    except AdfsError as exc:
        raise LoginError(str(exc)) from None
    form: dict[str, str] = {"grant_type": SAML2_BEARER, "assertion": saml_response}
    if scope:
        form["scope"] = scope
    try:
        async with httpx.AsyncClient(
            verify=auth_verify, timeout=30.0, transport=auth_transport
        ) as http:
            response = await http.post(f"{auth_url.rstrip('/')}/auth/token", data=form)
    except httpx.HTTPError as exc:
        raise LoginError(f"cannot reach auth at {auth_url}: {type(exc).__name__}") from None
    body = _body(response)
    if response.status_code != 200:
        reason = body.get("error_description") or body.get("detail") or "no reason given"
        raise LoginError(f"auth refused the sign-in (HTTP {response.status_code}): {reason}")
    token, expires_in = body.get("access_token"), body.get("expires_in")
    if not isinstance(token, str) or not isinstance(expires_in, int):
        raise LoginError("auth's answer lacks access_token or expires_in")
    await asyncio.to_thread(save_token, token_path, token)
    return LoginResult(
        token_path=token_path,
        scopes=tuple(str(body.get("scope", "")).split()),
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _tls(ca_bundle: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca_bundle)) if ca_bundle else True


async def _prompt_code(challenge: MfaChallenge) -> str:
    """Ask the operator for the one-time code AD FS wants (in a thread: typer blocks)."""
    if challenge.error:
        typer.echo(f"AD FS: {challenge.error}", err=True)
    label = challenge.instructions or f"One-time code ({challenge.auth_method})"
    code: str = await asyncio.to_thread(typer.prompt, label)
    return code.strip()


def login_command(
    auth_url: str = typer.Option(
        ..., envvar="HPCFLEET_AUTH_URL", help="The auth service, e.g. https://hpcfleet.example.com"
    ),
    adfs_url: str = typer.Option(
        ..., envvar="HPCFLEET_ADFS_URL", help="AD FS, e.g. https://adfs.example.com"
    ),
    username: str = typer.Option(
        ..., envvar="HPCFLEET_USERNAME", prompt="AD FS user (DOMAIN\\user or UPN)"
    ),
    token_file: Path | None = typer.Option(
        None,
        envvar="HPCFLEET_TOKEN_FILE",
        help="Where to keep the token [~/.config/hpcfleet/token]",
    ),
    ca_bundle: Path | None = typer.Option(
        None, help="PEM CA bundle for AD FS's and auth's TLS (else the system's)."
    ),
    scope: str | None = typer.Option(None, help="Ask for fewer scopes (space-separated)."),
) -> None:
    """Sign in with your AD FS account (and MFA code) and keep an hpcfleet token."""
    password = typer.prompt("AD FS password", hide_input=True)
    path = token_file or default_token_path()
    tls = _tls(ca_bundle)
    try:
        result = asyncio.run(
            login(
                auth_url=auth_url,
                adfs_url=adfs_url,
                username=username,
                password=password,
                token_path=path,
                mfa=_prompt_code,
                scope=scope,
                adfs_verify=tls,
                auth_verify=tls,
            )
        )
    except LoginError as exc:
        typer.echo(f"hpcfleet login: {exc}", err=True)
        raise typer.Exit(1) from None
    until = result.expires_at.astimezone().strftime("%H:%M")
    typer.echo(f"logged in until {until}; scopes: {' '.join(result.scopes)}; token in {path}")


def logout_command(
    token_file: Path | None = typer.Option(None, envvar="HPCFLEET_TOKEN_FILE"),
) -> None:
    """Forget the saved token."""
    path = token_file or default_token_path()
    path.unlink(missing_ok=True)
    typer.echo(f"logged out ({path} removed)")
