"""Which security events become alerts, and how loud: a pure classification of queue messages.

The security-event queue (deploy/cloudformation/audit.yaml) receives EventBridge envelopes of
CloudTrail events, chosen by the CIS AWS Foundations benchmark's monitoring list, and SNS
notifications from AWS Budgets. `classify_message` turns one raw message body into an `Alert` or
None (not a security event). Nothing is ever dropped silently: a body that cannot be understood
becomes an "unparsed" alert that carries a digest of the body, so a redelivery stays one alert.

The event names below and the EventBridge patterns in audit.yaml must agree; a test holds them to
each other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """Order for sorting and comparing (LOW = 0 ... CRITICAL = 3)."""
        return list(Severity).index(self)

    def lowered(self) -> Severity:
        """One step quieter, never below LOW: for a change AWS refused (an attempt, no change)."""
        return list(Severity)[max(0, self.rank - 1)]


@dataclass(frozen=True)
class Alert:
    """One security event as an alert: what the notification says and what the API lists."""

    key: str  # deduplication key: the CloudTrail event id, SNS message id, or a body digest
    rule: str  # stable id of the rule that matched, e.g. "iam-policy-change"
    severity: Severity
    title: str
    what: str
    who: str
    account: str | None
    region: str | None
    source_ip: str | None
    occurred_at: datetime | None

    @property
    def where(self) -> str:
        """Account, region and source address in one line, leaving out what is unknown."""
        parts = [
            f"account {self.account}" if self.account else None,
            self.region,
            f"from {self.source_ip}" if self.source_ip else None,
        ]
        return ", ".join(p for p in parts if p) or "unknown"


@dataclass(frozen=True)
class Kind:
    """A family of events: the rule id, how loud, and the title's start."""

    rule: str
    severity: Severity
    title: str


_IAM_POLICY = Kind("iam-policy-change", Severity.HIGH, "IAM policy changed")
_IAM_IDENTITY = Kind("iam-identity-change", Severity.CRITICAL, "IAM identity or trust changed")
_NETWORK = Kind("network-change", Severity.HIGH, "Network changed")
_NETWORK_OPENED = Kind("network-opened", Severity.CRITICAL, "Network path opened")
_AUDIT_WEAKENED = Kind("audit-control-change", Severity.HIGH, "Audit control changed")
_AUDIT_DISABLED = Kind("audit-control-disabled", Severity.CRITICAL, "Audit control disabled")
_ROOT = Kind("root-activity", Severity.CRITICAL, "Root account used")
_NO_MFA = Kind("console-signin-without-mfa", Severity.HIGH, "Console sign-in without MFA")
_BUDGET = Kind("budget-threshold", Severity.HIGH, "Budget threshold crossed")
_UNPARSED = Kind("unparsed", Severity.MEDIUM, "Unparsed security event")


def _table(source: str, kind: Kind, *names: str) -> dict[tuple[str, str], Kind]:
    return {(source, name): kind for name in names}


