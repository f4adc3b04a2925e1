"""network.yaml is one-way: the company network connects in, nothing in the VPC connects out.

Checked on the template, because moto skips network ACLs and SecurityGroupEgress and ignores
inline egress rules (test_deploy_moto.py shows that): these tests are the proof, moto is not.
"""

from __future__ import annotations

from typing import Any

import pytest
from cfn_support import as_list, load, resources

TEMPLATE = load("network")
COMPANY = {"Ref": "CompanyCidr"}
VPC = {"Ref": "VpcCidr"}
EPHEMERAL = (1024, 65535)
TCP = 6


def _egress_rules() -> list[dict[str, Any]]:
    """Every security group egress rule, inline or a separate resource."""
    rules = [
        rule
        for group in resources(TEMPLATE, "AWS::EC2::SecurityGroup").values()
        for rule in group["Properties"].get("SecurityGroupEgress", [])
    ]
    rules += [
        r["Properties"] for r in resources(TEMPLATE, "AWS::EC2::SecurityGroupEgress").values()
    ]
    return rules


def test_every_security_group_replaces_the_default_allow_all_egress() -> None:
    for name, group in resources(TEMPLATE, "AWS::EC2::SecurityGroup").items():
        assert group["Properties"].get("SecurityGroupEgress"), (
            f"{name} keeps AWS's allow-all egress"
        )


def test_no_security_group_rule_lets_the_vpc_open_a_connection_to_the_company() -> None:
    """Security groups are stateful: an egress rule is what lets a node *start* a connection."""
    destinations = set()
    for rule in _egress_rules():
        destination = (
            rule.get("CidrIp")
            or rule.get("DestinationPrefixListId")
            or rule.get("DestinationSecurityGroupId")
        )
        assert destination is not None, rule
        destinations.add(str(destination))
    # inside the VPC, the S3 prefix list, and the loopback "no egress" marker: nothing else
    assert destinations == {str(VPC), str({"Ref": "S3PrefixListId"}), "127.0.0.1/32"}
    assert not any("0.0.0.0/0" in d or "CompanyCidr" in d for d in destinations)


def test_the_company_may_connect_in_on_ssh_the_scheduler_port_and_path_mtu_only() -> None:
    group = TEMPLATE["Resources"]["NodeSecurityGroup"]["Properties"]
    from_company = [r for r in group["SecurityGroupIngress"] if r.get("CidrIp") == COMPANY]
    assert {(r["IpProtocol"], str(r["FromPort"]), str(r["ToPort"])) for r in from_company} == {
        ("tcp", "22", "22"),
        ("tcp", str({"Ref": "SchedulerFromPort"}), str({"Ref": "SchedulerToPort"})),
        ("icmp", "3", "4"),  # type 3 code 4: fragmentation needed
    }


def _number(value: Any) -> int:
    """A literal, or a parameter's default (the scheduler port range)."""
    if isinstance(value, dict):
        value = TEMPLATE["Parameters"][value["Ref"]]["Default"]
    return int(value)


def _acl_first_match(egress: bool, cidr: object, protocol: int, port: int) -> str:
    """The action of the first entry (lowest rule number) that matches: how a NACL decides."""
    entries = sorted(
        (e["Properties"] for e in resources(TEMPLATE, "AWS::EC2::NetworkAclEntry").values()),
        key=lambda e: int(e["RuleNumber"]),
    )
    for entry in entries:
        if entry["Egress"] != egress or entry["CidrBlock"] not in (cidr, "0.0.0.0/0"):
            continue
        if int(entry["Protocol"]) not in (-1, protocol):
            continue
        ports = entry.get("PortRange")
        if ports and not _number(ports["From"]) <= port <= _number(ports["To"]):
            continue
        return str(entry["RuleAction"])
    return "deny"  # the implicit last rule


