"""The AD FS client against the development IdP: the real forms, cookies, MFA and error pages."""

from __future__ import annotations

from collections.abc import Callable, Generator

import httpx
import pytest
from auth_kit import USERS, Tls, serve

from services.auth.adfs import (
    WIA_USER_AGENT,
    AdfsClient,
    AdfsCredentialsRequired,
    AdfsLoginFailed,
    AdfsMfaFailed,
    AdfsMfaRequired,
    AdfsUnexpectedPage,
    ErrorPage,
    LoginPage,
    MfaChallenge,
    MfaPage,
    classify_page,
)
from services.auth.devidp import DevIdp, DevIdpConfig, DevIdpRefused, SigningKeyPair
from services.auth.saml import SamlTrust, verify_response
from shared.clock import ManualClock

ALICE, CAROL, DAVE, _ = USERS
BASE = "https://adfs.example.test"


def in_process(idp: DevIdp, **options: object) -> AdfsClient:
    """A client talking to the IdP through httpx's ASGI transport (https, so cookies flow)."""
    return AdfsClient(BASE, transport=httpx.ASGITransport(app=idp.app), **options)  # type: ignore[arg-type]


class Codes:
    """An MFA code provider that answers from a list and records what it was shown."""

    def __init__(self, *codes: str) -> None:
        self.codes = list(codes)
        self.challenges: list[MfaChallenge] = []

    async def __call__(self, challenge: MfaChallenge) -> str:
        self.challenges.append(challenge)
        return self.codes.pop(0)


async def test_forms_sign_in_over_https_then_single_sign_on(
    idp: DevIdp, tls: Tls, trust: SamlTrust, clock: ManualClock
) -> None:
    with serve(idp.app, tls) as url:
        async with AdfsClient(url, verify=tls.client_context()) as client:
            response = await client.sign_in(ALICE.username, ALICE.password)
            assertion = verify_response(response, trust, clock.now())
            assert assertion.name_id == ALICE.username

            # The MSISAuth cookie from the 302 hop signs in again without the password.
            again = await client.sign_in()
            assert verify_response(again, trust, clock.now()).name_id == ALICE.username
            assert again != response


async def test_the_session_lapses_and_the_password_is_needed_again(
    idp: DevIdp, clock: ManualClock
) -> None:
    async with in_process(idp) as client:
        await client.sign_in(ALICE.username, ALICE.password)
        clock.advance(8 * 3600 + 1)
        with pytest.raises(AdfsCredentialsRequired):
            await client.sign_in()
        assert await client.sign_in(ALICE.username, ALICE.password)


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        (ALICE.username, "wrong-password", "Incorrect user ID or password"),
        ("nobody@example.test", "whatever", "Incorrect user ID or password"),
        ("alice", ALICE.password, 'format "domain\\\\user"'),
        (DAVE.username, DAVE.password, "locked out"),
    ],
    ids=["wrong-password", "unknown-user", "bad-format", "locked"],
)
async def test_refusals_carry_adfs_own_words_and_no_password(
    idp: DevIdp, username: str, password: str, message: str
) -> None:
    async with in_process(idp) as client:
        with pytest.raises(AdfsLoginFailed, match=message) as caught:
            await client.sign_in(username, password)
    assert password not in str(caught.value)


async def test_mfa_code_is_posted_with_the_page_context(idp: DevIdp) -> None:
    codes = Codes("111111", CAROL.mfa_code or "")
    async with in_process(idp, mfa=codes) as client:
        assert await client.sign_in(CAROL.username, CAROL.password)

    first, second = codes.challenges
    assert first.auth_method == "SecurIDAuthentication"
    assert "one-time passcode" in first.instructions
    assert first.error == ""
    assert second.error == "The passcode is incorrect. Try again."


async def test_mfa_gives_up_after_the_allowed_attempts(idp: DevIdp) -> None:
    codes = Codes("1", "2", "3")
    async with in_process(idp, mfa=codes, mfa_attempts=3) as client:
        with pytest.raises(AdfsMfaFailed, match="passcode is incorrect"):
            await client.sign_in(CAROL.username, CAROL.password)
    assert codes.codes == []


async def test_mfa_without_a_code_provider_says_so(idp: DevIdp) -> None:
    async with in_process(idp) as client:
        with pytest.raises(AdfsMfaRequired, match="SecurIDAuthentication"):
            await client.sign_in(CAROL.username, CAROL.password)