# (eventSource, eventName) -> kind. Keyed by source because names repeat across services
# (elasticloadbalancing has its own DeleteRule, for one).
EVENT_KINDS: Mapping[tuple[str, str], Kind] = {
    # CIS 4.4, plus what changes what a policy means
    **_table(
        "iam.amazonaws.com",
        _IAM_POLICY,
        "AttachGroupPolicy",
        "AttachRolePolicy",
        "AttachUserPolicy",
        "CreatePolicy",
        "CreatePolicyVersion",
        "DeleteGroupPolicy",
        "DeletePolicy",
        "DeletePolicyVersion",
        "DeleteRolePolicy",
        "DeleteUserPolicy",
        "DetachGroupPolicy",
        "DetachRolePolicy",
        "DetachUserPolicy",
        "PutGroupPolicy",
        "PutRolePolicy",
        "PutUserPolicy",
        "SetDefaultPolicyVersion",
        "PutRolePermissionsBoundary",
        "DeleteRolePermissionsBoundary",
        "CreateRole",
        "DeleteRole",
    ),
    # what breaks "AD FS only, no IAM users, no long-term keys"
    **_table(
        "iam.amazonaws.com",
        _IAM_IDENTITY,
        "UpdateAssumeRolePolicy",
        "CreateUser",
        "CreateAccessKey",
        "UpdateAccessKey",
        "CreateLoginProfile",
        "UpdateLoginProfile",
        "AddUserToGroup",
        "CreateSAMLProvider",
        "UpdateSAMLProvider",
        "DeleteSAMLProvider",
        "CreateOpenIDConnectProvider",
    ),
    # CIS 4.10-4.14
    **_table(
        "ec2.amazonaws.com",
        _NETWORK,
        "AuthorizeSecurityGroupIngress",
        "AuthorizeSecurityGroupEgress",
        "RevokeSecurityGroupIngress",
        "RevokeSecurityGroupEgress",
        "ModifySecurityGroupRules",
        "CreateSecurityGroup",
        "DeleteSecurityGroup",
        "CreateNetworkAcl",
        "CreateNetworkAclEntry",
        "DeleteNetworkAcl",
        "DeleteNetworkAclEntry",
        "ReplaceNetworkAclEntry",
        "ReplaceNetworkAclAssociation",
        "DeleteCustomerGateway",
        "DeleteInternetGateway",
        "DetachInternetGateway",
        "DetachVpnGateway",
        "CreateRoute",
        "CreateRouteTable",
        "ReplaceRoute",
        "ReplaceRouteTableAssociation",
        "DeleteRouteTable",
        "DeleteRoute",
        "DisassociateRouteTable",
        "CreateVpc",
        "DeleteVpc",
        "ModifyVpcAttribute",
        "DeleteVpcPeeringConnection",
        "RejectVpcPeeringConnection",
        "CreateVpcEndpoint",
        "ModifyVpcEndpoint",
        "DeleteVpcEndpoints",
    ),
    # each of these can give the one-way network a second way out
    **_table(
        "ec2.amazonaws.com",
        _NETWORK_OPENED,
        "CreateInternetGateway",
        "AttachInternetGateway",
        "CreateNatGateway",
        "CreateCustomerGateway",
        "AttachVpnGateway",
        "CreateVpcPeeringConnection",
        "AcceptVpcPeeringConnection",
    ),
    # CIS 4.5, 4.7, 4.8, 4.9 and the path of these very alerts
    **_table("cloudtrail.amazonaws.com", _AUDIT_DISABLED, "StopLogging", "DeleteTrail"),
    **_table("cloudtrail.amazonaws.com", _AUDIT_WEAKENED, "UpdateTrail", "PutEventSelectors"),
    **_table("kms.amazonaws.com", _AUDIT_DISABLED, "DisableKey", "ScheduleKeyDeletion"),
    **_table("kms.amazonaws.com", _AUDIT_WEAKENED, "PutKeyPolicy"),
    **_table(
        "s3.amazonaws.com",
        _AUDIT_WEAKENED,
        "PutBucketPolicy",
        "DeleteBucketPolicy",
        "PutBucketAcl",
        "PutBucketPublicAccessBlock",
        "DeleteBucketPublicAccessBlock",
        "PutBucketLifecycle",
        "DeleteBucketLifecycle",
    ),
    **_table(
        "config.amazonaws.com",
        _AUDIT_DISABLED,
        "StopConfigurationRecorder",
        "DeleteConfigurationRecorder",
        "DeleteDeliveryChannel",
    ),
    **_table("config.amazonaws.com", _AUDIT_WEAKENED, "PutDeliveryChannel"),
    **_table(
        "ec2.amazonaws.com", _AUDIT_DISABLED, "DisableEbsEncryptionByDefault", "DeleteFlowLogs"
    ),
    **_table("ec2.amazonaws.com", _AUDIT_WEAKENED, "ResetEbsDefaultKmsKeyId"),
    # any rule or queue of the account: HIGH, since it may not be hpcfleet's own
    **_table("events.amazonaws.com", _AUDIT_WEAKENED, "DisableRule", "DeleteRule", "RemoveTargets"),
    **_table(
        "sqs.amazonaws.com", _AUDIT_WEAKENED, "DeleteQueue", "PurgeQueue", "SetQueueAttributes"
    ),
}

_API_CALL = "AWS API Call via CloudTrail"
_CONSOLE_SIGN_IN = "AWS Console Sign In via CloudTrail"

# requestParameters worth naming in "what", in this order
_TARGET_KEYS = (
    "roleName",
    "userName",
    "groupName",
    "policyName",
    "policyArn",
    "versionId",
    "name",
    "sAMLProviderArn",
    "groupId",
    "networkAclId",
    "routeTableId",
    "destinationCidrBlock",
    "vpcId",
    "internetGatewayId",
    "vpnGatewayId",
    "keyId",
    "bucketName",
    "queueUrl",
    "configurationRecorderName",
    "deliveryChannelName",
)


def classify_message(body: str) -> Alert | None:
    """Classify one raw SQS message body: an EventBridge envelope, or an SNS notification."""
    try:
        message = json.loads(body)
    except ValueError:
        return _unparsed(body, "the message is not JSON")
    if not isinstance(message, Mapping):
        return _unparsed(body, "the message is not a JSON object")
    if message.get("Type") == "Notification" and "TopicArn" in message:
        return _classify_sns(message, body)
    return classify(message)


