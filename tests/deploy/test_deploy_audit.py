"""audit.yaml: the trail, the bucket, the queue and its rules, the budget; and the rules agree
with services/audit/rules.py on which events exist.

Moto skips the trail, Config, the budget and every resource policy, so these are template checks.
"""

from __future__ import annotations

from typing import Any

import pytest
from cfn_support import as_list, load, resources

from services.audit.rules import EVENT_KINDS

TEMPLATE = load("audit")
R = TEMPLATE["Resources"]
RULES = resources(TEMPLATE, "AWS::Events::Rule")
QUEUE_ARN = {"Fn::GetAtt": ["SecurityEventsQueue", "Arn"]}
DLQ_ARN = {"Fn::GetAtt": ["SecurityEventsDeadLetterQueue", "Arn"]}
INSECURE = {"Bool": {"aws:SecureTransport": "false"}}


def _pattern(logical_id: str) -> dict[str, Any]:
    return dict(RULES[logical_id]["Properties"]["EventPattern"])


def test_the_trail_covers_every_region_validates_its_files_and_is_encrypted() -> None:
    trail = R["Trail"]["Properties"]
    assert trail["IsMultiRegionTrail"] is True
    assert trail["IncludeGlobalServiceEvents"] is True
    assert trail["EnableLogFileValidation"] is True
    assert trail["IsLogging"] is True
    assert trail["KMSKeyId"] == {"Fn::GetAtt": ["AuditKey", "Arn"]}
    assert R["AuditKey"]["Properties"]["EnableKeyRotation"] is True


def test_the_audit_bucket_is_private_versioned_kms_encrypted_and_tls_only() -> None:
    bucket = R["AuditBucket"]
    props = bucket["Properties"]
    (encryption,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert encryption["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": {"Fn::GetAtt": ["AuditKey", "Arn"]},
    }
    assert set(props["PublicAccessBlockConfiguration"].values()) == {True}
    assert len(props["PublicAccessBlockConfiguration"]) == 4
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["DeletionPolicy"] == "Retain"
    statements = R["AuditBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert any(s["Effect"] == "Deny" and s.get("Condition") == INSECURE for s in statements)
    for statement in statements:
        if statement["Effect"] == "Allow":  # CloudTrail, and only for this account's trail
            assert statement["Principal"] == {"Service": "cloudtrail.amazonaws.com"}
            assert (
                "trail/${NamePrefix}-trail"
                in statement["Condition"]["StringEquals"]["aws:SourceArn"]["Fn::Sub"]
            )


def test_config_records_every_resource_type_into_the_encrypted_bucket() -> None:
    recorder = R["ConfigRecorder"]["Properties"]
    assert recorder["RecordingGroup"]["AllSupported"] is True
    channel = R["ConfigDeliveryChannel"]["Properties"]
    assert channel["S3BucketName"] == {"Ref": "AuditBucket"}
    assert channel["S3KmsKeyArn"] == {"Fn::GetAtt": ["AuditKey", "Arn"]}


def test_the_queue_keeps_events_two_weeks_encrypted_with_dead_letters() -> None:
    for name in ("SecurityEventsQueue", "SecurityEventsDeadLetterQueue"):
        props = R[name]["Properties"]
        assert props["KmsMasterKeyId"] == {"Fn::GetAtt": ["AuditKey", "Arn"]}
        assert props["MessageRetentionPeriod"] == 1209600
    redrive = R["SecurityEventsQueue"]["Properties"]["RedrivePolicy"]
    assert redrive == {"deadLetterTargetArn": DLQ_ARN, "maxReceiveCount": 5}


def test_only_the_rules_and_the_budget_topic_may_send_to_the_queue() -> None:
    statements = R["SecurityEventsQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert any(s["Effect"] == "Deny" and s.get("Condition") == INSECURE for s in statements)
    senders = {}
    for statement in (s for s in statements if s["Effect"] == "Allow"):
        assert statement["Action"] == "sqs:SendMessage"
        (service,) = statement["Principal"].values()
        senders[service] = as_list(statement["Condition"]["ArnEquals"]["aws:SourceArn"])
    assert senders == {
        "events.amazonaws.com": [{"Fn::GetAtt": [rule, "Arn"]} for rule in RULES],
        "sns.amazonaws.com": [{"Ref": "BudgetTopic"}],
    }


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_sends_the_whole_event_to_the_queue_with_dead_letters(rule: str) -> None:
    (target,) = RULES[rule]["Properties"]["Targets"]
    assert target["Arn"] == QUEUE_ARN
    assert target["DeadLetterConfig"] == {"Arn": DLQ_ARN}
    assert not {"Input", "InputPath", "InputTransformer"} & set(target)  # rules.py reads it all


def test_the_budget_alerts_at_80_and_100_percent_and_on_the_forecast_into_the_queue() -> None:
    budget = R["MonthlyBudget"]["Properties"]
    assert (budget["Budget"]["BudgetType"], budget["Budget"]["TimeUnit"]) == ("COST", "MONTHLY")
    notifications = {
        (n["Notification"]["NotificationType"], n["Notification"]["Threshold"])
        for n in budget["NotificationsWithSubscribers"]
    }
    assert notifications == {("ACTUAL", 80), ("ACTUAL", 100), ("FORECASTED", 100)}
    for n in budget["NotificationsWithSubscribers"]:
        assert {"SubscriptionType": "SNS", "Address": {"Ref": "BudgetTopic"}} in n["Subscribers"]
    assert R["BudgetTopic"]["Properties"]["Subscription"] == [
        {"Endpoint": QUEUE_ARN, "Protocol": "sqs"}
    ]


def test_console_sign_in_rule_matches_iam_users_and_root_without_mfa_only() -> None:
    pattern = _pattern("ConsoleSignInWithoutMfaRule")
    assert pattern["detail"]["userIdentity"]["type"] == ["IAMUser", "Root"]
    assert pattern["detail"]["additionalEventData"]["MFAUsed"] == [{"anything-but": "Yes"}]


def test_root_rule_leaves_out_aws_services_acting_as_root() -> None:
    detail = _pattern("RootActivityRule")["detail"]
    assert detail["userIdentity"] == {"type": ["Root"], "invokedBy": [{"exists": False}]}
    assert detail["eventType"] == [{"anything-but": "AwsServiceEvent"}]


# ---- the template's event names and rules.py's table must be the same lists ----

RULE_SOURCES = {
    "IamChangesRule": {"iam.amazonaws.com"},
    "NetworkChangesRule": {"ec2.amazonaws.com"},
    "AuditControlChangesRule": {
        "cloudtrail.amazonaws.com",
        "kms.amazonaws.com",
        "s3.amazonaws.com",
        "config.amazonaws.com",
        "ec2.amazonaws.com",
        "events.amazonaws.com",
        "sqs.amazonaws.com",
    },
}
FAMILY = {
    "IamChangesRule": "iam-",
    "NetworkChangesRule": "network-",
    "AuditControlChangesRule": "audit-control-",
}


@pytest.mark.parametrize("rule", sorted(RULE_SOURCES))
def test_the_rule_and_the_classifier_know_the_same_event_names(rule: str) -> None:
    pattern = _pattern(rule)
    assert {f"{s.removeprefix('aws.')}.amazonaws.com" for s in pattern["source"]} == RULE_SOURCES[
        rule
    ]
    classified = {
        name
        for (source, name), kind in EVENT_KINDS.items()
        if source in RULE_SOURCES[rule] and kind.rule.startswith(FAMILY[rule])
    }
    assert set(pattern["detail"]["eventName"]) == classified
