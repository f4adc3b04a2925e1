"""auth's settings: secrets only as references, coherent combinations, one clear line when wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.auth.service import build, make_context
from services.auth.settings import AuthSettings
from shared.service import Runtime
from shared.settings import ConfigurationError, Settings, load_settings
from shared.tokens import SecretRef

ROLE = {
    "role_arn": "arn:aws:iam::123456789012:role/hpcfleet-pool",
    "username": "svc-pool@example.test",
    "password": "file:/run/secrets/pool",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith("HPCFLEET_AUTH_"):
            monkeypatch.delenv(key)
    cert = tmp_path / "adfs.crt"
    cert.write_text("not a certificate")
    return cert


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    return Runtime.from_settings(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/a.db"))


def env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key, value in values.items():
        monkeypatch.setenv(f"HPCFLEET_AUTH_{key.upper()}", value)


def test_roles_and_clients_come_as_json_with_secret_references(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    env(
        monkeypatch,
        adfs_url="https://adfs.example.test",
        adfs_signing_certificates=str(clean_env),
        saml_provider_arn="arn:aws:iam::123456789012:saml-provider/ADFS",
        roles=json.dumps({"pool": ROLE}),
        clients=json.dumps({"pool": "env:POOL_CLIENT_SECRET"}),
        signing_key="file:/run/secrets/auth-signing-key",
    )
    settings = load_settings(AuthSettings)

    assert settings.roles["pool"].password == SecretRef("file", "/run/secrets/pool")
    assert settings.clients["pool"] == SecretRef("env", "POOL_CLIENT_SECRET")
    assert settings.principal_arn("pool").endswith(":saml-provider/ADFS")
    assert settings.environment == "production"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"signing_key": "hunter2-literal"}, "HPCFLEET_AUTH_SIGNING_KEY: Value error, a secret"),
        (
            {"roles": json.dumps({"pool": ROLE | {"password": "hunter2-literal"}})},
            "never as a literal",
        ),
        ({"clients": json.dumps({"pool": "hunter2-literal"})}, "never as a literal"),
        ({"roles": json.dumps({"pool": ROLE})}, "needs HPCFLEET_AUTH_ADFS_URL"),
        ({"adfs_url": "https://adfs.example.test"}, "needs HPCFLEET_AUTH_ADFS_SIGNING_CERT"),
        (
            {"adfs_url": "http://adfs.example.test", "adfs_signing_certificates": "/x.crt"},
            "must be https outside development",
        ),
        (
            {"adfs_url": "https://adfs.example.test", "adfs_signing_certificates": "/x.crt"},
            "HPCFLEET_AUTH_SIGNING_KEY (file:<path> of an Ed25519 PEM key) is required",
        ),
        ({"roles": json.dumps({"Pool!": ROLE})}, "is not a name"),
        ({"roles": json.dumps({"pool": ROLE | {"role_arn": "pool"}})}, "role_arn must look"),
        ({"roles": json.dumps({"pool": ROLE | {"username": "pool"}})}, "DOMAIN\\user"),
        ({"token_ttl_seconds": "86400"}, "HPCFLEET_AUTH_TOKEN_TTL_SECONDS"),
    ],
)
def test_bad_settings_name_the_variable_and_never_echo_a_secret(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], message: str
) -> None:
    env(monkeypatch, **values)
    with pytest.raises(ConfigurationError) as info:
        load_settings(AuthSettings)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "\n" not in str(info.value)


def test_development_may_use_http_and_an_ephemeral_key(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, runtime: Runtime
) -> None:
    env(
        monkeypatch,
        environment="development",
        adfs_url="http://127.0.0.1:9443",
        adfs_signing_certificates=str(clean_env),
    )
    settings = load_settings(AuthSettings)
    with pytest.raises(ConfigurationError, match="not a readable PEM certificate"):
        make_context(settings, runtime)

    context = make_context(settings.model_copy(update={"adfs_signing_certificates": None}), runtime)
    assert context.issuer is not None and context.verifier is not None


def test_key_and_client_problems_stop_the_process_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    runtime: Runtime,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env(monkeypatch, signing_key=f"file:{tmp_path / 'missing.pem'}")
    with pytest.raises(SystemExit) as exited:
        build(runtime)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpcfleet: invalid configuration: HPCFLEET_AUTH_SIGNING_KEY")
    assert "\n" not in err

    with pytest.raises(ConfigurationError, match="scheduler not in the scope map"):
        make_context(
            AuthSettings(environment="development", clients={"scheduler": SecretRef("env", "X")}),
            runtime,
        )


def test_no_configuration_builds_an_auth_that_hands_out_nothing(runtime: Runtime) -> None:
    service = build(runtime)
    assert service.name == "auth"
    assert {route.path for route in service.router.routes} >= {  # type: ignore[attr-defined]
        "/auth/token",
        "/auth/credentials/{role}",
        "/auth/keys",
    }
