"""bakery's composition: where its AWS credentials come from, and refusing bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.bakery.service import make_aws
from services.bakery.settings import BakerySettings
from shared.settings import ConfigurationError, Settings, load_settings


def test_aws_comes_from_auth_a_rehearsal_endpoint_or_nowhere(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    with_auth = BakerySettings(auth_url="https://auth.example", auth_client_secret=f"file:{secret}")
    aws, why = make_aws(Settings(), with_auth)
    assert aws is not None and aws.endpoint_url is None and why == ""

    rehearsal, why = make_aws(Settings(aws_endpoint_url="http://127.0.0.1:5000"), BakerySettings())
    assert rehearsal is not None and rehearsal.endpoint_url == "http://127.0.0.1:5000"

    nothing, why = make_aws(Settings(), BakerySettings())
    assert nothing is None and why.startswith("AWS is not configured for bakery")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            BakerySettings(auth_url="https://auth.example"),
            "HPCFLEET_BAKERY_AUTH_CLIENT_SECRET: required with HPCFLEET_BAKERY_AUTH_URL",
        ),
        (
            BakerySettings(auth_url="https://auth.example", auth_client_secret="hunter2"),
            "a secret must be given as 'file:<path>' or 'env:<VARIABLE>'",
        ),
    ],
)
def test_bad_auth_settings_are_refused(settings: BakerySettings, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as refused:
        make_aws(Settings(), settings)
    assert "hunter2" not in str(refused.value)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCFLEET_BAKERY_LEASE_SECONDS", "10")
    monkeypatch.setenv("HPCFLEET_BAKERY_BUILD_INTERVAL", "30")
    with pytest.raises(ConfigurationError, match="lease_seconds must be at least twice"):
        load_settings(BakerySettings)
    monkeypatch.setenv("HPCFLEET_BAKERY_PACKER_COMMUNICATOR", "telnet")
    with pytest.raises(ConfigurationError, match="HPCFLEET_BAKERY_PACKER_COMMUNICATOR"):
        load_settings(BakerySettings)
