"""An async client for AD FS's IdP-initiated sign-on, the flow aws-adfs and saml2aws drive.

GET the sign-on page (an AD FS SSO cookie, or Windows integrated auth, may answer with the SAML at
once), otherwise POST `UserName`/`Password`/`AuthMethod=FormsAuthentication` (each field once: AD FS
2019 refuses repeats), follow the 302 that sets `MSISAuth`, answer an MFA page with a one-time code
and the page's `Context`, and read `SAMLResponse` from the hidden form. AD FS reports errors as a
200 page with an `errorText` element; those become `AdfsLoginFailed` with AD FS's own words.
The client keeps its cookie jar for its lifetime, so a later sign-in reuses the AD FS session
(8 h by default) without the password or MFA, as a browser would.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlencode, urljoin

import httpx
import lxml.html

from services.auth.saml import AWS_RELYING_PARTY

SIGN_ON_PATH = "/adfs/ls/IdpInitiatedSignOn.aspx"
# AD FS offers Windows integrated auth only to user agents in WIASupportedUserAgents.
WIA_USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; WOW64; Trident/7.0; rv:11.0) like Gecko"
FORMS_USER_AGENT = "hpcfleet-auth"
MAX_PAGE_BYTES = 1024 * 1024
# The field each MFA adapter reads its one-time code from.
MFA_CODE_FIELDS = {
    "SecurIDAuthentication": "Passcode",
    "SymantecVipAdapter": "SecurityCode",
    "VIPAuthenticationProviderWindowsAccountName": "SecurityCode",
    "VIPAuthenticationProviderUPN": "SecurityCode",
    "AzureMfaAuthentication": "VerificationCode",
}
_CODE_FIELD_HINTS = ("passcode", "securitycode", "security_code", "verificationcode", "oathcode")


class AdfsError(Exception):
    """Sign-in did not produce a SAML response; the message never contains a password."""


class AdfsLoginFailed(AdfsError):
    """AD FS refused the sign-in and said why (wrong password, locked account, bad format...)."""


class AdfsCredentialsRequired(AdfsError):
    """AD FS wants a user name and password and none were given."""


class AdfsMfaRequired(AdfsError):
    """AD FS asks for a second factor and no code provider was given."""


class AdfsMfaFailed(AdfsError):
    """The one-time code was refused, or the MFA adapter is one this client cannot answer."""


class AdfsUnexpectedPage(AdfsError):
    """AD FS answered with a status or a page this client does not recognise."""


@dataclass(frozen=True)
class MfaChallenge:
    """What a code provider is shown: the adapter, AD FS's instructions, and the last error."""

    auth_method: str
    instructions: str
    error: str


CodeProvider = Callable[[MfaChallenge], Awaitable[str]]


@dataclass(frozen=True)
class SamlPage:
    saml_response: str


@dataclass(frozen=True)
class LoginPage:
    action: str
    error: str


@dataclass(frozen=True)
class MfaPage:
    action: str
    auth_method: str
    context: str
    code_field: str | None
    instructions: str
    error: str


@dataclass(frozen=True)
class ErrorPage:
    error: str


@dataclass(frozen=True)
class UnknownPage:
    title: str


Page = SamlPage | LoginPage | MfaPage | ErrorPage | UnknownPage


def classify_page(text: str, url: str) -> Page:
    """Recognise an AD FS page by the ids and names real AD FS (2012R2-2022) uses."""
    if not text.strip():
        return UnknownPage(title="(empty page)")
    doc = lxml.html.document_fromstring(text)
    saml = doc.xpath('//form//input[@name="SAMLResponse"]/@value')
    if saml:
        return SamlPage(saml_response=str(saml[0]))
    error = " ".join(_squash(element) for element in doc.xpath('//*[@id="errorText"]')).strip()
    mfa = doc.xpath('//form[@id="options"][.//input[@name="Context"]]')
    if mfa:
        form = mfa[0]
        auth_method = _value(form, "AuthMethod")
        return MfaPage(
            action=urljoin(url, form.get("action") or url),
            auth_method=auth_method,
            context=_value(form, "Context"),
            code_field=_code_field(form, auth_method),
            instructions=" ".join(_squash(p) for p in form.xpath('.//*[@id="instructions"]')),
            error=error,
        )
    login = doc.xpath('//form[.//input[@name="UserName"]][.//input[@name="Password"]]')
    if login:
        return LoginPage(action=urljoin(url, login[0].get("action") or url), error=error)
    if error:
        return ErrorPage(error=error)
    titles = doc.xpath("//title/text()")
    return UnknownPage(title=str(titles[0]).strip() if titles else "(no title)")


