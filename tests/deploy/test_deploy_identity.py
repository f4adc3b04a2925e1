"""identity.yaml: SAML-only trust, least privilege per component, no long-term credentials.

These read the template; test_deploy_least_privilege.py proves the same roles against moto's IAM
evaluator. Tag and resource scoping can only be checked here: moto ignores both (notes section 4).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from cfn_support import (
    NAMES,
    SAML_PRINCIPAL,
    TEMPLATES,
    actions,
    as_list,
    component_roles,
    load,
    resources,
    statements,
)
from role_allowlist import ALLOWED, AUDITOR, PASS_NODE_ROLE, READ_ONLY_VERBS

TEMPLATE = load("identity")
ROLES = component_roles(TEMPLATE)
ALL = {name: load(name) for name in NAMES}

# roles that AWS services assume, and the one service each trusts
SERVICE_ROLES = {
    ("identity", "NodeRole"): {"Fn::Sub": "ec2.${AWS::URLSuffix}"},
    ("identity", "EbsDefaultEncryptionRole"): {"Fn::Sub": "ssm.${AWS::URLSuffix}"},
    ("network", "FlowLogRole"): "vpc-flow-logs.amazonaws.com",
    ("audit", "ConfigRole"): "config.amazonaws.com",
}


def _all_roles() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (name, logical): role
        for name, template in ALL.items()
        for logical, role in resources(template, "AWS::IAM::Role").items()
    }


def _condition_on(statement: dict[str, Any], key: str) -> Any:
    """The value a statement's condition requires for `key`, under any operator."""
    for operator in statement.get("Condition", {}).values():
        if key in operator:
            return operator[key]
    return None


def test_there_is_one_role_per_component() -> None:
    assert set(ROLES) == set(ALLOWED) | {"node"}


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_a_component_role_trusts_only_the_ad_fs_provider(component: str) -> None:
    props = ROLES[component]["Properties"]
    (trust,) = props["AssumeRolePolicyDocument"]["Statement"]
    assert trust == {
        "Effect": "Allow",
        "Principal": {"Federated": SAML_PRINCIPAL},
        "Action": "sts:AssumeRoleWithSAML",
        "Condition": {"StringEquals": {"SAML:aud": "https://signin.aws.amazon.com/saml"}},
    }
    # the auth service and AD FS claim rules find the role by this name
    assert props["RoleName"] == {"Fn::Sub": f"${{NamePrefix}}-{component}"}


