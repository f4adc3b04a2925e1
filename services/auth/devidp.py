"""A development identity provider that stands in for AD FS.

AD FS runs only on Windows Server, yet the single-process mode and the tests need a sign-in that
goes through the same pages, forms, cookies and signed SAML as production. This app serves AD FS's
IdP-initiated sign-on flow (forms auth, the MSISAuth cookie hop, an MFA page, `errorText` error
pages) and signs real SAML responses the way AD FS does (Assertion only, RSA-SHA256, exc-c14n).
It is a development tool: it refuses to start unless told the environment is development.
"""

from __future__ import annotations

import base64
import html
import ipaddress
import secrets
import ssl
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import XMLSigner, methods
from signxml.algorithms import CanonicalizationMethod
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from services.auth.saml import (
    AWS_RELYING_PARTY,
    AWS_SIGNIN_URL,
    BEARER,
    DS_NS,
    ROLE_ATTRIBUTE,
    ROLE_SESSION_NAME_ATTRIBUTE,
    SAML_NS,
    SAMLP_NS,
    SESSION_DURATION_ATTRIBUTE,
    STATUS_SUCCESS,
)
from shared.clock import Clock

SIGN_ON_PAGES = ("idpinitiatedsignon.aspx", "idpinitiatedsignon")
AUTH_COOKIE = "MSISAuth"
MFA_METHOD = "SecurIDAuthentication"
BAD_CREDENTIALS = (
    "Incorrect user ID or password. Type the correct user ID and password, and try again."
)
BAD_USERNAME_FORMAT = 'Enter your user ID in the format "domain\\user" or "user@domain".'
LOCKED_OUT = "The referenced account is currently locked out and may not be logged on to."
BAD_CODE = "The passcode is incorrect. Try again."


class DevIdpRefused(RuntimeError):
    """The development IdP was asked to run outside development."""


@dataclass(frozen=True)
class DevUser:
    """A user of the development IdP; `roles` are Role attribute values, in either ARN order."""

    username: str
    password: str = field(repr=False)
    roles: tuple[str, ...]
    session_name: str | None = None
    session_duration: int = 3600
    mfa_code: str | None = field(default=None, repr=False)
    locked: bool = False

    def matches(self, username: str) -> bool:
        """AD FS accepts the UPN and DOMAIN\\user case-insensitively."""
        return username.casefold() == self.username.casefold()


@dataclass(frozen=True)
class DevIdpConfig:
    """What the development IdP serves; mirrors the AD FS settings that show in the SAML."""

    environment: str
    users: tuple[DevUser, ...]
    issuer: str = "http://adfs.example.test/adfs/services/trust"
    relying_party: str = AWS_RELYING_PARTY
    acs_url: str = "https://signin.aws.amazon.com:443/saml"
    recipient: str = AWS_SIGNIN_URL
    assertion_lifetime: timedelta = timedelta(minutes=5)
    conditions_lifetime: timedelta = timedelta(hours=1)
    sso_lifetime: timedelta = timedelta(hours=8)
    mfa_context_lifetime: timedelta = timedelta(minutes=5)
    secure_cookies: bool = True


@dataclass(frozen=True)
class SigningKeyPair:
    """The token-signing key and certificate, PEM-encoded."""

    key_pem: bytes = field(repr=False)
    cert_pem: bytes

    @classmethod
    def generate(cls, common_name: str, now: datetime) -> SigningKeyPair:
        """A fresh RSA-2048 key and a self-signed certificate valid for ten years from `now`."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        return cls(
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        )

    @classmethod
    def from_files(cls, key_path: Path, cert_path: Path) -> SigningKeyPair:
        """A key and certificate kept on disk, so that restarts keep the same trust."""
        return cls(key_pem=key_path.read_bytes(), cert_pem=cert_path.read_bytes())


@dataclass(frozen=True)
class LoopbackTls:
    """A self-signed TLS certificate (and key) for 127.0.0.1 and localhost, in PEM files.

    AD FS sets its MSISAuth cookie `Secure`, so over plain http the real client would never send
    it back and sign-in would loop: the development IdP is served over https with this, and its
    clients trust `cert` as their CA bundle (which also exercises their CA-bundle option).
    """

    cert: Path
    key: Path

    @classmethod
    def generate(cls, folder: Path, now: datetime) -> LoopbackTls:
        """A P-256 key and a certificate valid from a day before `now` for 30 days, written to
        `folder` (the key with mode 0600)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        tls = cls(folder / "devidp-tls.crt", folder / "devidp-tls.key")
        tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        tls.key.touch(mode=0o600)
        tls.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return tls

    def client_context(self) -> ssl.SSLContext:
        """What a client verifies the IdP with."""
        return ssl.create_default_context(cafile=str(self.cert))