async def test_secure_cookies_over_plain_http_are_explained(idp: DevIdp) -> None:
    client = AdfsClient("http://adfs.example.test", transport=httpx.ASGITransport(app=idp.app))
    async with client:
        with pytest.raises(AdfsUnexpectedPage, match="MSISAuth cookie was not kept"):
            await client.sign_in(ALICE.username, ALICE.password)


async def test_an_unknown_relying_party_is_an_error_page(idp: DevIdp) -> None:
    async with in_process(idp, relying_party="urn:example:unknown") as client:
        with pytest.raises(AdfsLoginFailed, match="relying party"):
            await client.sign_in(ALICE.username, ALICE.password)


def _mock(handler: Callable[[httpx.Request], httpx.Response]) -> AdfsClient:
    return AdfsClient(BASE, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(503, text="Service Unavailable"), "HTTP 503"),
        (httpx.Response(200, html="<html><title>Proxy login</title></html>"), "Proxy login"),
    ],
)
async def test_pages_that_are_not_adfs_are_reported(response: httpx.Response, message: str) -> None:
    async with _mock(lambda request: response) as client:
        with pytest.raises(AdfsUnexpectedPage, match=message):
            await client.sign_in(ALICE.username, ALICE.password)


async def test_the_devidp_refuses_repeated_form_fields_like_adfs_2019(idp: DevIdp) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as http:
        answer = await http.post(
            f"{BASE}/adfs/ls/idpinitiatedsignon.aspx?loginToRp=urn:amazon:webservices",
            content="UserName=a%40b&UserName=a%40b&Password=x&AuthMethod=FormsAuthentication",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 400
    assert 'Duplicate post parameter "UserName"' in answer.text


def test_the_devidp_runs_only_in_development(signing: SigningKeyPair, clock: ManualClock) -> None:
    with pytest.raises(DevIdpRefused, match="production"):
        DevIdp(DevIdpConfig(environment="production", users=USERS), signing, clock)


class FakeNegotiate(httpx.Auth):
    """Stands in for httpx-ntlm: answers a 401 Negotiate challenge once."""

    def __init__(self) -> None:
        self.challenged = False

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield request
        if response.status_code == 401:
            self.challenged = True
            request.headers["Authorization"] = "NTLM dG9rZW4="
            yield request


async def test_windows_integrated_auth_uses_the_given_auth_and_an_ie_user_agent(
    idp: DevIdp,
) -> None:
    """AD FS offers WIA only to IE-like agents: 302 to /adfs/ls/wia, 401, then the cookie hop."""
    signed = idp.issue_response(ALICE)
    agents: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        agents.append(request.headers["User-Agent"])
        if request.url.path == "/adfs/ls/wia":
            if "Authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": "Negotiate, NTLM"})
            return httpx.Response(
                302,
                headers={
                    "Location": "/adfs/ls/IdpInitiatedSignOn.aspx?loginToRp=urn:amazon:webservices",
                    "Set-Cookie": "MSISAuth=wia; Path=/adfs; Secure; HttpOnly",
                },
            )
        if "MSISAuth=wia" in request.headers.get("Cookie", ""):
            form = f'<form name="hiddenform"><input name="SAMLResponse" value="{signed}"/></form>'
            return httpx.Response(200, html=form)
        return httpx.Response(302, headers={"Location": "/adfs/ls/wia"})

    auth = FakeNegotiate()
    client = AdfsClient(BASE, wia_auth=auth, transport=httpx.MockTransport(handler))
    async with client:
        assert await client.sign_in() == signed
    assert auth.challenged
    assert set(agents) == {WIA_USER_AGENT}


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        (
            '<form id="loginForm" action="?x=1"><label id="errorText">Bad  password</label>'
            '<input name="UserName"/><input name="Password"/></form>',
            LoginPage(action="https://adfs.example.test/adfs/ls/page?x=1", error="Bad password"),
        ),
        (
            '<form id="options" action="/mfa"><input name="AuthMethod" value="DefenderAdapter"/>'
            '<input name="Context" value="ctx"/><input name="defender_oathcode"/></form>',
            MfaPage(
                action="https://adfs.example.test/mfa",
                auth_method="DefenderAdapter",
                context="ctx",
                code_field="defender_oathcode",
                instructions="",
                error="",
            ),
        ),
        ('<div><span id="errorText">MSIS7012: busy</span></div>', ErrorPage("MSIS7012: busy")),
    ],
    ids=["2012r2-label-error", "oath-adapter", "error-only"],
)
def test_pages_are_recognised_by_adfs_ids(html: str, expected: object) -> None:
    assert classify_page(html, "https://adfs.example.test/adfs/ls/page") == expected
