"""`hpcfleet up`: bad input gets one clear line and a non-zero exit; good input runs the system."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests_support import free_port

HPCFLEET = [sys.executable, "-m", "services.cli"]


def run_up(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HPCFLEET, "up", "--no-live", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_says_all_it_does(tmp_path: Path) -> None:
    result = subprocess.run(
        [*HPCFLEET, "up", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for part in (
        "in-memory bus",
        "SQLite file",
        "moto server as AWS",
        "development identity provider standing in for AD FS",
        "real AD FS client code",
        "simulated scheduler replaying a real trace",
        "--postgres",
        "--rabbitmq",
        "--port",
        "/docs",
    ):
        assert part in text, part


def test_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(run_up("--port", str(port), cwd=tmp_path))
    assert f"port {port}" in line and "--port" in line


def test_a_trace_that_does_not_exist(tmp_path: Path) -> None:
    line = one_line_error(run_up("--trace", "nope.swf", "--port", str(free_port()), cwd=tmp_path))
    assert "no bundled trace 'nope.swf'" in line


def test_speed_zero(tmp_path: Path) -> None:
    line = one_line_error(run_up("--speed", "0", cwd=tmp_path))
    assert "--speed must be more than 0" in line


def test_a_host_it_cannot_sign_in_to_over_loopback(tmp_path: Path) -> None:
    line = one_line_error(run_up("--host", "192.0.2.10", "--port", str(free_port()), cwd=tmp_path))
    assert "--host 192.0.2.10" in line and "0.0.0.0" in line


def test_a_postgres_that_does_not_answer(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/nothing"
    line = one_line_error(run_up("--postgres", url, "--port", str(free_port()), cwd=tmp_path))
    assert "PostgreSQL at 127.0.0.1" in line and "does not answer" in line


def get(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if token:
        request.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={ARTIFACTS / 'chromium-profile'}",
            "--window-size=1280,1000",
            "--virtual-time-budget=8000",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_status_page_in_a_browser(url: str) -> None:
    """The page really renders in Chromium: its script fetched a token and drew the pool."""
    assert Path(CHROMIUM).exists(), "install Debian's chromium (deploy/scripts/system-packages.txt)"
    ARTIFACTS.mkdir(exist_ok=True)
    dom = chromium(url, "--dump-dom").stdout
    assert 'class="node ' in dom, dom[-2000:]
    assert '<b id="running">\u2013</b>' not in dom, "the page never filled in its figures"
    shot = ARTIFACTS / "status-page.png"
    chromium(url, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000


def check_operator_commands(base: str, token: str, tmp_path: Path) -> None:
    """The operator CLI reads through the API with a saved token; a read-only token cannot bake,
    and says so in one line."""
    token_file = tmp_path / "token"
    token_file.write_text(token)

    def hpcfleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HPCFLEET, *args, "--url", base, "--token-file", str(token_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    status = hpcfleet("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pools"][0]["name"] == "default"
    nodes = hpcfleet("nodes", "--json")
    assert nodes.returncode == 0 and json.loads(nodes.stdout)["nodes"], nodes.stderr
    cost = hpcfleet("cost", "--json")
    assert cost.returncode == 0 and "billed_node_hours" in json.loads(cost.stdout)
    table = hpcfleet("decisions")
    assert table.returncode == 0 and "summary" in table.stdout
    refused = hpcfleet("bake", "linux")
    assert refused.returncode == 1
    assert "403" in refused.stderr and "bakery:write" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_up_bakes_fills_and_powers_nodes_then_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [*HPCFLEET, "up", "--no-live", "--port", str(port), "--nodes", "16"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        pool: Any = {}
        decisions: Any = []
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                token = str(get(f"{base}/console/token")["access_token"])
                pool = get(f"{base}/pool/pools/default", token)
                decisions = get(f"{base}/autogrow/decisions?limit=50", token)
            except OSError:
                continue
            powered = [a for d in decisions for a in d["actions"]]
            if pool.get("spec", {}).get("image_id") and powered:
                break
        assert pool["spec"]["image_id"], pool
        assert any(
            a["action"] in ("power_on", "resume") for d in decisions for a in d["actions"]
        ), decisions
        assert (tmp_path / ".hpcfleet" / "hpcfleet.db").exists()
        # The status page's token came from signing in to the development AD FS as the operator
        # (`hpcfleet login`'s code), read-only; pool's image and powered nodes show that pool
        # and bakery got AWS credentials from auth (they have no other).
        whoami = get(f"{base}/auth/whoami", token)
        assert (whoami["subject"], whoami["role"]) == ("EXAMPLE\\operator", "operator")
        assert whoami["scopes"] == ["audit:read", "autogrow:read", "bakery:read", "pool:read"]
        check_status_page_in_a_browser(f"{base}/")
        check_operator_commands(base, token, tmp_path)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]
