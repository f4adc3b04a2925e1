"""Read and verify the SAML 2.0 response AD FS issues for AWS.

The response is attacker-reachable input (it passes through a browser or an HTTP client), so it is
parsed with DTDs and entities refused, its Assertion signature is checked against the pinned AD FS
token-signing certificate(s), and every value is read from the signed XML that the verifier
returns, never from the original tree, so that a signature-wrapping trick cannot swap the content.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import defusedxml.ElementTree
from cryptography import x509
from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from lxml import etree
from signxml import InvalidCertificate, InvalidDigest, InvalidInput, InvalidSignature, XMLVerifier
from signxml.verifier import SignatureConfiguration

SAMLP_NS = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
NS = {"samlp": SAMLP_NS, "saml": SAML_NS, "ds": DS_NS}

ROLE_ATTRIBUTE = "https://aws.amazon.com/SAML/Attributes/Role"
ROLE_SESSION_NAME_ATTRIBUTE = "https://aws.amazon.com/SAML/Attributes/RoleSessionName"
SESSION_DURATION_ATTRIBUTE = "https://aws.amazon.com/SAML/Attributes/SessionDuration"
AWS_RELYING_PARTY = "urn:amazon:webservices"
AWS_SIGNIN_URL = "https://signin.aws.amazon.com/saml"
STATUS_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"

# A real AD FS response is 5-15 KB; anything far larger is not one and is refused before parsing.
MAX_RESPONSE_BYTES = 256 * 1024
_ROLE_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}")


class SamlError(Exception):
    """The SAML response cannot be used; the message says why and never contains the response."""


class SamlMalformed(SamlError):
    """Not base64, not XML, a DTD or entity, or not the shape of a SAML 2.0 response for AWS."""


class SamlSignatureError(SamlError):
    """Unsigned, signed by another key, or changed after signing."""


class SamlStatusError(SamlError):
    """AD FS answered with a non-success status."""


class SamlIssuerError(SamlError):
    """Issued by another identity provider than the configured one."""


class SamlAudienceError(SamlError):
    """Meant for another relying party."""


class SamlRecipientError(SamlError):
    """Addressed (Destination / Recipient) to another endpoint."""


class SamlExpired(SamlError):
    """Past its NotOnOrAfter."""


class SamlNotYetValid(SamlError):
    """Before its NotBefore."""


class SamlRoleError(SamlError):
    """No usable AWS role, or not the role asked for."""


@dataclass(frozen=True)
class AwsRole:
    """One value of the Role attribute: the IAM role and the SAML provider that may assume it."""

    role_arn: str
    principal_arn: str


@dataclass(frozen=True)
class SamlTrust:
    """What a response must match: AD FS's token-signing certificates (two during a rollover)."""

    certificates: tuple[x509.Certificate, ...]
    issuer: str | None = None
    audiences: frozenset[str] = frozenset({AWS_RELYING_PARTY, AWS_SIGNIN_URL})
    recipients: frozenset[str] = frozenset({AWS_SIGNIN_URL})
    clock_skew: timedelta = timedelta(minutes=2)

    def __post_init__(self) -> None:
        if not self.certificates:
            raise ValueError("SamlTrust needs at least one AD FS token-signing certificate")


def load_certificates(pem: bytes | str) -> tuple[x509.Certificate, ...]:
    """Every certificate in a PEM bundle (AD FS publishes a primary and a secondary one)."""
    data = pem.encode() if isinstance(pem, str) else pem
    return tuple(x509.load_pem_x509_certificates(data))


@dataclass(frozen=True)
class SamlAssertion:
    """The verified content of a response; `response` is the base64 text to hand to STS."""

    response: str = field(repr=False)
    issuer: str
    name_id: str
    roles: tuple[AwsRole, ...]
    role_session_name: str
    session_duration: int | None
    audiences: tuple[str, ...]
    recipient: str
    not_before: datetime | None
    not_on_or_after: datetime
    attributes: Mapping[str, tuple[str, ...]] = field(repr=False)

    def role(self, role_arn: str) -> AwsRole:
        """The granted role with this ARN, or a clear error naming what is granted instead."""
        for role in self.roles:
            if role.role_arn == role_arn:
                return role
        granted = ", ".join(r.role_arn for r in self.roles)
        raise SamlRoleError(f"the assertion does not grant {role_arn}; it grants: {granted}")