@pytest.mark.parametrize("port", [22, 53, 88, 135, 389, 443, 445, 636, 873])
@pytest.mark.parametrize("protocol", [TCP, 17])
def test_the_network_acl_denies_the_company_s_service_ports_to_the_vpc(
    protocol: int, port: int
) -> None:
    """The stateless backstop: even with a wrong security group, no well-known port outward."""
    assert _acl_first_match(True, COMPANY, protocol, port) == "deny"


def test_the_network_acl_lets_replies_to_the_company_through_and_nothing_but_tcp() -> None:
    assert _acl_first_match(True, COMPANY, TCP, 50000) == "allow"
    assert _acl_first_match(True, COMPANY, 17, 50000) == "deny"
    for entry in resources(TEMPLATE, "AWS::EC2::NetworkAclEntry").values():
        props = entry["Properties"]
        if props["Egress"] and props["CidrBlock"] == COMPANY and props["RuleAction"] == "allow":
            assert int(props["Protocol"]) == TCP
            assert (int(props["PortRange"]["From"]), int(props["PortRange"]["To"])) == EPHEMERAL


def test_the_network_acl_lets_the_company_in_on_the_same_ports_as_the_security_group() -> None:
    assert _acl_first_match(False, COMPANY, TCP, 22) == "allow"
    assert _acl_first_match(False, COMPANY, TCP, 3389) == "deny"


def test_every_private_subnet_uses_the_network_acl() -> None:
    subnets = set(resources(TEMPLATE, "AWS::EC2::Subnet"))
    associated = {
        a["Properties"]["SubnetId"]["Ref"]
        for a in resources(TEMPLATE, "AWS::EC2::SubnetNetworkAclAssociation").values()
    }
    assert associated == subnets


def test_there_is_no_way_to_the_internet() -> None:
    for kind in ("AWS::EC2::InternetGateway", "AWS::EC2::NatGateway", "AWS::EC2::EIP"):
        assert not resources(TEMPLATE, kind), kind
    for route in resources(TEMPLATE, "AWS::EC2::Route").values():
        assert route["Properties"]["DestinationCidrBlock"] == COMPANY
    for subnet in resources(TEMPLATE, "AWS::EC2::Subnet").values():
        assert subnet["Properties"]["MapPublicIpOnLaunch"] is False


def test_the_private_subnets_sit_in_three_different_zones() -> None:
    zones = [
        s["Properties"]["AvailabilityZone"]["Fn::Select"][0]
        for s in resources(TEMPLATE, "AWS::EC2::Subnet").values()
    ]
    assert sorted(zones) == [0, 1, 2]


def test_nodes_reach_the_aws_apis_they_use_through_endpoints() -> None:
    services = {}
    for endpoint in resources(TEMPLATE, "AWS::EC2::VPCEndpoint").values():
        props = endpoint["Properties"]
        name = props["ServiceName"]["Fn::Sub"].rsplit(".", 1)[1]
        services[name] = props["VpcEndpointType"]
        if props["VpcEndpointType"] == "Interface":
            assert props["PrivateDnsEnabled"] is True
            assert props["SecurityGroupIds"] == [{"Ref": "EndpointSecurityGroup"}]
    assert services == {
        "s3": "Gateway",
        **dict.fromkeys(
            ["ec2", "ec2messages", "ssm", "ssmmessages", "sts", "logs", "kms", "sqs"], "Interface"
        ),
    }


def test_flow_logs_record_all_traffic_of_the_vpc() -> None:
    (flow_log,) = resources(TEMPLATE, "AWS::EC2::FlowLog").values()
    assert flow_log["Properties"]["ResourceId"] == {"Ref": "Vpc"}
    assert flow_log["Properties"]["TrafficType"] == "ALL"
    role = TEMPLATE["Resources"]["FlowLogRole"]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "vpc-flow-logs.amazonaws.com"}
    assert set(as_list(role["Policies"][0]["PolicyDocument"]["Statement"][0]["Action"])) == {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "logs:DescribeLogStreams",
    }
