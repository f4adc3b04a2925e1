"""services/audit/rules.py: real-shaped CloudTrail events in, alerts (or nothing) out."""

from __future__ import annotations

import json
from copy import deepcopy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.audit.rules import EVENT_KINDS, Alert, Severity, classify, classify_message

EVENTS = Path(__file__).parent / "events"


def _sample(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / f"{name}.json").read_text()))


def _body(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope)


CASES = [
    # sample, rule, severity, who, where
    (
        "iam_put_role_policy",
        "iam-policy-change",
        Severity.HIGH,
        "alice@corp.example (role hpcfleet-operator)",
        "account 123456789012, us-east-1, from 192.168.10.20",
    ),
    (
        "iam_attach_role_policy_denied",
        "iam-policy-change",
        Severity.MEDIUM,
        "hpcfleet-pool-svc (role hpcfleet-pool)",
        "account 123456789012, us-east-1, from 192.168.10.20",
    ),
    (
        "iam_update_assume_role_policy",
        "iam-identity-change",
        Severity.CRITICAL,
        "carol@corp.example (role hpcfleet-operator)",
        "account 123456789012, us-east-1, from 192.168.10.20",
    ),
    (
        "root_create_access_key",
        "root-activity",
        Severity.CRITICAL,
        "root (arn:aws:iam::123456789012:root)",
        "account 123456789012, us-east-1, from 203.0.113.44",
    ),
    (
        "root_console_login",
        "root-activity",
        Severity.CRITICAL,
        "root (arn:aws:iam::123456789012:root)",
        "account 123456789012, us-east-1, from 203.0.113.44",
    ),
    (
        "console_login_iam_user_no_mfa",
        "console-signin-without-mfa",
        Severity.HIGH,
        "IAM user bob",
        "account 123456789012, eu-west-1, from 198.51.100.23",
    ),
    (
        "console_login_iam_user_failed",
        "console-signin-without-mfa",
        Severity.MEDIUM,
        "IAM user bob",
        "account 123456789012, eu-west-1, from 198.51.100.23",
    ),
    (
        "sg_authorize_egress",
        "network-change",
        Severity.HIGH,
        "dave@corp.example (role hpcfleet-operator)",
        "account 123456789012, eu-west-1, from 192.168.10.20",
    ),
    (
        "nacl_create_entry",
        "network-change",
        Severity.HIGH,
        "dave@corp.example (role hpcfleet-operator)",
        "account 123456789012, eu-west-1, from 192.168.10.20",
    ),
    (
        "attach_internet_gateway",
        "network-opened",
        Severity.CRITICAL,
        "dave@corp.example (role hpcfleet-operator)",
        "account 123456789012, eu-west-1, from 192.168.10.20",
    ),
    (
        "cloudtrail_stop_logging",
        "audit-control-disabled",
        Severity.CRITICAL,
        "mallory@corp.example (role hpcfleet-operator)",
        "account 123456789012, us-east-1, from 192.168.10.20",
    ),
]


@pytest.mark.parametrize(("sample", "rule", "severity", "who", "where"), CASES)
def test_a_security_event_becomes_its_alert(
    sample: str, rule: str, severity: Severity, who: str, where: str
) -> None:
    envelope = _sample(sample)
    alert = classify_message(_body(envelope))
    assert alert is not None
    assert (alert.rule, alert.severity, alert.who, alert.where) == (rule, severity, who, where)
    assert alert.key == f"cloudtrail:{envelope['detail']['eventID']}"
    assert alert.title.endswith(envelope["detail"]["eventName"])
    assert alert.occurred_at == datetime.fromisoformat(envelope["detail"]["eventTime"])
    assert classify(envelope) == alert


@pytest.mark.parametrize(
    ("sample", "says"),
    [
        (
            "iam_put_role_policy",
            "PutRolePolicy (roleName=hpcfleet-pool, policyName=debug-everything)",
        ),
        (
            "sg_authorize_egress",
            "AuthorizeSecurityGroupEgress"
            " (groupId=sg-0a1b2c3d4e5f60718, tcp 445-445 192.168.0.0/16)",
        ),
        (
            "nacl_create_entry",
            "CreateNetworkAclEntry (networkAclId=acl-0f1e2d3c4b5a69788, "
            "rule 90 allow egress protocol -1 192.168.0.0/16)",
        ),
        ("console_login_iam_user_failed", "ConsoleLogin: Failure - refused: Failed authentication"),
        ("root_console_login", "ConsoleLogin"),
    ],
)
def test_what_says_which_call_on_which_resource(sample: str, says: str) -> None:
    alert = classify(_sample(sample))
    assert alert is not None and alert.what == says