def classify(envelope: Mapping[str, Any]) -> Alert | None:
    """Classify one EventBridge envelope; None when it is not a security event we alert on."""
    detail_type = envelope.get("detail-type")
    detail = envelope.get("detail")
    if not isinstance(detail_type, str) or not isinstance(detail, Mapping):
        return _unparsed(_digest_source(envelope), "no detail-type or detail")
    if detail_type not in (_API_CALL, _CONSOLE_SIGN_IN):
        return None
    event_name = _text(detail, "eventName")
    source = _text(detail, "eventSource")
    if event_name is None or source is None:
        return _unparsed(_digest_source(envelope), "a CloudTrail event without a name or source")

    identity = detail.get("userIdentity")
    identity = identity if isinstance(identity, Mapping) else {}
    failed = _text(detail, "errorCode") is not None or _text(detail, "errorMessage") is not None

    if _is_root(identity, detail):
        return _alert(_ROOT, envelope, detail, identity, f"{event_name}{_outcome(detail)}")
    if detail_type == _CONSOLE_SIGN_IN:
        return _classify_sign_in(envelope, detail, identity, event_name)
    kind = EVENT_KINDS.get((source, event_name))
    if kind is None:
        return None
    what = _describe(event_name, detail)
    if failed:
        attempted = Kind(kind.rule, kind.severity.lowered(), f"Attempted: {kind.title}")
        return _alert(attempted, envelope, detail, identity, f"{what}{_outcome(detail)}")
    return _alert(kind, envelope, detail, identity, what)


def _classify_sign_in(
    envelope: Mapping[str, Any],
    detail: Mapping[str, Any],
    identity: Mapping[str, Any],
    event_name: str,
) -> Alert | None:
    """IAM users without MFA only: AD FS users pass MFA at AD FS, which AWS cannot see."""
    if event_name != "ConsoleLogin" or identity.get("type") != "IAMUser":
        return None
    if _text(detail, "additionalEventData", "MFAUsed") == "Yes":
        return None
    result = _text(detail, "responseElements", "ConsoleLogin") or "unknown result"
    kind = _NO_MFA if result == "Success" else Kind(_NO_MFA.rule, Severity.MEDIUM, _NO_MFA.title)
    return _alert(kind, envelope, detail, identity, f"ConsoleLogin: {result}{_outcome(detail)}")


def _classify_sns(message: Mapping[str, Any], body: str) -> Alert | None:
    """Budgets notify by SNS with a free-text message; an envelope wrapped in SNS is unwrapped."""
    text = message.get("Message")
    try:
        inner = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        inner = None
    if isinstance(inner, Mapping) and "detail-type" in inner:
        return classify(inner)
    subject = message.get("Subject")
    if not (isinstance(subject, str) and subject.startswith("AWS Budgets")):
        return _unparsed(body, "an SNS notification that is not from AWS Budgets")
    forecast = isinstance(text, str) and "FORECASTED" in text
    severity = Severity.MEDIUM if forecast else Severity.HIGH
    message_id = message.get("MessageId")
    topic = str(message.get("TopicArn"))
    return Alert(
        key=f"sns:{message_id}" if isinstance(message_id, str) else _digest_key(body),
        rule=_BUDGET.rule,
        severity=severity,
        title=_BUDGET.title,
        what=subject + (f"\n{text}" if isinstance(text, str) else ""),
        who="AWS Budgets",
        account=_arn_part(topic, 4),
        region=_arn_part(topic, 3),
        source_ip=None,
        occurred_at=_time(message.get("Timestamp")),
    )


def _is_root(identity: Mapping[str, Any], detail: Mapping[str, Any]) -> bool:
    """Root itself, not an AWS service acting as root (CIS 4.3's filter)."""
    return (
        identity.get("type") == "Root"
        and "invokedBy" not in identity
        and detail.get("eventType") != "AwsServiceEvent"
    )


def _alert(
    kind: Kind,
    envelope: Mapping[str, Any],
    detail: Mapping[str, Any],
    identity: Mapping[str, Any],
    what: str,
) -> Alert:
    event_id = _text(detail, "eventID") or _text(envelope, "id")
    return Alert(
        # the CloudTrail id, not the envelope's: one event matched by two rules (root changing
        # an IAM policy) is delivered twice, and must stay one alert
        key=f"cloudtrail:{event_id}" if event_id else _digest_key(_digest_source(envelope)),
        rule=kind.rule,
        severity=kind.severity,
        title=f"{kind.title}: {_text(detail, 'eventName')}",
        what=what,
        who=_who(identity),
        account=_text(envelope, "account")
        or _text(detail, "recipientAccountId")
        or _text(identity, "accountId"),
        region=_text(detail, "awsRegion") or _text(envelope, "region"),
        source_ip=_text(detail, "sourceIPAddress"),
        occurred_at=_time(detail.get("eventTime")) or _time(envelope.get("time")),
    )