def parse_role(value: str) -> AwsRole:
    """Split a Role value; AD FS claim rules emit either order of the role and provider ARNs."""
    parts = [part.strip() for part in value.split(",")]
    roles = [p for p in parts if p.startswith("arn:") and ":role/" in p]
    providers = [p for p in parts if p.startswith("arn:") and ":saml-provider/" in p]
    if len(parts) != 2 or len(roles) != 1 or len(providers) != 1:
        raise SamlRoleError(f"Role attribute value {value!r} is not a role ARN and a provider ARN")
    return AwsRole(role_arn=roles[0], principal_arn=providers[0])


def verify_response(saml_response: str, trust: SamlTrust, now: datetime) -> SamlAssertion:
    """Check a base64 SAMLResponse against `trust` at time `now` and return what it asserts."""
    root = _parse(_decode(saml_response))
    if root.tag != f"{{{SAMLP_NS}}}Response":
        raise SamlMalformed("the document is not a SAML 2.0 protocol Response")
    _check_status(root)
    if root.find("saml:EncryptedAssertion", NS) is not None:
        raise SamlMalformed(
            "encrypted assertions are not supported: turn off encryption on the AWS relying party"
        )
    assertions = root.findall(".//saml:Assertion", NS)
    if len(assertions) != 1 or assertions[0].getparent() is not root:
        raise SamlMalformed(
            f"expected exactly one Assertion directly in the Response, found {len(assertions)}"
        )
    assertion = _verify_signature(assertions[0], trust.certificates)

    issuer = _text(assertion.find("saml:Issuer", NS))
    if trust.issuer is not None and issuer != trust.issuer:
        raise SamlIssuerError(f"issued by {issuer!r}, expected {trust.issuer!r}")

    recipient, subject_not_after = _check_subject(assertion, trust)
    destination = root.get("Destination")
    if destination is not None and destination not in trust.recipients:
        raise SamlRecipientError(f"the response's Destination {destination!r} is not accepted")
    not_before, conditions_not_after, audiences = _check_conditions(assertion, trust)

    now = _aware(now)
    not_on_or_after = min(subject_not_after, conditions_not_after or subject_not_after)
    if now >= not_on_or_after + trust.clock_skew:
        raise SamlExpired(f"the assertion expired at {not_on_or_after.isoformat()}")
    if not_before is not None and now + trust.clock_skew < not_before:
        raise SamlNotYetValid(f"the assertion is not valid before {not_before.isoformat()}")

    attributes = _attributes(assertion)
    role_values = attributes.get(ROLE_ATTRIBUTE, ())
    if not role_values:
        raise SamlRoleError("the assertion carries no AWS Role attribute")
    return SamlAssertion(
        response=saml_response,
        issuer=issuer,
        name_id=_text(assertion.find("saml:Subject/saml:NameID", NS)),
        roles=tuple(parse_role(value) for value in role_values),
        role_session_name=_role_session_name(attributes),
        session_duration=_session_duration(attributes),
        audiences=audiences,
        recipient=recipient,
        not_before=not_before,
        not_on_or_after=not_on_or_after,
        attributes=MappingProxyType(dict(attributes)),
    )


def _decode(saml_response: str) -> bytes:
    if len(saml_response) > MAX_RESPONSE_BYTES * 4 // 3 + 4:
        raise SamlMalformed(f"the SAML response is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        return base64.b64decode(saml_response.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SamlMalformed("the SAML response is not valid base64") from None


def _parse(raw: bytes) -> etree._Element:
    """Refuse DTDs and entities first (defusedxml), then parse with a parser that cannot fetch."""
    try:
        defusedxml.ElementTree.fromstring(raw, forbid_dtd=True)
    except DTDForbidden:
        raise SamlMalformed(
            "the SAML response contains a DTD; DTDs are refused (entity expansion, XXE)"
        ) from None
    except (EntitiesForbidden, ExternalReferenceForbidden):
        raise SamlMalformed("the SAML response declares entities; entities are refused") from None
    except defusedxml.ElementTree.ParseError:
        raise SamlMalformed("the SAML response is not well-formed XML") from None
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_pis=True
    )
    try:
        return etree.fromstring(raw, parser=parser)
    except etree.XMLSyntaxError:
        raise SamlMalformed("the SAML response is not well-formed XML") from None


def _check_status(root: etree._Element) -> None:
    code = root.find("samlp:Status/samlp:StatusCode", NS)
    value = code.get("Value") if code is not None else None
    if value != STATUS_SUCCESS:
        message = _text(root.find("samlp:Status/samlp:StatusMessage", NS))
        raise SamlStatusError(f"AD FS returned status {value!r} {message}".strip())


