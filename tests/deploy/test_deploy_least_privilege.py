"""Each component role, signed in through SAML, can make exactly its own calls: proved on moto.

Moto's IAM evaluation is action-level only: it passes "*" as every EC2 resource, so a statement
with a resource ARN never matches, and it ignores conditions (notes section 4). The roles are
therefore loaded in their action-level projection (every Resource "*", no Condition); tag and
resource scoping are checked on the template by test_deploy_identity.py.

Every action a role is granted is called and must be authorised; every action another component is
granted and every action no component may have (NEVER) is called and must be refused. Calls carry
dummy parameters: moto authorises before it looks at them, so any answer but AccessDenied means
"allowed".

The server runs in a subprocess: moto's auth switch is process-wide, and a failure here must not
leave it on for other tests in this process.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError
from cfn_support import client, component_roles, load
from role_allowlist import ALLOWED, NEVER, PASS_NODE_ROLE, READ_ONLY_VERBS

# IAM action -> API operation, where the two names differ
OPERATIONS = {
    "s3:GetEncryptionConfiguration": "GetBucketEncryption",
    "s3:GetBucketPublicAccessBlock": "GetPublicAccessBlock",
    "budgets:ViewBudget": "DescribeBudgets",
}
# moto authorises these operations under the operation's name, not the IAM action AWS uses, so
# the auditor (granted the real names) is refused by moto: left out rather than tested wrongly
MOTO_MISNAMES = set(OPERATIONS)
# not an API call: RunInstances checks it, moto does not
UNCALLABLE = {PASS_NODE_ROLE}
pytestmark = pytest.mark.slow  # a server process and ~230 signed calls: several seconds

DENIED = ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError")

_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until terminated, or until the test process dies and the pipe closes
"""


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a request log line per call, and a traceback per moto 500
        text=True,
        env={**os.environ, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"},
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        yield f"http://127.0.0.1:{int(server.stdout.readline())}"
    finally:
        server.terminate()  # our own child; nothing in it needs a graceful stop
        server.communicate()  # reap it and close the pipes


def _action_level(role: dict[str, Any], drop: frozenset[str] = frozenset()) -> dict[str, str]:
    """Policy name -> document, every Resource widened to "*", Conditions and `drop` removed."""
    documents = {}
    for policy in role["Properties"]["Policies"]:
        statements = []
        for statement in policy["PolicyDocument"]["Statement"]:
            granted = [a for a in _listed(statement["Action"]) if a not in drop]
            if granted:
                statements.append(
                    {"Sid": statement["Sid"], "Effect": "Allow", "Action": granted, "Resource": "*"}
                )
        documents[policy["PolicyName"]] = json.dumps(
            {"Version": "2012-10-17", "Statement": statements}
        )
    return documents


def _listed(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _saml_assertion(role_arn: str, provider_arn: str) -> str:
    """The least moto needs: a Role attribute with one value and a session name (unsigned)."""
    attributes = "".join(
        f'<saml:Attribute Name="https://aws.amazon.com/SAML/Attributes/{name}">'
        f"<saml:AttributeValue>{value}</saml:AttributeValue></saml:Attribute>"
        for name, value in (("Role", f"{role_arn},{provider_arn}"), ("RoleSessionName", "probe"))
    )
    xml = (
        '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
        'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_r" Version="2.0">'
        '<saml:Assertion ID="_a" Version="2.0">'
        f"<saml:AttributeStatement>{attributes}</saml:AttributeStatement>"
        "</saml:Assertion></samlp:Response>"
    )
    return base64.b64encode(xml.encode()).decode()


@pytest.fixture(scope="module")
def credentials(endpoint: str) -> dict[str, dict[str, str]]:
    """STS credentials per role (and the mutant pool), fetched before auth is switched on."""
    iam = client(endpoint, "iam")
    provider = iam.create_saml_provider(
        Name="adfs", SAMLMetadataDocument="<EntityDescriptor/>".ljust(1000)
    )["SAMLProviderArn"]
    roles = component_roles(load("identity"))
    policies = {name: _action_level(roles[name]) for name in ALLOWED}
    # the pool exactly as deployed, but for one action: the test must see that action go
    policies["mutant-pool"] = _action_level(
        roles["pool"], drop=frozenset({"ec2:TerminateInstances"})
    )
    sts = client(endpoint, "sts")
    found = {}
    for name, documents in policies.items():
        # straight through IAM: moto keeps a CloudFormation role's inline policies as dicts,
        # which its own evaluator cannot read (test_deploy_moto.py proves the stack deploys)
        trust = roles["pool"]["Properties"]["AssumeRolePolicyDocument"]
        trust = {
            **trust,
            "Statement": [{**trust["Statement"][0], "Principal": {"Federated": provider}}],
        }
        arn = iam.create_role(
            RoleName=f"hpcfleet-{name}", AssumeRolePolicyDocument=json.dumps(trust)
        )["Role"]["Arn"]
        for policy_name, document in documents.items():
            iam.put_role_policy(
                RoleName=f"hpcfleet-{name}", PolicyName=policy_name, PolicyDocument=document
            )
        found[name] = sts.assume_role_with_saml(
            RoleArn=arn, PrincipalArn=provider, SAMLAssertion=_saml_assertion(arn, provider)
        )["Credentials"]
    # from here on every request is checked (moto's assume_role_with_saml fails once it is on)
    httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    return found


def _dummy(shape: Any) -> Any:
    """The smallest input botocore accepts: required members only, placeholder values."""
    kind = shape.type_name
    if kind == "structure":
        return {name: _dummy(shape.members[name]) for name in shape.required_members}
    if kind == "list":
        return [_dummy(shape.member)]
    if kind == "map":
        return {}
    if kind == "string":
        return shape.enum[0] if shape.enum else "probe".ljust(shape.metadata.get("min", 1), "x")
    if kind in ("integer", "long"):
        return max(1, int(shape.metadata.get("min", 1)))
    if kind in ("double", "float"):
        return 1.0
    if kind == "boolean":
        return False
    if kind == "timestamp":
        return datetime(2026, 1, 1, tzinfo=UTC)
    return b"probe"  # blob


def _clients(endpoint: str, creds: dict[str, str], actions: list[str]) -> dict[str, Any]:
    """One client per service, made up front: the service models are then parsed only once."""
    services = sorted({action.split(":")[0] for action in actions})
    return {service: client(endpoint, service, creds) for service in services}


def _allowed(clients: dict[str, Any], actions: list[str]) -> dict[str, bool]:
    """Whether moto lets these clients' credentials make each call (clients are thread-safe)."""
    results = {}
    for action in actions:
        service, name = action.split(":")
        api = clients[service]
        operation = OPERATIONS.get(action, name)
        shape = api.meta.service_model.operation_model(operation).input_shape
        try:
            getattr(api, xform_name(operation))(**(_dummy(shape) if shape else {}))
        except ClientError as error:
            results[action] = not _refused(error)
        except (BotoCoreError, ResponseParserError):  # moto's 500 page: authorised, then failed
            results[action] = True
        else:
            results[action] = True
    return results


def _refused(error: ClientError) -> bool:
    code = error.response["Error"]["Code"]
    status = error.response["ResponseMetadata"].get("HTTPStatusCode")
    # JSON services get moto's XML 403 body, which botocore reports as the code "403"
    return code.startswith(DENIED) or (code == "403" and status == 403)


def _probes(component: str) -> list[str]:
    """Its own actions, every other component's writes, and what no component may do."""
    others = {a for c, granted in ALLOWED.items() if c != component for a in granted}
    writes = {a for a in others if not a.split(":")[1].startswith(READ_ONLY_VERBS)}
    reads_of_services = {a for c in ("pool", "bakery", "autogrow", "audit") for a in ALLOWED[c]}
    wanted = ALLOWED[component] | writes | reads_of_services | NEVER
    return sorted(wanted - UNCALLABLE - MOTO_MISNAMES)


@pytest.fixture(scope="module")
def verdicts(endpoint: str, credentials: dict[str, dict[str, str]]) -> dict[str, dict[str, bool]]:
    probes = {c: _probes(c) for c in ALLOWED}
    clients = {c: _clients(endpoint, credentials[c], probes[c]) for c in ALLOWED}
    with ThreadPoolExecutor(max_workers=len(ALLOWED)) as pool:
        futures = {c: pool.submit(_allowed, clients[c], probes[c]) for c in ALLOWED}
        return {c: f.result() for c, f in futures.items()}


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_a_role_can_make_every_call_its_code_makes(
    verdicts: dict[str, dict[str, bool]], component: str
) -> None:
    refused = sorted(
        a for a, ok in verdicts[component].items() if a in ALLOWED[component] and not ok
    )
    assert not refused


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_a_role_cannot_make_the_calls_of_other_components(
    verdicts: dict[str, dict[str, bool]], component: str
) -> None:
    let_through = sorted(
        a for a, ok in verdicts[component].items() if a not in ALLOWED[component] and ok
    )
    assert not let_through


def test_a_pool_role_without_terminate_cannot_terminate(
    endpoint: str, credentials: dict[str, dict[str, str]]
) -> None:
    calls = ["ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]
    assert _allowed(_clients(endpoint, credentials["mutant-pool"], calls), calls) == {
        "ec2:TerminateInstances": False,
        "ec2:StopInstances": True,
        "ec2:StartInstances": True,
    }
    pool = _clients(endpoint, credentials["pool"], calls)
    assert _allowed(pool, calls[:1]) == {"ec2:TerminateInstances": True}


def test_unsigned_default_credentials_are_refused(
    endpoint: str, credentials: dict[str, dict[str, str]]
) -> None:
    """Auth is really on: moto's default test keys belong to no one."""
    with pytest.raises(ClientError) as refused:
        client(endpoint, "ec2").describe_instances()
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] in (401, 403)
