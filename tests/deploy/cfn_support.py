"""Reading the templates the way CloudFormation does, and talking to a moto server.

cfn-lint's decoder turns the YAML short forms (!Ref, !Sub, ...) into the JSON forms, so a test can
look at a template's structure and a template can be sent to moto as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from cfnlint.decode import decode

TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "cloudformation"
NAMES = ("network", "identity", "audit")

# every SAML-trusting role says "this provider": the one the stack made, or the one it was given
SAML_PRINCIPAL = {
    "Fn::If": ["CreateSamlProvider", {"Ref": "AdfsSamlProvider"}, {"Ref": "SamlProviderArn"}]
}

# one attempt: a moto NotImplemented is an answer, not something to retry four times
_CLIENT_CONFIG = Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"})
_SESSION = boto3.session.Session()  # one loader: service models are read once


def load(name: str) -> dict[str, Any]:
    """The template as a plain dict in JSON form; a template that does not parse fails here."""
    template, errors = decode(str(TEMPLATES / f"{name}.yaml"))
    assert not errors and template is not None, errors
    return dict(template)


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


def component_roles(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """hpcfleet component -> its role resource (the roles carry Metadata.hpcfleet.component)."""
    found = {}
    for role in resources(template, "AWS::IAM::Role").values():
        component = role.get("Metadata", {}).get("hpcfleet", {}).get("component")
        if component:
            found[component] = role
    return found


def statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        statement
        for policy in role["Properties"].get("Policies", [])
        for statement in policy["PolicyDocument"]["Statement"]
    ]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def actions(role: dict[str, Any]) -> set[str]:
    return {action for s in statements(role) for action in as_list(s["Action"])}


def client(endpoint: str, service: str, credentials: dict[str, str] | None = None) -> Any:
    """A boto3 client for the moto server: with the given STS credentials, or moto's defaults.

    Make clients in one thread (they share a session); use them from any thread.
    """
    keys = (
        {
            "aws_access_key_id": credentials["AccessKeyId"],
            "aws_secret_access_key": credentials["SecretAccessKey"],
            "aws_session_token": credentials["SessionToken"],
        }
        if credentials
        else {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    )
    return _SESSION.client(
        service, endpoint_url=endpoint, region_name="us-east-1", config=_CLIENT_CONFIG, **keys
    )