@dataclass
class _Session:
    username: str
    expires: datetime


class DevIdp:
    """The development AD FS: `app` is the ASGI app, `issue_response` signs a response directly."""

    def __init__(self, config: DevIdpConfig, signing: SigningKeyPair, clock: Clock) -> None:
        if config.environment != "development":
            raise DevIdpRefused(
                f"the development IdP runs only in development, not in {config.environment!r}"
            )
        self.config = config
        self._signing = signing
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._mfa_contexts: dict[str, _Session] = {}
        self.app = Starlette(
            routes=[Route("/adfs/ls/{page}", self._sign_on, methods=["GET", "POST"])]
        )

    @property
    def certificate_pem(self) -> bytes:
        """The token-signing certificate a verifier must trust."""
        return self._signing.cert_pem

    def user(self, username: str) -> DevUser | None:
        """The configured user signing in as `username`, if any."""
        return next((u for u in self.config.users if u.matches(username)), None)

    def issue_response(self, user: DevUser) -> str:
        """A base64 SAMLResponse for `user`, signed like AD FS's default (the Assertion only)."""
        now = self._clock.now()
        assertion = self._assertion(user, now)
        signed = XMLSigner(
            method=methods.enveloped,
            signature_algorithm="rsa-sha256",
            digest_algorithm="sha256",
            c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
        ).sign(
            # Signed standalone and spliced in: signing it inside the Response does not verify.
            assertion,
            key=self._signing.key_pem,
            cert=self._signing.cert_pem.decode(),
            reference_uri=assertion.get("ID"),
        )
        response = etree.Element(
            f"{{{SAMLP_NS}}}Response",
            nsmap={"samlp": SAMLP_NS},
            ID=_new_id(),
            Version="2.0",
            IssueInstant=_iso(now),
            Destination=self.config.recipient,
            Consent="urn:oasis:names:tc:SAML:2.0:consent:unspecified",
        )
        issuer = etree.SubElement(response, f"{{{SAML_NS}}}Issuer", nsmap={None: SAML_NS})
        issuer.text = self.config.issuer
        status = etree.SubElement(response, f"{{{SAMLP_NS}}}Status")
        etree.SubElement(status, f"{{{SAMLP_NS}}}StatusCode", Value=STATUS_SUCCESS)
        response.append(signed)
        return base64.b64encode(etree.tostring(response)).decode()

    def _assertion(self, user: DevUser, now: datetime) -> etree._Element:
        a = f"{{{SAML_NS}}}"
        cfg = self.config
        assertion = etree.Element(
            a + "Assertion", nsmap={None: SAML_NS}, ID=_new_id(), IssueInstant=_iso(now)
        )
        assertion.set("Version", "2.0")
        etree.SubElement(assertion, a + "Issuer").text = cfg.issuer
        etree.SubElement(assertion, f"{{{DS_NS}}}Signature", nsmap={"ds": DS_NS}, Id="placeholder")
        subject = etree.SubElement(assertion, a + "Subject")
        name_id = etree.SubElement(
            subject, a + "NameID", Format="urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
        )
        name_id.text = user.username
        confirmation = etree.SubElement(subject, a + "SubjectConfirmation", Method=BEARER)
        etree.SubElement(
            confirmation,
            a + "SubjectConfirmationData",
            NotOnOrAfter=_iso(now + cfg.assertion_lifetime),
            Recipient=cfg.recipient,
        )
        conditions = etree.SubElement(
            assertion,
            a + "Conditions",
            NotBefore=_iso(now),
            NotOnOrAfter=_iso(now + cfg.conditions_lifetime),
        )
        restriction = etree.SubElement(conditions, a + "AudienceRestriction")
        etree.SubElement(restriction, a + "Audience").text = cfg.relying_party
        statement = etree.SubElement(assertion, a + "AttributeStatement")
        session_name = user.session_name or user.username.replace("\\", ".")
        for name, values in (
            (ROLE_SESSION_NAME_ATTRIBUTE, (session_name,)),
            (ROLE_ATTRIBUTE, user.roles),
            (SESSION_DURATION_ATTRIBUTE, (str(user.session_duration),)),
        ):
            attribute = etree.SubElement(statement, a + "Attribute", Name=name)
            for value in values:
                etree.SubElement(attribute, a + "AttributeValue").text = value
        authn = etree.SubElement(
            assertion,
            a + "AuthnStatement",
            AuthnInstant=_iso(now),
            SessionIndex=assertion.get("ID"),
        )
        context = etree.SubElement(authn, a + "AuthnContext")
        etree.SubElement(
            context, a + "AuthnContextClassRef"
        ).text = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
        return assertion

    async def _sign_on(self, request: Request) -> Response:
        if request.path_params["page"].lower() not in SIGN_ON_PAGES:
            return PlainTextResponse("Not Found", status_code=404)
        if request.query_params.get("loginToRp") != self.config.relying_party:
            return _error_page(
                "An error occurred. The relying party named by loginToRp is unknown."
            )
        if request.method == "GET":
            session = self._live(self._sessions, request.cookies.get(AUTH_COOKIE))
            user = self.user(session.username) if session else None
            if user is not None and not user.locked:
                return _saml_page(self.config.acs_url, self.issue_response(user))
            return self._login_page(error="")
        fields = parse_qsl(
            (await request.body()).decode("utf-8", "replace"), keep_blank_values=True
        )
        names = [name for name, _ in fields]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            return PlainTextResponse(f'Duplicate post parameter "{duplicates[0]}"', 400)
        form = dict(fields)
        if "Context" in form:
            return self._mfa_answer(form)
        return self._password_answer(form)

    def _password_answer(self, form: dict[str, str]) -> Response:
        username = form.get("UserName", "")
        if form.get("AuthMethod") != "FormsAuthentication":
            return self._login_page(error="")
        if "\\" not in username and "@" not in username:
            return self._login_page(error=BAD_USERNAME_FORMAT, username=username)
        user = self.user(username)
        if user is None or not secrets.compare_digest(
            user.password.encode(), form.get("Password", "").encode()
        ):
            return self._login_page(error=BAD_CREDENTIALS, username=username)
        if user.locked:
            return self._login_page(error=LOCKED_OUT, username=username)
        if user.mfa_code is not None:
            context = secrets.token_urlsafe(24)
            self._mfa_contexts[context] = _Session(
                user.username, self._clock.now() + self.config.mfa_context_lifetime
            )
            return self._mfa_page(context, error="")
        return self._signed_in(user, persistent=form.get("Kmsi") == "true")

    def _mfa_answer(self, form: dict[str, str]) -> Response:
        context = form["Context"]
        session = self._live(self._mfa_contexts, context)
        user = self.user(session.username) if session else None
        if user is None or user.mfa_code is None or form.get("AuthMethod") != MFA_METHOD:
            return _error_page("Your session has expired. Sign in again.")
        if not secrets.compare_digest(user.mfa_code.encode(), form.get("Passcode", "").encode()):
            return self._mfa_page(context, error=BAD_CODE)
        del self._mfa_contexts[context]
        return self._signed_in(user, persistent=False)

    def _signed_in(self, user: DevUser, *, persistent: bool) -> Response:
        """AD FS's hop: set MSISAuth and redirect to the same sign-on URL, which then has SAML."""
        token = secrets.token_urlsafe(32)
        self._sessions[token] = _Session(
            user.username, self._clock.now() + self.config.sso_lifetime
        )
        response = RedirectResponse(self._sign_on_url(), status_code=302)
        response.set_cookie(
            AUTH_COOKIE,
            token,
            path="/adfs",
            secure=self.config.secure_cookies,
            httponly=True,
            max_age=int(self.config.sso_lifetime.total_seconds()) if persistent else None,
        )
        return response

    def _live(self, store: dict[str, _Session], key: str | None) -> _Session | None:
        """The unexpired session under `key`; expired ones are dropped on sight."""
        if key is None or key not in store:
            return None
        if store[key].expires <= self._clock.now():
            del store[key]
            return None
        return store[key]

    def _sign_on_url(self, **extra: str) -> str:
        query = urlencode({"loginToRp": self.config.relying_party, **extra})
        return f"/adfs/ls/IdpInitiatedSignOn.aspx?{query}"

    def _login_page(self, *, error: str, username: str = "") -> HTMLResponse:
        action = self._sign_on_url(**{"client-request-id": str(uuid.uuid4())})
        return _page(
            f"""<div id="loginArea"><form method="post" id="loginForm" autocomplete="off"
 novalidate="novalidate" action="{_e(action)}">
<div id="error" class="fieldMargin error smallText"><span id="errorText" role="alert"
 aria-live="assertive">{_e(error)}</span></div>
<input id="userNameInput" name="UserName" type="email" value="{_e(username)}"/>
<input id="passwordInput" name="Password" type="password" value=""/>
<input id="kmsiInput" type="checkbox" name="Kmsi" value="true"/>
<input id="optionForms" type="hidden" name="AuthMethod" value="FormsAuthentication"/>
<span id="submitButton" class="submit" role="button">Sign in</span>
</form></div>"""
        )

    def _mfa_page(self, context: str, *, error: str) -> HTMLResponse:
        return _page(
            f"""<form method="post" id="options" autocomplete="off" novalidate="novalidate"
 action="{_e(self._sign_on_url())}">
<p id="instructions">Enter the one-time passcode from your token.</p>
<span id="errorText" role="alert">{_e(error)}</span>
<input id="passcodeInput" name="Passcode" type="password" value=""/>
<input id="context" type="hidden" name="Context" value="{_e(context)}"/>
<input id="authMethod" type="hidden" name="AuthMethod" value="{MFA_METHOD}"/>
<input id="submitButton" type="submit" value="Submit"/>
</form>"""
        )


def _saml_page(acs_url: str, saml_response: str) -> HTMLResponse:
    return _page(
        f"""<form method="POST" name="hiddenform" action="{_e(acs_url)}">
<input type="hidden" name="SAMLResponse" value="{_e(saml_response)}"/>
<noscript><p>Script is disabled. Click Submit to continue.</p>
<input type="submit" value="Submit"/></noscript></form>
<script language="javascript">window.setTimeout('document.forms[0].submit()', 0);</script>"""
    )


def _error_page(message: str) -> HTMLResponse:
    return _page(
        f"""<div id="errorArea"><div id="openingMessage">An error occurred</div>
<div id="errorMessage"><span id="errorText">{_e(message)}</span></div></div>"""
    )


def _page(body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!DOCTYPE html><html lang='en'><head><title>Sign In</title></head><body>{body}</body>"
        "</html>"
    )


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _new_id() -> str:
    return f"_{uuid.uuid4()}"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def role_value(role_arn: str, principal_arn: str) -> str:
    """A Role attribute value in AD FS's usual order (provider first)."""
    return f"{principal_arn},{role_arn}"
