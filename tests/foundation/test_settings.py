"""Settings come only from HPCFLEET_ variables; a bad one stops the process with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.settings import ConfigurationError, Settings, load_settings


def test_defaults_run_everything_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HPCFLEET_"):
            monkeypatch.delenv(key)
    settings = load_settings(Settings)
    assert settings.bus_url == "memory://"
    assert settings.database_url.startswith("sqlite+aiosqlite://")


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCFLEET_PREFETCH", "7")
    monkeypatch.setenv("HPCFLEET_BUS_URL", "amqp://guest:guest@127.0.0.1:5672/")
    settings = load_settings(Settings)
    assert settings.prefetch == 7
    assert settings.bus_url.startswith("amqp://")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("HPCFLEET_PREFETCH", "lots", "HPCFLEET_PREFETCH"),
        ("HPCFLEET_DATABASE_URL", "mysql://x", "HPCFLEET_DATABASE_URL"),
        ("HPCFLEET_BUS_URL", "kafka://x", "HPCFLEET_BUS_URL"),
        ("HPCFLEET_DELIVERY_LIMIT", "0", "HPCFLEET_DELIVERY_LIMIT"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=expected) as info:
        load_settings(Settings)
    assert "\n" not in str(info.value)


def test_cli_reports_a_bad_setting_in_one_line_without_traceback() -> None:
    env = {**os.environ, "HPCFLEET_DATABASE_URL": "mysql://nowhere"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "HPCFLEET_DATABASE_URL" in lines[0]