def test_every_other_role_is_assumed_by_exactly_one_aws_service() -> None:
    others = {key: role for key, role in _all_roles().items() if key in SERVICE_ROLES}
    assert set(others) == set(SERVICE_ROLES), "a new service role needs a line in SERVICE_ROLES"
    for key, role in others.items():
        (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": SERVICE_ROLES[key]}, key
        assert trust["Action"] == "sts:AssumeRole", key
    for key, role in _all_roles().items():
        assert key in others or role.get("Metadata", {}).get("hpcfleet"), key


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_a_role_grants_nothing_its_code_does_not_call(component: str) -> None:
    assert actions(ROLES[component]) <= ALLOWED[component]


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_a_role_grants_everything_its_code_calls(component: str) -> None:
    assert ALLOWED[component] <= actions(ROLES[component])


def test_no_policy_anywhere_uses_a_wildcard_action_or_a_negation() -> None:
    for key, role in _all_roles().items():
        for statement in statements(role):
            assert statement["Effect"] == "Allow", key
            assert not {"NotAction", "NotResource", "NotPrincipal"} & set(statement), key
            for action in as_list(statement["Action"]):
                assert "*" not in action, f"{key}: {action}"


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_only_reads_apply_to_every_resource(component: str) -> None:
    """A write on Resource "*" would reach other teams' instances, images, queues."""
    for statement in statements(ROLES[component]):
        if statement["Resource"] == "*":
            for action in as_list(statement["Action"]):
                assert action.split(":")[1].startswith(READ_ONLY_VERBS), action


def test_the_auditor_only_reads() -> None:
    assert all(a.split(":")[1].startswith(READ_ONLY_VERBS) for a in AUDITOR)
    assert not {"s3:GetObject", "secretsmanager:GetSecretValue", "ssm:GetParameter"} & AUDITOR


@pytest.mark.parametrize("component", ["pool", "operator"])
def test_power_actions_reach_only_instances_tagged_with_the_pool(component: str) -> None:
    power = {"ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"}
    scoped = [s for s in statements(ROLES[component]) if power & set(as_list(s["Action"]))]
    assert scoped
    for statement in scoped:
        assert _condition_on(statement, "ec2:ResourceTag/hpcfleet:pool") == {"Ref": "PoolName"}


def test_pool_launches_only_tagged_nodes_from_bakery_images_into_the_cluster_vpc() -> None:
    launches = [s for s in statements(ROLES["pool"]) if "ec2:RunInstances" in as_list(s["Action"])]
    for statement in launches:
        kinds = {
            re.sub(r".*:(\w[\w-]*)/\*$", r"\1", r["Fn::Sub"])
            for r in as_list(statement["Resource"])
        }
        if kinds & {"instance", "volume"}:
            assert _condition_on(statement, "aws:RequestTag/hpcfleet:pool") == {"Ref": "PoolName"}
        elif kinds == {"image"}:
            assert _condition_on(statement, "ec2:ResourceTag/hpcfleet:build") == "false"
        else:
            assert kinds == {"subnet", "security-group", "network-interface"}
            assert "${VpcId}" in _condition_on(statement, "ec2:Vpc")["Fn::Sub"]


def test_bakery_changes_only_what_carries_its_tag() -> None:
    guarded = {"ec2:StopInstances", "ec2:TerminateInstances", "ec2:DeregisterImage"}
    guarded |= {"ec2:DeleteSnapshot", "ec2:CopyImage", "ec2:EnableImageDeprecation"}
    for statement in statements(ROLES["bakery"]):
        granted = set(as_list(statement["Action"]))
        if granted & guarded:
            assert "false" in (
                _condition_on(statement, "ec2:ResourceTag/hpcfleet:build"),
                _condition_on(statement, "aws:RequestTag/hpcfleet:build"),
            ), statement["Sid"]
        if granted == {"ssm:SendCommand"} and "instance" in str(statement["Resource"]):
            assert _condition_on(statement, "ssm:resourceTag/hpcfleet:build") == "false"


def test_tags_can_be_set_at_creation_but_ownership_tags_never_changed_later() -> None:
    for component in ("pool", "bakery"):
        for statement in statements(ROLES[component]):
            if as_list(statement["Action"]) != ["ec2:CreateTags"]:
                continue
            at_creation = _condition_on(statement, "ec2:CreateAction")
            keys = _condition_on(statement, "aws:TagKeys")
            assert at_creation or set(keys) == {"hpcfleet:pool", "hpcfleet:build"}


def test_only_the_node_role_can_be_passed_and_only_to_ec2() -> None:
    for component, role in ROLES.items():
        for statement in statements(role):
            if PASS_NODE_ROLE in as_list(statement["Action"]):
                assert component in ("pool", "bakery")
                assert statement["Resource"] == {"Fn::GetAtt": ["NodeRole", "Arn"]}
                assert _condition_on(statement, "iam:PassedToService") == {
                    "Fn::Sub": "ec2.${AWS::URLSuffix}"
                }


def test_the_node_profile_holds_nothing_but_the_ssm_agent_and_its_logs() -> None:
    granted = actions(ROLES["node"])
    assert {a.split(":")[0] for a in granted} == {"ssm", "ssmmessages", "ec2messages", "logs"}
    assert {a for a in granted if a.startswith("logs:")} == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
    assert not {a for a in granted if a.startswith("ssm:Get") and "Parameter" in a}
    profile = TEMPLATE["Resources"]["NodeInstanceProfile"]["Properties"]
    assert profile["Roles"] == [{"Ref": "NodeRole"}]


def test_no_iam_users_groups_or_access_keys_anywhere() -> None:
    forbidden = {"AWS::IAM::User", "AWS::IAM::AccessKey", "AWS::IAM::Group"}
    forbidden |= {"AWS::IAM::UserToGroupAddition", "AWS::IAM::UserPolicy"}
    for name, template in ALL.items():
        used = {r["Type"] for r in template["Resources"].values()}
        assert not used & forbidden, name
    for path in TEMPLATES.iterdir():
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", path.read_text()), path


def test_only_the_config_service_role_uses_an_aws_managed_policy() -> None:
    managed = {k: r for k, r in _all_roles().items() if r["Properties"].get("ManagedPolicyArns")}
    assert set(managed) == {("audit", "ConfigRole")}


def test_the_audit_role_names_exactly_the_queues_and_topic_audit_yaml_creates() -> None:
    audit = ALL["audit"]["Resources"]
    created = {
        audit["SecurityEventsQueue"]["Properties"]["QueueName"]["Fn::Sub"],
        audit["SecurityEventsDeadLetterQueue"]["Properties"]["QueueName"]["Fn::Sub"],
        audit["AlertTopic"]["Properties"]["TopicName"]["Fn::Sub"],
    }
    named = {
        r["Fn::Sub"].rsplit(":", 1)[1]
        for s in statements(ROLES["audit"])
        for r in as_list(s["Resource"])
    }
    assert named == created


def test_ebs_volumes_are_encrypted_by_default_with_a_rotating_key_used_only_through_ec2() -> None:
    key = TEMPLATE["Resources"]["EbsKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    for statement in key["KeyPolicy"]["Statement"]:
        if statement["Principal"] == {"AWS": "*"}:
            assert _condition_on(statement, "kms:ViaService") == {
                "Fn::Sub": "ec2.${AWS::Region}.amazonaws.com"
            }
            assert _condition_on(statement, "kms:CallerAccount") == {"Ref": "AWS::AccountId"}
    association = TEMPLATE["Resources"]["EbsDefaultEncryption"]["Properties"]
    assert association["Name"] == {"Ref": "EbsDefaultEncryptionRunbook"}
    assert association["Parameters"]["KmsKeyId"] == [{"Fn::GetAtt": ["EbsKey", "Arn"]}]
    steps = TEMPLATE["Resources"]["EbsDefaultEncryptionRunbook"]["Properties"]["Content"]
    assert [s["inputs"]["Api"] for s in steps["mainSteps"]] == [
        "ModifyEbsDefaultKmsKeyId",
        "EnableEbsEncryptionByDefault",
        "GetEbsEncryptionByDefault",
    ]