def _verify_signature(
    assertion: etree._Element, certificates: Iterable[x509.Certificate]
) -> etree._Element:
    """Verify the Assertion as a standalone document (exc-c14n keeps its digest unchanged)."""
    if assertion.find("ds:Signature", NS) is None:
        raise SamlSignatureError(
            "the Assertion is not signed (the AWS relying party's SamlResponseSignature must be "
            "AssertionOnly or MessageAndAssertion)"
        )
    data = etree.tostring(assertion)
    config = SignatureConfiguration(location="./", expect_references=1)
    for certificate in certificates:
        try:
            result = XMLVerifier().verify(data, x509_cert=certificate, expect_config=config)
        except InvalidDigest:
            raise SamlSignatureError("the Assertion was changed after it was signed") from None
        except InvalidCertificate as exc:
            raise SamlSignatureError(
                f"the configured signing certificate is unusable: {exc}"
            ) from None
        except InvalidSignature:
            continue
        except (InvalidInput, etree.DocumentInvalid) as exc:
            raise SamlSignatureError(f"the Assertion's signature is unusable: {exc}") from None
        signed = result.signed_xml  # type: ignore[union-attr]
        if (
            signed is None
            or signed.tag != f"{{{SAML_NS}}}Assertion"
            or signed.get("ID") != assertion.get("ID")
        ):
            raise SamlSignatureError("the signature does not cover the whole Assertion")
        return signed
    raise SamlSignatureError(
        "the Assertion's signature does not match the configured AD FS token-signing certificate"
    )


def _check_subject(assertion: etree._Element, trust: SamlTrust) -> tuple[str, datetime]:
    confirmations = assertion.findall("saml:Subject/saml:SubjectConfirmation", NS)
    if len(confirmations) != 1 or confirmations[0].get("Method") != BEARER:
        raise SamlMalformed("expected exactly one bearer SubjectConfirmation")
    data = confirmations[0].find("saml:SubjectConfirmationData", NS)
    if data is None or data.get("Recipient") is None or data.get("NotOnOrAfter") is None:
        raise SamlMalformed("SubjectConfirmationData needs both Recipient and NotOnOrAfter")
    recipient = data.get("Recipient", "")
    if recipient not in trust.recipients:
        raise SamlRecipientError(f"the assertion's Recipient {recipient!r} is not accepted")
    return recipient, _time(data.get("NotOnOrAfter", ""))


def _check_conditions(
    assertion: etree._Element, trust: SamlTrust
) -> tuple[datetime | None, datetime | None, tuple[str, ...]]:
    conditions = assertion.find("saml:Conditions", NS)
    if conditions is None:
        raise SamlMalformed("the assertion has no Conditions (audience and validity window)")
    restrictions = conditions.findall("saml:AudienceRestriction", NS)
    if not restrictions:
        raise SamlAudienceError("the assertion names no audience")
    audiences: list[str] = []
    for restriction in restrictions:
        values = [_text(a) for a in restriction.findall("saml:Audience", NS)]
        if not trust.audiences.intersection(values):
            raise SamlAudienceError(f"the assertion is for {values}, not for this relying party")
        audiences.extend(values)
    not_before = conditions.get("NotBefore")
    not_after = conditions.get("NotOnOrAfter")
    return (
        _time(not_before) if not_before else None,
        _time(not_after) if not_after else None,
        tuple(audiences),
    )


def _attributes(assertion: etree._Element) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    for attribute in assertion.findall("saml:AttributeStatement/saml:Attribute", NS):
        name = attribute.get("Name", "")
        values = tuple(_text(v) for v in attribute.findall("saml:AttributeValue", NS))
        found[name] = found.get(name, ()) + values
    return found


def _role_session_name(attributes: Mapping[str, tuple[str, ...]]) -> str:
    values = attributes.get(ROLE_SESSION_NAME_ATTRIBUTE, ())
    if len(values) != 1 or not _ROLE_SESSION_NAME.fullmatch(values[0]):
        raise SamlMalformed("RoleSessionName must be one value of 2-64 characters [\\w+=,.@-]")
    return values[0]


def _session_duration(attributes: Mapping[str, tuple[str, ...]]) -> int | None:
    values = attributes.get(SESSION_DURATION_ATTRIBUTE, ())
    if not values:
        return None
    if len(values) != 1 or not values[0].isdigit() or not 900 <= int(values[0]) <= 43200:
        raise SamlMalformed("SessionDuration must be one whole number of seconds in 900-43200")
    return int(values[0])


def _text(element: etree._Element | None) -> str:
    """All text of an element, so a comment inside a value cannot truncate it."""
    return "".join(element.itertext()).strip() if element is not None else ""


def _time(value: str) -> datetime:
    try:
        return _aware(datetime.fromisoformat(value))
    except ValueError:
        raise SamlMalformed(f"{value!r} is not an xs:dateTime") from None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