def _squash(element: lxml.html.HtmlElement) -> str:
    """An element's text with whitespace runs collapsed, as a browser would show it."""
    return " ".join(" ".join(str(t) for t in element.itertext()).split())


def _value(form: lxml.html.HtmlElement, name: str) -> str:
    values = form.xpath(f'.//input[@name="{name}"]/@value')
    return str(values[0]) if values else ""


def _code_field(form: lxml.html.HtmlElement, auth_method: str) -> str | None:
    if auth_method in MFA_CODE_FIELDS:
        return MFA_CODE_FIELDS[auth_method]
    for name in form.xpath(".//input/@name"):
        if any(hint in str(name).lower() for hint in _CODE_FIELD_HINTS):
            return str(name)
    return None


class AdfsClient:
    """Signs in to one AD FS for one identity; keep one client per identity (it holds cookies)."""

    def __init__(
        self,
        base_url: str,
        *,
        relying_party: str = AWS_RELYING_PARTY,
        verify: ssl.SSLContext | bool = True,
        mfa: CodeProvider | None = None,
        mfa_attempts: int = 3,
        wia_auth: httpx.Auth | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`wia_auth` (e.g. httpx-ntlm's HttpNtlmAuth) turns on Windows integrated auth."""
        self.sign_on_url = (
            f"{base_url.rstrip('/')}{SIGN_ON_PATH}?{urlencode({'loginToRp': relying_party})}"
        )
        self._mfa = mfa
        self._mfa_attempts = mfa_attempts
        self._http = httpx.AsyncClient(
            verify=verify,
            timeout=timeout,
            follow_redirects=True,
            transport=transport,
            auth=wia_auth,
            headers={
                "Accept-Language": "en",
                "User-Agent": WIA_USER_AGENT if wia_auth else FORMS_USER_AGENT,
            },
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def forget_session(self) -> None:
        """Drop the AD FS session cookies, forcing the next sign-in to use the password."""
        self._http.cookies.clear()

    async def sign_in(self, username: str | None = None, password: str | None = None) -> str:
        """The base64 SAMLResponse; verify it with `saml.verify_response` before trusting it."""
        page = await self._fetch(self._http.get(self.sign_on_url))
        if isinstance(page, LoginPage):
            if not username or password is None:
                raise AdfsCredentialsRequired("AD FS asks for a user name and password")
            form = {"UserName": username, "Password": password, "AuthMethod": "FormsAuthentication"}
            page = await self._fetch(self._http.post(page.action, data=form))
            if isinstance(page, LoginPage) and not page.error:
                raise AdfsUnexpectedPage(
                    "AD FS accepted the form but showed the sign-in page again: the MSISAuth "
                    "cookie was not kept (a Secure cookie over plain http?)"
                )
        if isinstance(page, MfaPage):
            page = await self._answer_mfa(page)
        match page:
            case SamlPage(saml_response=saml_response):
                return saml_response
            case LoginPage(error=error) | ErrorPage(error=error):
                self.forget_session()
                raise AdfsLoginFailed(f"AD FS refused the sign-in: {error}")
            case UnknownPage(title=title):
                raise AdfsUnexpectedPage(f"AD FS returned an unrecognised page titled {title!r}")
        raise AdfsUnexpectedPage(f"AD FS returned an unexpected page: {type(page).__name__}")

    async def _answer_mfa(self, page: MfaPage) -> Page:
        if self._mfa is None:
            raise AdfsMfaRequired(f"AD FS asks for a second factor ({page.auth_method})")
        for _ in range(self._mfa_attempts):
            if page.code_field is None:
                raise AdfsMfaFailed(f"the MFA adapter {page.auth_method!r} is not supported")
            code = await self._mfa(MfaChallenge(page.auth_method, page.instructions, page.error))
            form = {"AuthMethod": page.auth_method, "Context": page.context, page.code_field: code}
            next_page = await self._fetch(self._http.post(page.action, data=form))
            if not isinstance(next_page, MfaPage):
                return next_page
            page = next_page
        self.forget_session()
        raise AdfsMfaFailed(f"AD FS refused the one-time code: {page.error or 'no reason given'}")

    async def _fetch(self, request: Awaitable[httpx.Response]) -> Page:
        try:
            response = await request
        except httpx.HTTPError as exc:
            raise AdfsError(f"cannot reach AD FS: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            self.forget_session()
            raise AdfsUnexpectedPage(
                f"AD FS answered HTTP {response.status_code} for {response.url.path}"
            )
        if len(response.content) > MAX_PAGE_BYTES:
            raise AdfsUnexpectedPage("AD FS returned a page larger than 1 MiB")
        return classify_page(response.text, str(response.url))