def _unparsed(source: str, reason: str) -> Alert:
    return Alert(
        key=_digest_key(source),
        rule=_UNPARSED.rule,
        severity=_UNPARSED.severity,
        title=_UNPARSED.title,
        what=f"{reason}; the raw message is kept with the alert",
        who="unknown",
        account=None,
        region=None,
        source_ip=None,
        occurred_at=None,
    )


def _who(identity: Mapping[str, Any]) -> str:
    """A person where CloudTrail names one: the session name of an AD FS role session."""
    kind = identity.get("type")
    arn = _text(identity, "arn")
    if kind == "Root":
        return f"root ({arn or _text(identity, 'accountId') or 'unknown account'})"
    if kind == "AssumedRole":
        principal = _text(identity, "principalId") or ""
        session = principal.partition(":")[2]
        role = _text(identity, "sessionContext", "sessionIssuer", "userName")
        if session and role:
            return f"{session} (role {role})"
    if kind == "IAMUser" and (name := _text(identity, "userName")):
        return f"IAM user {name}"
    if kind == "AWSService" and (service := _text(identity, "invokedBy")):
        return service
    return arn or _text(identity, "principalId") or "unknown"


def _describe(event_name: str, detail: Mapping[str, Any]) -> str:
    """The call and its target, plus the rule for security group and network ACL changes."""
    params = detail.get("requestParameters")
    if not isinstance(params, Mapping):
        return event_name
    named = [f"{key}={params[key]}" for key in _TARGET_KEYS if _scalar(params, key)]
    rules = _permissions(params) + _acl_entry(params)
    return f"{event_name} ({', '.join(named + rules)})" if named or rules else event_name


def _permissions(params: Mapping[str, Any]) -> list[str]:
    """Security group rules as "tcp 22-22 from/to 10.0.0.0/8" (CloudTrail's items lists)."""
    found = []
    for perm in _items(params.get("ipPermissions")):
        protocol = perm.get("ipProtocol", "?")
        ports = "all" if protocol == "-1" else f"{perm.get('fromPort')}-{perm.get('toPort')}"
        peers = [r.get("cidrIp") for r in _items(perm.get("ipRanges"))]
        peers += [r.get("cidrIpv6") for r in _items(perm.get("ipv6Ranges"))]
        peers += [g.get("groupId") for g in _items(perm.get("groups"))]
        peers += [p.get("prefixListId") for p in _items(perm.get("prefixListIds"))]
        found.append(f"{protocol} {ports} {'/'.join(str(p) for p in peers if p) or 'nowhere'}")
    return found


def _acl_entry(params: Mapping[str, Any]) -> list[str]:
    if "ruleNumber" not in params:
        return []
    direction = "egress" if params.get("egress") in (True, "true") else "ingress"
    ports = params.get("portRange")
    span = ""
    if isinstance(ports, Mapping) and "from" in ports:  # all-protocol entries have none
        span = f" ports {ports['from']}-{ports.get('to')}"
    return [
        f"rule {params.get('ruleNumber')} {params.get('ruleAction')} {direction}"
        f" protocol {params.get('protocol')} {params.get('cidrBlock')}{span}"
    ]


def _items(value: Any) -> list[Mapping[str, Any]]:
    items = value.get("items") if isinstance(value, Mapping) else None
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _outcome(detail: Mapping[str, Any]) -> str:
    code = _text(detail, "errorCode")
    message = _text(detail, "errorMessage")
    if code or message:
        return f" - refused: {': '.join(p for p in (code, message) if p)}"
    return ""


def _text(mapping: Mapping[str, Any], *path: str) -> str | None:
    """The string at `path`, or None when a step is missing or not of the expected type."""
    value: Any = mapping
    for step in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(step)
    return value if isinstance(value, str) and value else None


def _scalar(mapping: Mapping[str, Any], key: str) -> bool:
    return isinstance(mapping.get(key), str | int) and mapping.get(key) != ""


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _arn_part(arn: str, index: int) -> str | None:
    parts = arn.split(":")
    return (parts[index] or None) if len(parts) > index else None


def _digest_source(envelope: Mapping[str, Any]) -> str:
    return json.dumps(envelope, sort_keys=True, default=str)


def _digest_key(source: str) -> str:
    return "sha256:" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
