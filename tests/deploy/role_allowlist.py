"""What each hpcfleet component's code calls on AWS: the yardstick for its role in identity.yaml.

Kept by hand for now from the services' cloud calls (shared/cloud/aws.py, services/bakery/aws.py).
The issue's next step replaces these sets with the operations recorded from the test suite; the
tests that use them (test_deploy_identity.py, test_deploy_least_privilege.py) stay as they are.
"""

from __future__ import annotations

# RunInstances with an instance profile needs iam:PassRole on the node role: not an API call,
# so the recorded operations will never show it; it is granted on top, on that one role only.
PASS_NODE_ROLE = "iam:PassRole"

POOL = frozenset(
    {
        "ec2:RunInstances",
        "ec2:StartInstances",
        "ec2:StopInstances",
        "ec2:TerminateInstances",
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceStatus",
        "ec2:DescribeImages",
        "ec2:CreateTags",
        PASS_NODE_ROLE,
    }
)

BAKERY = frozenset(
    {
        "ec2:RunInstances",
        "ec2:CreateImage",
        "ec2:DescribeImages",
        "ec2:DeregisterImage",
        "ec2:DeleteSnapshot",
        "ec2:CopyImage",
        "ec2:EnableImageDeprecation",  # services/bakery/aws.py deprecate_image
        "ec2:TerminateInstances",
        "ec2:StopInstances",
        "ec2:DescribeInstances",
        "ec2:CreateTags",
        "ssm:SendCommand",
        "ssm:GetCommandInvocation",
        PASS_NODE_ROLE,
    }
)

AUTOGROW = frozenset({"ec2:DescribeInstances"})

# the alert service: read the security-event queue (and its dead letters), notify people
AUDIT = frozenset(
    {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sns:Publish",
    }
)

# people: what the services see, plus powering the pool's nodes by hand
OPERATOR = frozenset(
    {
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceStatus",
        "ec2:DescribeImages",
        "ec2:DescribeSnapshots",
        "ec2:DescribeVolumes",
        "ec2:DescribeTags",
        "ssm:ListCommands",
        "ssm:GetCommandInvocation",
        "ec2:StartInstances",
        "ec2:StopInstances",
    }
)

# people: the account's security configuration, read-only
AUDITOR = frozenset(
    {
        "budgets:ViewBudget",
        "cloudformation:DescribeStacks",
        "cloudformation:ListStacks",
        "cloudtrail:DescribeTrails",
        "cloudtrail:GetEventSelectors",
        "cloudtrail:GetTrailStatus",
        "cloudtrail:LookupEvents",
        "config:DescribeConfigurationRecorderStatus",
        "config:DescribeConfigurationRecorders",
        "config:DescribeDeliveryChannels",
        "config:GetResourceConfigHistory",
        "config:ListDiscoveredResources",
        "ec2:DescribeFlowLogs",
        "ec2:DescribeImages",
        "ec2:DescribeInstances",
        "ec2:DescribeNetworkAcls",
        "ec2:DescribeRouteTables",
        "ec2:DescribeSecurityGroupRules",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeSubnets",
        "ec2:DescribeVpcEndpoints",
        "ec2:DescribeVpcs",
        "ec2:GetEbsDefaultKmsKeyId",
        "ec2:GetEbsEncryptionByDefault",
        "events:DescribeRule",
        "events:ListRules",
        "events:ListTargetsByRule",
        "iam:GetAccountAuthorizationDetails",
        "iam:GetPolicy",
        "iam:GetPolicyVersion",
        "iam:GetRole",
        "iam:GetRolePolicy",
        "iam:GetSAMLProvider",
        "iam:ListAccessKeys",
        "iam:ListAttachedRolePolicies",
        "iam:ListRolePolicies",
        "iam:ListRoles",
        "iam:ListSAMLProviders",
        "iam:ListUsers",
        "kms:DescribeKey",
        "kms:GetKeyPolicy",
        "kms:GetKeyRotationStatus",
        "kms:ListAliases",
        "kms:ListKeys",
        "logs:DescribeLogGroups",
        "s3:GetBucketPolicy",
        "s3:GetBucketPublicAccessBlock",
        "s3:GetBucketVersioning",
        "s3:GetEncryptionConfiguration",
        "sqs:GetQueueAttributes",
        "sqs:ListQueues",
    }
)

ALLOWED: dict[str, frozenset[str]] = {
    "pool": POOL,
    "bakery": BAKERY,
    "autogrow": AUTOGROW,
    "audit": AUDIT,
    "operator": OPERATOR,
    "auditor": AUDITOR,
}

# granted to no component: the actions an attacker with a component's credentials would want
NEVER = frozenset(
    {
        "iam:PutRolePolicy",
        "iam:AttachRolePolicy",
        "iam:UpdateAssumeRolePolicy",
        "iam:CreateUser",
        "iam:CreateAccessKey",
        "ec2:AuthorizeSecurityGroupEgress",
        "ec2:CreateInternetGateway",
        "ec2:DisableEbsEncryptionByDefault",
        "cloudtrail:StopLogging",
        "kms:ScheduleKeyDeletion",
        "sqs:PurgeQueue",
        "events:DisableRule",
    }
)

READ_ONLY_VERBS = ("Describe", "Get", "List", "Lookup", "View")
