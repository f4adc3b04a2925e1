"""What ``hpcfleet slurm-resume`` / ``hpcfleet slurm-suspend`` do when Slurm calls them.

In the mode where Slurm decides, its ResumeProgram and SuspendProgram get a compressed host list
(``node[001-004]``) and must return quickly. They hand the expanded list to autogrow's REST API,
which acts on it (power the pool nodes on or off); autogrow also keeps polling the queue, so a
call that fails only delays it. Slurm runs these programs as SlurmUser with no PATH and only
``SLURM_CONF`` in the environment, so everything they need comes in as arguments.

With API auth on (production), the hook first gets a token from auth as the ``slurm`` client
(client-credentials grant; its only scope is ``autogrow:hook``) with the secret in
``--client-secret-file``, and keeps it in ``<secret file>.token`` (mode 0600) until a minute before
it expires, so most calls are one request. The hook path is latency-critical (a job waits on it),
so this module imports only the standard library and python-hostlist: run it as
``python -m services.autogrow.slurm_hooks`` from Slurm's wrapper script, which starts in a tenth of
the time the whole ``hpcfleet`` command takes. Of the standard library, only what every call needs
is imported up front (a socket rather than ``urllib.request`` or ``http.client``, which bring in
tempfile, compression modules and the email package; no dataclasses, which brings in inspect and
ast); what only a new
token needs is imported when one is fetched. ``python -X importtime -m
services.autogrow.slurm_hooks --help`` shows what it costs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from hostlist import BadHostlist, expand_hostlist

ACTIONS = ("resume", "suspend")
CLIENT_ID = "slurm"
TIMEOUT = 5.0
"""Seconds to wait for auth and for autogrow: Slurm's power-save thread waits for the hook."""
REFRESH_MARGIN = 60.0
"""A cached token is used only while it has more than this many seconds left."""