@pytest.mark.parametrize(
    "sample", ["console_login_federated", "ec2_describe_instances", "root_by_aws_service"]
)
def test_an_ordinary_event_is_no_alert(sample: str) -> None:
    assert classify_message(_body(_sample(sample))) is None


def test_a_refused_change_is_an_attempt_one_step_quieter() -> None:
    alert = classify(_sample("iam_attach_role_policy_denied"))
    assert alert is not None
    assert alert.title == "Attempted: IAM policy changed: AttachRolePolicy"
    assert " - refused: AccessDenied: User: " in alert.what


def test_root_stays_critical_even_when_refused() -> None:
    envelope = _sample("root_console_login")
    envelope["detail"]["errorMessage"] = "Failed authentication"
    envelope["detail"]["responseElements"] = {"ConsoleLogin": "Failure"}
    alert = classify(envelope)
    assert alert is not None and (alert.rule, alert.severity) == (
        "root-activity",
        Severity.CRITICAL,
    )


def test_an_iam_user_signing_in_with_mfa_is_no_alert() -> None:
    envelope = _sample("console_login_iam_user_no_mfa")
    envelope["detail"]["additionalEventData"]["MFAUsed"] = "Yes"
    assert classify(envelope) is None


def test_one_event_delivered_twice_by_two_rules_is_one_key() -> None:
    first = _sample("root_create_access_key")
    second = deepcopy(first)
    second["id"] = "another-envelope-id"  # EventBridge gives each delivery its own id
    a, b = classify(first), classify(second)
    assert a is not None and b is not None and a.key == b.key


def test_without_a_cloudtrail_id_the_envelope_id_is_the_key() -> None:
    envelope = _sample("iam_put_role_policy")
    del envelope["detail"]["eventID"]
    alert = classify(envelope)
    assert alert is not None and alert.key == f"cloudtrail:{envelope['id']}"


@pytest.mark.parametrize(
    "detail_type",
    [
        "EC2 Instance State-change Notification",
        "AWS Service Event via CloudTrail",
        "Scheduled Event",
    ],
)
def test_other_kinds_of_event_are_no_alert(detail_type: str) -> None:
    envelope = _sample("iam_put_role_policy")
    envelope["detail-type"] = detail_type
    assert classify(envelope) is None


def test_an_event_name_is_only_known_together_with_its_service() -> None:
    """elasticloadbalancing has a DeleteRule too: it is not EventBridge's."""
    envelope = _sample("cloudtrail_stop_logging")
    envelope["detail"].update(
        eventSource="elasticloadbalancing.amazonaws.com", eventName="DeleteRule"
    )
    assert classify(envelope) is None
    envelope["detail"]["eventSource"] = "events.amazonaws.com"
    alert = classify(envelope)
    assert alert is not None and alert.rule == "audit-control-change"


@pytest.mark.parametrize(("source", "name"), sorted(EVENT_KINDS))
def test_every_known_event_becomes_an_alert_of_its_kind(source: str, name: str) -> None:
    envelope = {
        "detail-type": "AWS API Call via CloudTrail",
        "detail": {"eventSource": source, "eventName": name, "eventID": name},
    }
    alert = classify(envelope)
    assert alert is not None
    assert (alert.rule, alert.severity) == (
        EVENT_KINDS[(source, name)].rule,
        EVENT_KINDS[(source, name)].severity,
    )
    assert (alert.who, alert.where, alert.occurred_at) == ("unknown", "unknown", None)


# ---- what cannot be understood is kept, never dropped ----

MALFORMED = [
    "not json at all",
    '["a", "list"]',
    '"a string"',
    "{}",
    '{"detail-type": "AWS API Call via CloudTrail"}',
    '{"detail-type": "AWS API Call via CloudTrail", "detail": "text"}',
    '{"detail-type": "AWS API Call via CloudTrail", "detail": {"eventSource": "iam"}}',
    '{"Type": "SubscriptionConfirmation", "TopicArn": "arn:aws:sns:us-east-1:1:t"}',
    '{"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Subject": "hello"}',
]


@pytest.mark.parametrize("body", MALFORMED)
def test_a_malformed_message_becomes_an_unparsed_alert(body: str) -> None:
    alert = classify_message(body)
    assert alert is not None
    assert (alert.rule, alert.severity) == ("unparsed", Severity.MEDIUM)
    assert alert.key.startswith("sha256:")
    assert classify_message(body) == alert  # redelivered: the same alert


