"""`hook_main`, what Slurm's ResumeProgram / SuspendProgram run, with API auth on: a real auth
service issues the `slurm` client's token, and autogrow's real hook routes check it."""

from __future__ import annotations

import json
import logging
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from slurm_kit import HookServer
from tests_support import free_port
from typer.testing import CliRunner

from services.autogrow.slurm_hooks import HookError, _fingerprint, _post, cache_path, hook_main
from services.cli import app as cli


@pytest.fixture
def hooks(hook_server: HookServer) -> HookServer:
    hook_server.calls.clear()
    hook_server.unknown = set()
    hook_server.on_call = None
    cache_path(hook_server.auth.secret_files["slurm"]).unlink(missing_ok=True)
    return hook_server


@pytest.fixture
def secret(hooks: HookServer) -> Path:
    return hooks.auth.secret_files["slurm"]


def tokens_issued(caplog: pytest.LogCaptureFixture) -> int:
    return sum("issued a token to slurm" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("action", ["resume", "suspend"])
def test_the_expanded_host_list_is_posted_with_the_slurm_clients_token(
    hooks: HookServer, secret: Path, action: str
) -> None:
    status = hook_main(
        action,
        "node[001-003],gpu07",
        hooks.url + "/",
        auth_url=hooks.auth.url + "/",
        client_secret_file=secret,
    )

    assert status == 0
    assert hooks.calls == [
        (f"/autogrow/hooks/{action}", ["node001", "node002", "node003", "gpu07"])
    ]


def test_the_token_is_kept_next_to_the_secret_until_shortly_before_it_expires(
    hooks: HookServer, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.auth.api")
    auth = hooks.auth.url

    def run(at: float) -> int:
        return hook_main(
            "resume",
            "node001",
            hooks.url,
            auth_url=auth,
            client_secret_file=secret,
            clock=lambda: at,
        )

    now = time.time()
    assert run(now) == 0
    cache = cache_path(secret)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert secret.read_text().strip() not in cache.read_text()
    assert run(now + 10) == 0
    assert tokens_issued(caplog) == 1, "the second call used the cached token"
    assert run(now + 900 - 59) == 0  # a minute before the 15-minute token expires: a new one
    assert tokens_issued(caplog) == 2
    assert len(hooks.calls) == 3


def test_a_cached_token_autogrow_refuses_is_replaced_once(
    hooks: HookServer, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.auth.api")
    from services.autogrow.slurm_hooks import ClientCredentials

    fingerprint = _fingerprint(
        ClientCredentials(hooks.auth.url, secret), secret.read_text().strip()
    )
    entry = {"fingerprint": fingerprint, "access_token": "forged", "expires_at": time.time() + 600}
    cache_path(secret).write_text(json.dumps(entry))

    status = hook_main(
        "suspend", "node002", hooks.url, auth_url=hooks.auth.url, client_secret_file=secret
    )

    assert status == 0
    assert tokens_issued(caplog) == 1
    assert hooks.calls == [("/autogrow/hooks/suspend", ["node002"])]
    assert "forged" not in cache_path(secret).read_text()


def test_a_wrong_secret_fails_with_a_clear_message(
    hooks: HookServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "slurm.secret"
    wrong.write_text("not-the-secret\n")

    status = hook_main(
        "resume", "node001", hooks.url, auth_url=hooks.auth.url, client_secret_file=wrong
    )

    assert status == 1
    assert capsys.readouterr().err == (
        f"hpcfleet slurm-resume: auth at {hooks.auth.url}/auth/token refused client 'slurm': "
        "401 invalid_client: unknown client or wrong secret\n"
    )
    assert hooks.calls == []
    assert not cache_path(wrong).exists()


def test_without_a_token_autogrow_refuses(
    hooks: HookServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hook_main("resume", "node001", hooks.url) == 1

    assert capsys.readouterr().err.startswith(
        f"hpcfleet slurm-resume: autogrow answered 401 to {hooks.url}/autogrow/hooks/resume: "
        '{"detail":"a bearer token is required'
    )
    assert hooks.calls == []


def test_the_slurm_clients_token_calls_the_hooks_and_nothing_else(
    hooks: HookServer, secret: Path
) -> None:
    """Least privilege: a stolen hook token powers Slurm's nodes and can do nothing else."""
    form = {"grant_type": "client_credentials", "client_id": "slurm"}
    with httpx.Client(timeout=10) as client:
        granted = client.post(
            f"{hooks.auth.url}/auth/token",
            data={**form, "client_secret": secret.read_text().strip()},
        )
        more = client.post(
            f"{hooks.auth.url}/auth/token",
            data={**form, "client_secret": secret.read_text().strip(), "scope": "autogrow:write"},
        )
        bearer = {"authorization": f"Bearer {granted.json()['access_token']}"}
        hook = client.post(
            f"{hooks.url}/autogrow/hooks/resume", json={"nodes": ["node001"]}, headers=bearer
        )
        write = client.put(
            f"{hooks.url}/autogrow/policies/default", json={"min_running": 64}, headers=bearer
        )
        read = client.get(f"{hooks.url}/autogrow/decisions", headers=bearer)
        credentials = client.get(f"{hooks.auth.url}/auth/credentials/pool", headers=bearer)
        pool_secret = hooks.auth.secret_files["pool"].read_text().strip()
        pool = client.post(
            f"{hooks.auth.url}/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "pool",
                "client_secret": pool_secret,
            },
        )
        pool_hook = client.post(
            f"{hooks.url}/autogrow/hooks/resume",
            json={"nodes": ["node001"]},
            headers={"authorization": f"Bearer {pool.json()['access_token']}"},
        )

    assert granted.status_code == 200 and granted.json()["scope"] == "autogrow:hook"
    assert more.status_code == 400 and more.json()["error"] == "invalid_scope"
    assert hook.status_code == 200
    assert write.status_code == 403 and "autogrow:write" in write.json()["detail"]
    assert read.status_code == 403 and "autogrow:read" in read.json()["detail"]
    assert credentials.status_code == 403
    assert pool_hook.status_code == 403, "another client's token may not call the hooks"
    assert hooks.calls == [("/autogrow/hooks/resume", ["node001"])]


def test_a_refusal_is_a_failure_with_autogrows_answer(
    hooks: HookServer, secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hooks.unknown = {"node009"}

    status = hook_main(
        "resume", "node009", hooks.url, auth_url=hooks.auth.url, client_secret_file=secret
    )

    assert status == 1
    assert capsys.readouterr().err == (
        f"hpcfleet slurm-resume: autogrow answered 404 to {hooks.url}/autogrow/hooks/resume: "
        '{"detail":"not pool nodes autogrow knows: node009"}\n'
    )


@pytest.mark.parametrize("down", ["autogrow", "auth"])
def test_an_unreachable_service_is_a_failure(
    hooks: HookServer, secret: Path, capsys: pytest.CaptureFixture[str], down: str
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    autogrow, auth = (nowhere, hooks.auth.url) if down == "autogrow" else (hooks.url, nowhere)

    status = hook_main("suspend", "node001", autogrow, auth_url=auth, client_secret_file=secret)

    assert status == 1
    path = "/autogrow/hooks/suspend" if down == "autogrow" else "/auth/token"
    assert capsys.readouterr().err.startswith(
        f"hpcfleet slurm-suspend: could not reach {down} at {nowhere}{path}: "
        "[Errno 111] Connection refused"
    )


@pytest.mark.parametrize(
    ("action", "hosts", "auth_url", "secret_file", "message"),
    [
        ("resume", "node[001-", None, None, "hpcfleet slurm-resume: bad host list 'node[001-'"),
        ("resume", "", None, None, "hpcfleet slurm-resume: empty host list"),
        ("reboot", "node001", None, None, "hpcfleet slurm-reboot: unknown action 'reboot'"),
        (
            "resume",
            "node001",
            "http://auth",
            None,
            "hpcfleet slurm-resume: give both --auth-url and --client-secret-file",
        ),
        (
            "suspend",
            "node001",
            "http://auth",
            "/nonexistent/slurm.secret",
            "hpcfleet slurm-suspend: cannot read the client secret file /nonexistent/slurm.secret: "
            "No such file or directory",
        ),
    ],
)
def test_bad_arguments_are_refused_before_calling_anything(
    hooks: HookServer,
    capsys: pytest.CaptureFixture[str],
    action: str,
    hosts: str,
    auth_url: str | None,
    secret_file: str | None,
    message: str,
) -> None:
    status = hook_main(action, hosts, hooks.url, auth_url=auth_url, client_secret_file=secret_file)

    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert hooks.calls == []


def test_the_fast_entry_point_runs_in_slurms_empty_environment(
    hooks: HookServer, secret: Path
) -> None:
    """What the wrapper script in Slurm's config runs: no PATH, no HPCFLEET_ variables."""
    command = [
        sys.executable,
        "-m",
        "services.autogrow.slurm_hooks",
        "resume",
        "--autogrow-url",
        hooks.url,
        "--auth-url",
        hooks.auth.url,
        "--client-secret-file",
        str(secret),
        "node[004-005]",  # Slurm appends the host list
    ]
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run(
            command, env={}, cwd="/", capture_output=True, text=True, timeout=30, check=False
        )
        timings.append(time.perf_counter() - started)
        assert done.returncode == 0, done.stderr

    assert hooks.nodes_for("resume") == ["node004", "node005"] * 3
    print(f"hook process, first (token from auth) / cached: {timings[0]:.3f} / {timings[2]:.3f} s")


def test_the_hpcfleet_commands_take_the_auth_options(hooks: HookServer, secret: Path) -> None:
    auth = ["--auth-url", hooks.auth.url, "--client-secret-file", str(secret)]
    url = ["--autogrow-url", hooks.url]

    resumed = CliRunner().invoke(cli, ["slurm-resume", "node001", *url, *auth])
    suspended = CliRunner().invoke(cli, ["slurm-suspend", "node002", *url, *auth])
    no_token = CliRunner().invoke(cli, ["slurm-suspend", "node002", *url])

    assert resumed.exit_code == 0, resumed.output
    assert suspended.exit_code == 0, suspended.output
    assert no_token.exit_code == 1
    assert hooks.calls == [
        ("/autogrow/hooks/resume", ["node001"]),
        ("/autogrow/hooks/suspend", ["node002"]),
    ]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", (204, b"")),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}", (200, b"{}")),
        (b"SSH-2.0-OpenSSH_9.2\r\n", None),
        (b"", None),
    ],
)
def test_the_hooks_http_reads_what_a_server_answers(
    answer: bytes, expected: tuple[int, bytes] | None
) -> None:
    """The hook's own HTTP/1.0 (no http.client: its imports cost a fifth of the call): the
    request as a server sees it, the answer read to the close, a non-HTTP peer a clear error."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        seen: list[bytes] = []

        def serve() -> None:
            peer, _ = listener.accept()
            with peer:
                data = b""
                while not data.endswith(b"\r\n\r\n[]") and (chunk := peer.recv(4096)):
                    data += chunk
                seen.append(data)
                peer.sendall(answer)

        thread = threading.Thread(target=serve)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/autogrow/hooks/resume?x=1"
        try:
            result = _post(url, b"[]", {"Authorization": "Bearer t"}, "autogrow")
        except HookError as error:
            result = None
            assert f"could not reach autogrow at {url}: not an HTTP answer" in str(error)
        thread.join(5)
    assert result == expected
    assert seen[0].startswith(b"POST /autogrow/hooks/resume?x=1 HTTP/1.0\r\n")
    assert b"\r\nContent-Length: 2\r\n" in seen[0] and b"\r\nAuthorization: Bearer t\r\n" in seen[0]


def test_a_header_with_a_line_break_is_never_sent() -> None:
    with pytest.raises(HookError, match="a header holds a line break"):
        _post("http://127.0.0.1:1/", b"", {"Authorization": "Bearer t\r\nX-Evil: 1"}, "autogrow")