class HookError(Exception):
    """A failure, explained in one line; `status` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class ClientCredentials:
    """Where to get a token for the hook, and as whom."""

    __slots__ = ("auth_url", "client_id", "secret_file")

    def __init__(self, auth_url: str, secret_file: Path, client_id: str = CLIENT_ID) -> None:
        self.auth_url = auth_url
        self.secret_file = secret_file
        self.client_id = client_id


def hook_main(
    action: str,
    hostlist: str,
    autogrow_url: str,
    *,
    auth_url: str | None = None,
    client_secret_file: str | Path | None = None,
    client_id: str = CLIENT_ID,
    clock: Callable[[], float] = time.time,
) -> int:
    """POST the nodes of `hostlist` to ``{autogrow_url}/autogrow/hooks/{action}``, with a token
    from auth when `auth_url` and `client_secret_file` are given (both, or neither for an API with
    auth disabled).

    Returns the exit status: 0 when autogrow took the list, 1 when auth or autogrow could not be
    reached or refused, 2 for bad arguments; failures are explained in one line on stderr (Slurm
    logs it).
    """
    program = f"hpcfleet slurm-{action}"
    try:
        if action not in ACTIONS:
            raise HookError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}", 2)
        nodes = _expand(hostlist)
        if (auth_url is None) != (client_secret_file is None):
            raise HookError(
                "give both --auth-url and --client-secret-file (API auth on), or neither", 2
            )
        credentials = None
        if auth_url is not None and client_secret_file is not None:
            credentials = ClientCredentials(auth_url, Path(client_secret_file), client_id)
        _post_hook(action, nodes, autogrow_url, credentials, clock)
    except HookError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.status
    return 0


def _expand(hostlist: str) -> list[str]:
    try:
        nodes: list[str] = expand_hostlist(hostlist)
    except BadHostlist as exc:
        raise HookError(f"bad host list {hostlist!r}: {exc}", 2) from None
    if not nodes:
        raise HookError("empty host list", 2)
    return nodes


def _post_hook(
    action: str,
    nodes: list[str],
    autogrow_url: str,
    credentials: ClientCredentials | None,
    clock: Callable[[], float],
) -> None:
    url = f"{autogrow_url.rstrip('/')}/autogrow/hooks/{action}"
    body = json.dumps({"nodes": nodes}).encode()
    headers = {"Content-Type": "application/json"}
    if credentials is None:
        status, answer = _post(url, body, headers, "autogrow")
    else:
        secret = _read_secret(credentials.secret_file)
        token, cached = _token(credentials, secret, clock)
        headers["Authorization"] = f"Bearer {token}"
        status, answer = _post(url, body, headers, "autogrow")
        if status == 401 and cached:  # e.g. auth's key was rotated: one fresh token, one retry
            _forget(credentials)
            token, _ = _token(credentials, secret, clock)
            headers["Authorization"] = f"Bearer {token}"
            status, answer = _post(url, body, headers, "autogrow")
    if not 200 <= status < 300:
        raise HookError(f"autogrow answered {status} to {url}: {_one_line(answer)}")


# ---- the token ----------------------------------------------------------------------------------


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise HookError(f"cannot read the client secret file {path}: {exc.strerror}", 2) from None
    if not secret:
        raise HookError(f"the client secret file {path} is empty", 2)
    return secret


def cache_path(secret_file: Path) -> Path:
    """Where the token is kept: next to the secret, which only SlurmUser may read."""
    return secret_file.with_name(f"{secret_file.name}.token")


def _fingerprint(credentials: ClientCredentials, secret: str) -> str:
    """Ties a cached token to the auth, the client and the secret it was got with, so that a
    changed secret or auth is never answered from the cache (the secret itself is not stored)."""
    material = f"{credentials.auth_url.rstrip('/')}\n{credentials.client_id}\n{secret}"
    return hashlib.sha256(material.encode()).hexdigest()


def _token(
    credentials: ClientCredentials, secret: str, clock: Callable[[], float]
) -> tuple[str, bool]:
    """A token for the hook routes, and whether it came from the cache."""
    fingerprint = _fingerprint(credentials, secret)
    now = clock()
    cached = _cached_token(cache_path(credentials.secret_file), fingerprint, now)
    if cached is not None:
        return cached, True
    token, expires_in = _fetch_token(credentials, secret)
    _store_token(cache_path(credentials.secret_file), fingerprint, token, now + expires_in)
    return token, False


def _cached_token(path: Path, fingerprint: str, now: float) -> str | None:
    """The cached token if it is ours, for these credentials and not about to expire."""
    try:
        with path.open(encoding="utf-8") as file:
            if os.fstat(file.fileno()).st_uid != os.geteuid():
                return None
            entry = json.load(file)
        token, expires_at = entry["access_token"], float(entry["expires_at"])
        if entry["fingerprint"] != fingerprint or not isinstance(token, str):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return token if expires_at - now > REFRESH_MARGIN else None


def _store_token(path: Path, fingerprint: str, token: str, expires_at: float) -> None:
    """Write the cache atomically with mode 0600; a directory we may not write means no cache."""
    import tempfile  # once per token, not per call

    entry = {"fingerprint": fingerprint, "access_token": token, "expires_at": expires_at}
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError:
        return
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:  # mkstemp: mode 0600
            json.dump(entry, file)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _forget(credentials: ClientCredentials) -> None:
    with contextlib.suppress(OSError):
        cache_path(credentials.secret_file).unlink()


def _fetch_token(credentials: ClientCredentials, secret: str) -> tuple[str, float]:
    """A fresh token from auth's client-credentials grant, and its lifetime in seconds."""
    import base64  # once per token, not per call
    from urllib.parse import urlencode

    url = f"{credentials.auth_url.rstrip('/')}/auth/token"
    basic = base64.b64encode(f"{credentials.client_id}:{secret}".encode()).decode()
    body = urlencode({"grant_type": "client_credentials"}).encode()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": f"Basic {basic}",
    }
    status, answer = _post(url, body, headers, "auth")
    try:
        data = json.loads(answer)
    except ValueError:
        data = None
    if status != 200:
        detail = _one_line(answer)
        if isinstance(data, dict) and "error" in data:
            detail = f"{data['error']}: {data.get('error_description', '')}".rstrip(": ")
        raise HookError(
            f"auth at {url} refused client {credentials.client_id!r}: {status} {detail}"
        )
    try:
        return str(data["access_token"]), float(data["expires_in"])
    except (TypeError, KeyError, ValueError):
        raise HookError(f"auth at {url} answered without a token: {_one_line(answer)}") from None


