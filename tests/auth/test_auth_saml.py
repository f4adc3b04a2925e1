"""SAML parsing and verification: what AD FS really sends passes, every forgery is refused."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from datetime import timedelta

import pytest
from auth_kit import ISSUER, PROVIDER, USERS, role_arn
from lxml import etree

from services.auth.devidp import DevIdp, SigningKeyPair
from services.auth.saml import (
    NS,
    AwsRole,
    SamlAudienceError,
    SamlExpired,
    SamlIssuerError,
    SamlMalformed,
    SamlNotYetValid,
    SamlRecipientError,
    SamlRoleError,
    SamlSignatureError,
    SamlStatusError,
    SamlTrust,
    load_certificates,
    parse_role,
    verify_response,
)
from shared.clock import ManualClock

ALICE, _, _, MULTI = USERS


def _xml(response: str) -> etree._Element:
    return etree.fromstring(base64.b64decode(response))


def _b64(root: etree._Element) -> str:
    return base64.b64encode(etree.tostring(root)).decode()


def test_a_signed_adfs_response_verifies(idp: DevIdp, trust: SamlTrust, clock: ManualClock) -> None:
    response = idp.issue_response(ALICE)

    assertion = verify_response(response, trust, clock.now())

    assert assertion.response == response
    assert assertion.issuer == ISSUER
    assert assertion.name_id == "EXAMPLE\\alice"
    assert assertion.roles == (AwsRole(role_arn("operator"), PROVIDER),)
    assert assertion.role_session_name == "alice@example.test"
    assert assertion.session_duration == 3600
    assert assertion.audiences == ("urn:amazon:webservices",)
    assert assertion.recipient == "https://signin.aws.amazon.com/saml"
    assert assertion.not_on_or_after == clock.now() + timedelta(minutes=5)
    assert response not in repr(assertion)  # kept out of logs


def test_roles_are_read_in_either_order(idp: DevIdp, trust: SamlTrust, clock: ManualClock) -> None:
    assertion = verify_response(idp.issue_response(MULTI), trust, clock.now())

    assert assertion.roles == (
        AwsRole(role_arn("pool"), PROVIDER),
        AwsRole(role_arn("bakery"), PROVIDER),
    )
    assert assertion.role(role_arn("bakery")).principal_arn == PROVIDER
    with pytest.raises(SamlRoleError, match=r"does not grant .*hpcfleet-operator"):
        assertion.role(role_arn("operator"))


@pytest.mark.parametrize(
    "value",
    [
        "arn:aws:iam::1:role/a",
        "arn:aws:iam::1:role/a,arn:aws:iam::1:role/b",
        "arn:aws:iam::1:saml-provider/p,arn:aws:iam::1:saml-provider/q",
        "arn:aws:iam::1:role/a,arn:aws:iam::1:saml-provider/p,extra",
        "not-an-arn,arn:aws:iam::1:saml-provider/p",
    ],
)
def test_a_malformed_role_value_is_refused(value: str) -> None:
    with pytest.raises(SamlRoleError, match="is not a role ARN and a provider ARN"):
        parse_role(value)


def test_a_tampered_assertion_is_refused(idp: DevIdp, trust: SamlTrust, clock: ManualClock) -> None:
    root = _xml(idp.issue_response(ALICE))
    value = root.find(".//saml:Attribute[@Name='https://aws.amazon.com/SAML/Attributes/Role']", NS)
    assert value is not None
    value[0].text = f"{PROVIDER},{role_arn('admin')}"

    with pytest.raises(SamlSignatureError, match="changed after it was signed"):
        verify_response(_b64(root), trust, clock.now())


def test_a_response_signed_by_another_key_is_refused(
    idp: DevIdp, other_signing: SigningKeyPair, clock: ManualClock
) -> None:
    other = SamlTrust(load_certificates(other_signing.cert_pem))

    with pytest.raises(SamlSignatureError, match="does not match the configured"):
        verify_response(idp.issue_response(ALICE), other, clock.now())


def test_either_certificate_of_a_rollover_is_accepted(
    idp: DevIdp, signing: SigningKeyPair, other_signing: SigningKeyPair, clock: ManualClock
) -> None:
    both = load_certificates(other_signing.cert_pem + signing.cert_pem)
    assert len(both) == 2

    verify_response(idp.issue_response(ALICE), SamlTrust(both), clock.now())


def test_an_unsigned_assertion_is_refused(
    idp: DevIdp, trust: SamlTrust, clock: ManualClock
) -> None:
    root = _xml(idp.issue_response(ALICE))
    signature = root.find("saml:Assertion/ds:Signature", NS)
    assert signature is not None
    signature.getparent().remove(signature)

    with pytest.raises(SamlSignatureError, match="not signed"):
        verify_response(_b64(root), trust, clock.now())


def test_a_wrapped_second_assertion_is_refused(
    idp: DevIdp, trust: SamlTrust, clock: ManualClock
) -> None:
    """Signature wrapping: the genuine assertion is hidden deeper, a forged one put in its place."""
    root = _xml(idp.issue_response(ALICE))
    genuine = root.find("saml:Assertion", NS)
    assert genuine is not None
    forged = copy.deepcopy(genuine)
    forged.find(".//saml:NameID", NS).text = "EXAMPLE\\mallory"
    extensions = etree.SubElement(root, "{urn:oasis:names:tc:SAML:2.0:protocol}Extensions")
    root.replace(genuine, forged)
    extensions.append(genuine)

    with pytest.raises(SamlMalformed, match="exactly one Assertion"):
        verify_response(_b64(root), trust, clock.now())


def test_a_wrong_audience_is_refused(
    make_idp: Callable[..., DevIdp], trust: SamlTrust, clock: ManualClock
) -> None:
    idp = make_idp(relying_party="urn:example:some-other-app")

    with pytest.raises(SamlAudienceError, match="urn:example:some-other-app"):
        verify_response(idp.issue_response(ALICE), trust, clock.now())


def test_a_wrong_recipient_is_refused(
    make_idp: Callable[..., DevIdp], trust: SamlTrust, clock: ManualClock
) -> None:
    idp = make_idp(recipient="https://evil.example/saml")

    with pytest.raises(SamlRecipientError, match=r"evil\.example"):
        verify_response(idp.issue_response(ALICE), trust, clock.now())


def test_another_issuer_is_refused(
    make_idp: Callable[..., DevIdp], trust: SamlTrust, clock: ManualClock
) -> None:
    idp = make_idp(issuer="http://rogue.example/adfs/services/trust")

    with pytest.raises(SamlIssuerError, match=r"rogue\.example"):
        verify_response(idp.issue_response(ALICE), trust, clock.now())


def test_the_validity_window_is_enforced_with_a_small_skew(
    idp: DevIdp, trust: SamlTrust, clock: ManualClock
) -> None:
    response = idp.issue_response(ALICE)
    issued = clock.now()

    verify_response(response, trust, issued + timedelta(minutes=6))  # 5 min + 2 min skew
    verify_response(response, trust, issued - timedelta(minutes=1))
    with pytest.raises(SamlExpired, match="expired at"):
        verify_response(response, trust, issued + timedelta(minutes=7))
    with pytest.raises(SamlNotYetValid, match="not valid before"):
        verify_response(response, trust, issued - timedelta(minutes=3))


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol">&xxe;</samlp:Response>"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol">&lol4;</samlp:Response>"""


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (XXE, "contains a DTD"),
        (BILLION_LAUGHS, "contains a DTD"),
        (b"<samlp:Response", "not well-formed"),
        (b"<html/>", "not a SAML 2.0 protocol Response"),
    ],
    ids=["xxe", "billion-laughs", "truncated", "not-saml"],
)
def test_hostile_or_broken_xml_is_refused(
    payload: bytes, message: str, trust: SamlTrust, clock: ManualClock
) -> None:
    with pytest.raises(SamlMalformed, match=message):
        verify_response(base64.b64encode(payload).decode(), trust, clock.now())


@pytest.mark.parametrize(
    ("response", "message"),
    [("not base64 at all!", "not valid base64"), ("A" * 400_000, "larger than")],
)
def test_bad_transport_encoding_is_refused(
    response: str, message: str, trust: SamlTrust, clock: ManualClock
) -> None:
    with pytest.raises(SamlMalformed, match=message):
        verify_response(response, trust, clock.now())


def test_a_failure_status_is_reported(idp: DevIdp, trust: SamlTrust, clock: ManualClock) -> None:
    root = _xml(idp.issue_response(ALICE))
    code = root.find("samlp:Status/samlp:StatusCode", NS)
    assert code is not None
    code.set("Value", "urn:oasis:names:tc:SAML:2.0:status:Responder")

    with pytest.raises(SamlStatusError, match="status:Responder"):
        verify_response(_b64(root), trust, clock.now())