def test_different_malformed_messages_are_different_alerts() -> None:
    keys = {a.key for a in map(classify_message, MALFORMED) if a}
    assert len(keys) == len(MALFORMED)


@given(st.text())
def test_any_text_is_classified_without_raising(body: str) -> None:
    result = classify_message(body)
    assert result is None or isinstance(result, Alert)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "detail-type",
        "detail",
        "eventName",
        "eventSource",
        "userIdentity",
        "type",
        "errorCode",
        "requestParameters",
        "ipPermissions",
        "items",
        "additionalEventData",
        "MFAUsed",
        "Type",
        "TopicArn",
        "Message",
        "Subject",
        "eventID",
        "eventTime",
        "invokedBy",
        "ruleNumber",
    ]
)
SHAPED = st.recursive(
    st.none()
    | st.text()
    | st.integers()
    | st.sampled_from(
        [
            "AWS API Call via CloudTrail",
            "AWS Console Sign In via CloudTrail",
            "Root",
            "IAMUser",
            "iam.amazonaws.com",
            "ec2.amazonaws.com",
            "PutRolePolicy",
            "ConsoleLogin",
            "Notification",
        ]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=6),
    max_leaves=30,
)


@given(JSON | SHAPED)
def test_any_json_is_classified_without_raising(value: object) -> None:
    result = classify_message(json.dumps(value))
    assert result is None or isinstance(result, Alert)


# ---- AWS Budgets, through SNS ----


def test_a_budget_notification_is_an_alert() -> None:
    body = (EVENTS / "budget_notification.json").read_text()
    alert = classify_message(body)
    assert alert is not None
    assert (alert.rule, alert.severity, alert.who) == (
        "budget-threshold",
        Severity.HIGH,
        "AWS Budgets",
    )
    assert alert.key == "sns:0c7f1a2b-3c4d-5e6f-7a8b-9c0d1e2f3a4b"
    assert alert.where == "account 123456789012, us-east-1"
    assert alert.what.startswith("AWS Budgets: hpcfleet-monthly has exceeded your alert threshold")
    assert alert.occurred_at == datetime(2026, 11, 29, 6, 4, 11, 512000, tzinfo=UTC)


def test_a_forecast_budget_notification_is_quieter() -> None:
    message = json.loads((EVENTS / "budget_notification.json").read_text())
    message["Message"] = message["Message"].replace("ACTUAL", "FORECASTED")
    alert = classify_message(json.dumps(message))
    assert alert is not None and alert.severity == Severity.MEDIUM


def test_an_event_wrapped_in_sns_is_unwrapped() -> None:
    inner = _sample("cloudtrail_stop_logging")
    wrapped = {
        "Type": "Notification",
        "MessageId": "m-1",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:forwarded",
        "Message": json.dumps(inner),
    }
    assert classify_message(json.dumps(wrapped)) == classify(inner)


# ---- small parts ----


@pytest.mark.parametrize(
    ("identity", "who"),
    [
        ({"type": "IAMUser", "userName": "bob"}, "IAM user bob"),
        ({"type": "AWSService", "invokedBy": "config.amazonaws.com"}, "config.amazonaws.com"),
        ({"type": "Root", "accountId": "123456789012"}, "root (123456789012)"),
        (
            {"type": "AssumedRole", "arn": "arn:aws:sts::1:assumed-role/r/s"},
            "arn:aws:sts::1:assumed-role/r/s",
        ),
        ({"type": "SAMLUser", "principalId": "p"}, "p"),
        ({}, "unknown"),
    ],
)
def test_who_names_a_person_where_cloudtrail_does(identity: dict[str, str], who: str) -> None:
    envelope = _sample("iam_put_role_policy")
    envelope["detail"]["userIdentity"] = identity
    alert = classify(envelope)
    assert alert is not None and alert.who == who


def test_where_falls_back_to_the_identity_s_account_and_the_envelope_region() -> None:
    envelope = _sample("iam_put_role_policy")
    del (
        envelope["account"],
        envelope["detail"]["recipientAccountId"],
        envelope["detail"]["awsRegion"],
    )
    del envelope["detail"]["sourceIPAddress"]
    alert = classify(envelope)
    assert alert is not None and alert.where == "account 123456789012, us-east-1"


def test_severity_orders_and_lowers_but_never_below_low() -> None:
    assert [s.rank for s in Severity] == [0, 1, 2, 3]
    assert Severity.CRITICAL.lowered() is Severity.HIGH
    assert Severity.LOW.lowered() is Severity.LOW