# ---- HTTP ---------------------------------------------------------------------------------------


def _post(url: str, body: bytes, headers: dict[str, str], what: str) -> tuple[int, bytes]:
    """POST and return the status and body; an unreachable server is a `HookError`.

    Plain HTTP/1.0 on a socket rather than `http.client`, whose imports (the email package) cost
    each call ~40 ms, a fifth of the hook's time. HTTP/1.0 keeps it small and exact: the server
    ends its answer by closing the connection (no keep-alive, no chunked body to decode)."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HookError(f"could not reach {what} at {url}: not an http(s) URL")
    fields = {"Host": parts.netloc, "Content-Length": str(len(body)), **headers}
    if any("\r" in value or "\n" in value for value in fields.values()):
        raise HookError(f"could not call {what} at {url}: a header holds a line break")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"POST {target} HTTP/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    try:
        port = parts.port or (443 if secure else 80)
        with socket.create_connection((parts.hostname, port), timeout=TIMEOUT) as raw:
            connection: socket.socket = raw
            if secure:
                import ssl  # only for https

                context = ssl.create_default_context()
                connection = context.wrap_socket(raw, server_hostname=parts.hostname)
            connection.sendall(request.encode("latin-1") + b"\r\n" + body)
            received: list[bytes] = []
            while chunk := connection.recv(65536):
                received.append(chunk)
    except (OSError, ValueError) as exc:  # ValueError: a port out of range, a bad host name
        reason = (
            str(exc) if getattr(exc, "errno", None) is not None else f"{type(exc).__name__}: {exc}"
        )
        raise HookError(f"could not reach {what} at {url}: {reason}") from None
    answer = b"".join(received)
    head, ended, payload = answer.partition(b"\r\n\r\n")
    version, _, status = head.split(b"\r\n", 1)[0].partition(b" ")
    code = status[:3]
    if not (ended and version.startswith(b"HTTP/") and code.isdigit()):
        raise HookError(f"could not reach {what} at {url}: not an HTTP answer: {answer[:80]!r}")
    return int(code), payload


def _one_line(answer: bytes) -> str:
    return answer.decode("utf-8", "replace").strip().replace("\n", " ")[:300]


# ---- the fast entry point -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.autogrow.slurm_hooks {resume,suspend} HOSTLIST --autogrow-url URL
    [--auth-url URL --client-secret-file PATH]``: what Slurm's wrapper script runs."""
    parser = argparse.ArgumentParser(
        prog="python -m services.autogrow.slurm_hooks",
        description="Slurm's ResumeProgram / SuspendProgram: hand the nodes to autogrow.",
    )
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("hostlist", help="Slurm host list, e.g. node[001-004]")
    parser.add_argument("--autogrow-url", required=True, help="autogrow's API")
    parser.add_argument("--auth-url", help="auth's API, for a token (API auth on)")
    parser.add_argument("--client-secret-file", help="the slurm client's secret")
    parser.add_argument("--client-id", default=CLIENT_ID, help="auth client id")
    args = parser.parse_args(argv)
    return hook_main(
        args.action,
        args.hostlist,
        args.autogrow_url,
        auth_url=args.auth_url,
        client_secret_file=args.client_secret_file,
        client_id=args.client_id,
    )


if __name__ == "__main__":
    sys.exit(main())
