"""audit's settings: escalation override, TLS for the webhook, AWS access; bad values refused."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.audit.alerts import DEFAULT_ESCALATION, Escalation
from services.audit.rules import Severity
from services.audit.service import make_aws
from services.audit.settings import AuditSettings
from shared.settings import ConfigurationError, Settings, load_settings


def test_the_escalation_override_replaces_only_the_severities_it_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "HPCFLEET_AUDIT_ESCALATION",
        '{"critical": {"renotify_every": 300, "escalate_after": "PT10M"},'
        ' "low": {"renotify_every": "P1D", "escalate_after": null}}',
    )
    policy = load_settings(AuditSettings).policy()
    assert policy[Severity.CRITICAL] == Escalation(timedelta(minutes=5), timedelta(minutes=10))
    assert policy[Severity.LOW] == Escalation(timedelta(days=1), None)
    assert policy[Severity.HIGH] == DEFAULT_ESCALATION[Severity.HIGH]
    assert AuditSettings(escalation={}).policy() == DEFAULT_ESCALATION


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("ESCALATION", '{"urgent": {"renotify_every": 60, "escalate_after": null}}', "'critical'"),
        ("ESCALATION", '{"high": {"renotify_every": 0, "escalate_after": null}}', "greater"),
        ("ESCALATION", '{"high": {"renotify_every": 60}}', "ESCALATE_AFTER"),
        ("ESCALATION", "not json", "JSON"),
        ("WEBHOOK_URL", "http://alerts.example.org/hook", "https"),
        ("WEBHOOK_URL", "ftp://alerts.example.org/hook", "WEBHOOK_URL"),
        ("TOPIC_ARN", "arn:aws:sqs:us-east-1:123456789012:hpcfleet-alerts", "TOPIC_ARN"),
        ("WAIT_SECONDS", "0", "WAIT_SECONDS"),
        ("WAIT_SECONDS", "21", "WAIT_SECONDS"),
        ("RETRY_SECONDS", "-1", "RETRY_SECONDS"),
    ],
)
def test_bad_settings_stop_the_process_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str
) -> None:
    monkeypatch.setenv(f"HPCFLEET_AUDIT_{variable}", value)
    with pytest.raises(ConfigurationError, match=f"HPCFLEET_AUDIT_{variable}") as raised:
        load_settings(AuditSettings)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.org/x",
        "http://127.0.0.1:8080/x",
        "http://[::1]/x",
        "http://localhost/x",
    ],
)
def test_the_webhook_is_https_except_to_this_host(url: str) -> None:
    assert str(AuditSettings(webhook_url=url).webhook_url).startswith(url.split("/x")[0])


def test_aws_access_comes_from_auth_or_a_rehearsal_endpoint_never_from_a_key() -> None:
    session, why = make_aws(Settings(), AuditSettings())
    assert session is None
    assert "HPCFLEET_AUDIT_AUTH_URL" in why
    session, why = make_aws(Settings(aws_endpoint_url="http://127.0.0.1:5000"), AuditSettings())
    assert session is not None and why == ""
    with pytest.raises(ConfigurationError, match="AUTH_CLIENT_SECRET"):
        make_aws(Settings(), AuditSettings(auth_url="https://auth.example.org"))
    with pytest.raises(ConfigurationError, match="AUTH_CLIENT_SECRET"):
        make_aws(
            Settings(),
            AuditSettings(auth_url="https://auth.example.org", auth_client_secret="hunter2"),
        )
    session, why = make_aws(
        Settings(),
        AuditSettings(auth_url="https://auth.example.org", auth_client_secret="env:AUDIT_SECRET"),
    )
    assert session is not None and why == ""
