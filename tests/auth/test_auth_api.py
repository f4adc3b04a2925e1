"""auth's HTTP API: the token grants, token checks on every route, and the attacks the issue lists.

The auth app runs in process; the development IdP behind it runs over real HTTPS (its MSISAuth
cookie is Secure), so the password grant goes through the real AD FS client.
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from auth_kit import ISSUER, PROVIDER, USERS, Tls, role_arn, serve
from cryptography.hazmat.primitives import serialization

from services.auth.api import CLIENT_SCOPES, PERSON_SCOPES, SAML2_BEARER, SCOPES, AuthContext
from services.auth.broker import AwsCredentials, BrokerError, CredentialsUnavailable
from services.auth.devidp import DevIdp, DevIdpConfig, DevUser, SigningKeyPair, role_value
from services.auth.service import assemble
from services.auth.settings import AuthSettings, RoleSettings
from shared.api import create_app
from shared.clock import ManualClock
from shared.service import Runtime
from shared.settings import Settings
from shared.tokens import SecretRef, TokenIssuer, TokenVerifier, generate_signing_key

ALICE, CAROL, DAVE, _ = USERS
AUDITOR = DevUser(
    "audrey@example.test", "audrey-Secret-1", roles=(role_value(role_arn("auditor"), PROVIDER),)
)
NOBODY = DevUser(
    "nobody@example.test", "nobody-Secret-1", roles=(role_value(role_arn("nothing"), PROVIDER),)
)
POOL_SECRET = "pool-client-secret-0123456789abcdef"


def pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass
class Api:
    client: httpx.AsyncClient
    context: AuthContext
    idp: DevIdp
    issued: list[str] = field(default_factory=list)

    async def token(self, **form: str) -> httpx.Response:
        response = await self.client.post("/auth/token", data=form)
        if response.status_code == 200:
            self.issued.append(response.json()["access_token"])
        return response

    async def password(self, user: DevUser, **extra: str) -> httpx.Response:
        form = {"grant_type": "password", "username": user.username, "password": user.password}
        return await self.token(**(form | extra))

    async def pool_token(self) -> str:
        response = await self.token(
            grant_type="client_credentials", client_id="pool", client_secret=POOL_SECRET
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    async def verifier(self) -> TokenVerifier:
        """What another service does: fetch the public keys, verify locally."""
        keys = (await self.client.get("/auth/keys")).json()["keys"]
        return TokenVerifier([jwt.PyJWK(k).key for k in keys])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    """One clock for the module, so one IdP server serves every test (tests only advance it)."""
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture(scope="module")
def served_idp(
    signing: SigningKeyPair, tls: Tls, clock: ManualClock
) -> Iterator[tuple[DevIdp, str]]:
    config = DevIdpConfig(environment="development", users=(*USERS, AUDITOR, NOBODY))
    idp = DevIdp(config, signing, clock)
    with serve(idp.app, tls) as url:
        yield idp, url


@pytest.fixture
async def api(
    served_idp: tuple[DevIdp, str],
    signing: SigningKeyPair,
    tls: Tls,
    clock: ManualClock,
    tmp_path: Path,
) -> AsyncIterator[Api]:
    idp, adfs_url = served_idp
    key_file = write(tmp_path / "signing.pem", pem(generate_signing_key()))
    secret_file = write(tmp_path / "pool.secret", POOL_SECRET + "\n")
    cert_file = tmp_path / "adfs.crt"
    cert_file.write_bytes(signing.cert_pem)
    settings = AuthSettings(
        environment="production",
        adfs_url=adfs_url,
        adfs_ca_bundle=tls.cert,
        adfs_signing_certificates=cert_file,
        adfs_issuer=ISSUER,
        signing_key=SecretRef.parse(f"file:{key_file}"),
        clients={"pool": SecretRef.parse(f"file:{secret_file}")},
    )
    runtime = Runtime.from_settings(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/auth.db"), clock=clock
    )
    service, context = assemble(runtime, settings)
    app = create_app(title="auth", routers=[service.router])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://auth") as client,
    ):
        yield Api(client, context, idp)
    await runtime.engine.dispose()


# ------------------------------------------------------------------------------------------------
# Grants that work
# ------------------------------------------------------------------------------------------------


async def test_an_operator_signs_in_with_the_password_form(api: Api, clock: ManualClock) -> None:
    response = await api.password(ALICE)

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert set(body["scope"].split()) == PERSON_SCOPES["operator"] == set(SCOPES)
    claims = (await api.verifier()).verify(body["access_token"], clock.now(), ["pool:write"])
    assert (claims.subject, claims.role) == (ALICE.username, "operator")

    me = await api.client.get("/auth/whoami", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["subject"] == ALICE.username


async def test_scopes_follow_the_ad_fs_roles_and_can_be_narrowed(api: Api) -> None:
    auditor = await api.password(AUDITOR)
    assert set(auditor.json()["scope"].split()) == PERSON_SCOPES["auditor"]
    assert all(scope.endswith(":read") for scope in PERSON_SCOPES["auditor"])

    narrowed = await api.password(ALICE, scope="pool:read")
    assert narrowed.json()["scope"] == "pool:read"

    more = await api.password(AUDITOR, scope="pool:read pool:write")
    assert more.status_code == 400
    assert more.json()["error"] == "invalid_scope"
    assert "pool:write" in more.json()["error_description"]

    nothing = await api.password(NOBODY)
    assert nothing.status_code == 403
    assert nothing.json()["error"] == "access_denied"
    assert "hpcfleet-nothing" in nothing.json()["detail"]


async def test_mfa_codes_ride_along_in_the_form(api: Api) -> None:
    missing = await api.password(CAROL)
    assert missing.status_code == 400
    assert "mfa_code" in missing.json()["error_description"]

    wrong = await api.password(CAROL, mfa_code="000000")
    assert wrong.status_code == 400
    assert "passcode is incorrect" in wrong.json()["error_description"]

    right = await api.password(CAROL, mfa_code=CAROL.mfa_code or "")
    assert right.status_code == 200, right.text


async def test_a_service_gets_only_its_own_aws_scope(api: Api, clock: ManualClock) -> None:
    form = await api.token(
        grant_type="client_credentials", client_id="pool", client_secret=POOL_SECRET
    )
    basic = base64.b64encode(f"pool:{POOL_SECRET}".encode()).decode()
    header = await api.client.post(
        "/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )

    for response in (form, header):
        assert response.status_code == 200, response.text
        assert response.json()["scope"] == "aws:pool"
    claims = (await api.verifier()).verify(form.json()["access_token"], clock.now())
    assert claims.scopes == CLIENT_SCOPES["pool"]
    assert claims.role == "pool"


async def test_a_saml_response_is_exchanged_once(api: Api) -> None:
    response = api.idp.issue_response(ALICE)

    first = await api.token(grant_type=SAML2_BEARER, assertion=response)
    again = await api.token(grant_type=SAML2_BEARER, assertion=response)

    assert first.status_code == 200, first.text
    assert again.status_code == 400
    assert "already exchanged" in again.json()["error_description"]


# ------------------------------------------------------------------------------------------------
# Grants that are refused: a clear 4xx naming the problem, never a 500
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password", "username", "message"),
    [
        (ALICE, "wrong-password", None, "Incorrect user ID or password"),
        (DAVE, None, None, "locked out"),
        (ALICE, None, "alice", "domain\\user"),
        (ALICE, None, "EXAMPLE\\nobody-here", "Incorrect user ID or password"),
    ],
)
async def test_ad_fs_refusals_are_invalid_grant(
    api: Api, user: DevUser, password: str | None, username: str | None, message: str
) -> None:
    response = await api.token(
        grant_type="password",
        username=username or user.username,
        password=password or user.password,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert message in response.json()["error_description"]


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({}, 400, "unsupported_grant_type"),
        ({"grant_type": "implicit"}, 400, "unsupported_grant_type"),
        ({"grant_type": "password", "username": "EXAMPLE\\alice"}, 400, "invalid_request"),
        ({"grant_type": SAML2_BEARER}, 400, "invalid_request"),
        ({"grant_type": "client_credentials"}, 401, "invalid_client"),
        (
            {"grant_type": "client_credentials", "client_id": "pool", "client_secret": "guess"},
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "client_credentials", "client_id": "bakery", "client_secret": "x"},
            401,
            "invalid_client",
        ),
        (
            {
                "grant_type": "client_credentials",
                "client_id": "pool",
                "client_secret": POOL_SECRET,
                "scope": "aws:bakery",
            },
            400,
            "invalid_scope",
        ),
    ],
)
async def test_bad_token_requests_get_oauth_errors(
    api: Api, form: dict[str, str], status: int, error: str
) -> None:
    response = await api.token(**form)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["detail"] == response.json()["error_description"]


async def test_oversized_or_json_bodies_are_a_clear_4xx(api: Api) -> None:
    huge = await api.token(grant_type="password", username="x" * 5000, password="y")
    as_json = await api.client.post("/auth/token", json={"grant_type": "password"})
    assert huge.status_code == 422
    assert as_json.status_code == 400


def _decoded(response: str) -> str:
    return base64.b64decode(response).decode()


def _encoded(xml: str) -> str:
    return base64.b64encode(xml.encode()).decode()


def tampered(idp: DevIdp) -> str:
    return _encoded(
        _decoded(idp.issue_response(ALICE)).replace("alice@example.test", "mallory@x.y")
    )


def unsigned(idp: DevIdp) -> str:
    xml = _decoded(idp.issue_response(ALICE))
    start = xml.index("<ds:Signature")
    end = xml.index("</ds:Signature>") + len("</ds:Signature>")
    return _encoded(xml[:start] + xml[end:])


XXE = _encoded(
    '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol">&x;</samlp:Response>'
)
_LOL = "".join(
    f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">' for i in range(1, 10)
).replace("&lol0;", "&lol;")
LAUGHS = _encoded(
    f'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">{_LOL}]>'
    '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol">&lol9;</samlp:Response>'
)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (tampered, "changed after it was signed"),
        (unsigned, "not signed"),
        (lambda idp: XXE, "DTD"),
        (lambda idp: LAUGHS, "DTD"),
        (lambda idp: "not base64 at all!", "not valid base64"),
        (lambda idp: _encoded("<oops"), "not well-formed"),
    ],
)
async def test_bad_saml_responses_are_refused(
    api: Api, make: Callable[[DevIdp], str], message: str
) -> None:
    response = await api.token(grant_type=SAML2_BEARER, assertion=make(api.idp))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert message in response.json()["error_description"]


def bad_digest(idp: DevIdp) -> str:
    """A ds:DigestValue that is not base64: signxml's schema check raises lxml's DocumentInvalid."""
    xml = _decoded(idp.issue_response(ALICE))
    start = xml.index("<ds:DigestValue>") + len("<ds:DigestValue>")
    return _encoded(xml[:start] + "not base64!" + xml[xml.index("</ds:DigestValue>") :])


async def test_a_malformed_signature_element_is_a_400_not_a_500(api: Api) -> None:
    response = await api.token(grant_type=SAML2_BEARER, assertion=bad_digest(api.idp))
    assert response.status_code == 400, response.text
    assert "signature is unusable" in response.json()["error_description"]


async def test_mangled_saml_responses_never_make_a_500(api: Api) -> None:
    """A seeded sweep of small corruptions of a real response: 200 or 400, nothing else."""
    xml = _decoded(api.idp.issue_response(ALICE))
    rnd = random.Random(7)
    statuses = set()
    for _ in range(30):
        chars = list(xml)
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(len(chars))
            chars[at] = rnd.choice('<>/"= aZ:_-&;#0')
        response = await api.token(grant_type=SAML2_BEARER, assertion=_encoded("".join(chars)))
        statuses.add(response.status_code)
    assert statuses <= {200, 400}, statuses


async def test_expired_foreign_and_misaddressed_assertions_are_refused(
    api: Api, make_idp: Callable[..., DevIdp], other_signing: SigningKeyPair, clock: ManualClock
) -> None:
    old = api.idp.issue_response(ALICE)
    clock.advance(10 * 60)  # past SubjectConfirmationData NotOnOrAfter (5 min) and the skew
    expired = await api.token(grant_type=SAML2_BEARER, assertion=old)

    other_rp = make_idp(relying_party="urn:someone-else").issue_response(ALICE)
    wrong_audience = await api.token(grant_type=SAML2_BEARER, assertion=other_rp)

    foreign_idp = DevIdp(api.idp.config, other_signing, clock)
    foreign = await api.token(grant_type=SAML2_BEARER, assertion=foreign_idp.issue_response(ALICE))

    for response, message in (
        (expired, "expired"),
        (wrong_audience, "not for this relying party"),
        (foreign, "does not match the configured AD FS token-signing certificate"),
    ):
        assert response.status_code == 400, response.text
        assert message in response.json()["error_description"]


# ------------------------------------------------------------------------------------------------
# Tokens on the protected routes
# ------------------------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


PROTECTED = ("/auth/credentials/pool", "/auth/roles", "/auth/whoami")


@pytest.mark.parametrize("path", PROTECTED)
async def test_no_token_or_a_bad_one_is_401(api: Api, path: str, clock: ManualClock) -> None:
    forged = TokenIssuer(generate_signing_key()).issue(
        "mallory", "pool", ["aws:pool", "admin"], clock.now()
    )
    alg_none = jwt.encode({"sub": "mallory", "scope": "admin"}, key="", algorithm="none")
    headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc def"},
        bearer("not-a-jwt"),
        bearer(forged),
        bearer(alg_none),
        {"Authorization": "Bearer a.b.c"},
    ]
    for header in headers:
        response = await api.client.get(path, headers=header)
        assert response.status_code == 401, (header, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["detail"]


async def test_an_expired_token_is_401(api: Api, clock: ManualClock) -> None:
    token = await api.pool_token()
    clock.advance(16 * 60)
    response = await api.client.get("/auth/credentials/pool", headers=bearer(token))
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


async def test_a_token_without_the_scope_is_403(api: Api) -> None:
    pool = await api.pool_token()
    auditor = (await api.password(AUDITOR)).json()["access_token"]

    for path, token, scope in (
        ("/auth/credentials/bakery", pool, "aws:bakery"),
        ("/auth/roles", pool, "admin"),
        ("/auth/credentials/pool", auditor, "aws:pool"),
    ):
        response = await api.client.get(path, headers=bearer(token))
        assert response.status_code == 403, (path, response.text)
        assert scope in response.json()["detail"]
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


async def test_credentials_for_a_role_that_is_not_configured_are_404(api: Api) -> None:
    # This auth has no broker roles: the pool client holds aws:pool, but there is nothing to give.
    response = await api.client.get(
        "/auth/credentials/pool", headers=bearer(await api.pool_token())
    )
    assert response.status_code == 404
    assert "no role named 'pool'" in response.json()["detail"]

    weird = await api.client.get("/auth/credentials/..%2F..%2Fetc", headers=bearer("x"))
    assert weird.status_code in (404, 422)


class StubBroker:
    """Stands in for the STS broker: the endpoint only reads its cache."""

    def __init__(self, answer: AwsCredentials | BrokerError) -> None:
        self.answer = answer

    def credentials(self, role: str) -> AwsCredentials:
        if isinstance(self.answer, BrokerError):
            raise self.answer
        return self.answer


async def test_the_endpoint_serves_the_cache_or_says_503(api: Api, clock: ManualClock) -> None:
    role = RoleSettings(
        role_arn=role_arn("pool"),
        username="svc-pool@example.test",
        password=SecretRef("env", "UNUSED"),
    )
    api.context.settings = api.context.settings.model_copy(update={"roles": {"pool": role}})
    token = bearer(await api.pool_token())
    cached = AwsCredentials(
        "ASIAEXAMPLE", "secret/value", "session-token", clock.now() + timedelta(hours=1), "1234"
    )

    api.context.broker = StubBroker(cached)  # type: ignore[assignment]
    served = await api.client.get("/auth/credentials/pool", headers=token)
    unavailable = CredentialsUnavailable("no fresh credentials for role 'pool'")
    api.context.broker = StubBroker(unavailable)  # type: ignore[assignment]
    waiting = await api.client.get("/auth/credentials/pool", headers=token)
    api.context.broker = None
    stopped = await api.client.get("/auth/credentials/pool", headers=token)

    assert served.status_code == 200
    assert served.json() == cached.container_json()
    assert served.json()["Expiration"].endswith("Z")
    assert served.headers["cache-control"] == "no-store"
    assert (waiting.status_code, waiting.headers["retry-after"]) == (503, "30")
    assert "no fresh credentials" in waiting.json()["detail"]
    assert stopped.status_code == 503


async def test_botocore_sends_the_token_without_bearer(api: Api) -> None:
    token = await api.pool_token()
    response = await api.client.get("/auth/whoami", headers={"Authorization": token})
    assert response.status_code == 200
    assert response.json()["scopes"] == ["aws:pool"]


async def test_the_public_keys_are_a_jwks_and_the_docs_offer_the_password_flow(api: Api) -> None:
    keys = (await api.client.get("/auth/keys")).json()["keys"]
    assert [(k["kty"], k["crv"], k["alg"]) for k in keys] == [("OKP", "Ed25519", "EdDSA")]
    assert "d" not in keys[0]  # the private part

    spec = (await api.client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    flow = next(iter(schemes.values()))["flows"]["password"]
    assert flow["tokenUrl"] == "/auth/token"
    assert set(SCOPES) <= set(flow["scopes"])


async def test_nothing_secret_reaches_the_logs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    # The process's logging setup keeps these at WARNING (they log bodies and headers at DEBUG).
    for chatty in ("botocore", "aiobotocore", "signxml", "httpcore", "httpx", "urllib3"):
        caplog.set_level(logging.WARNING, logger=chatty)
    caplog.set_level(logging.DEBUG)  # last: it also sets the capturing handler's level
    saml = api.idp.issue_response(ALICE)
    await api.token(grant_type=SAML2_BEARER, assertion=saml)
    await api.token(grant_type=SAML2_BEARER, assertion=saml)  # refused: logged
    await api.password(ALICE)
    await api.password(ALICE, password="Wrong-Secret-9")
    await api.password(CAROL, mfa_code="135791")
    await api.token(
        grant_type="client_credentials", client_id="pool", client_secret="Guess-Secret-8"
    )
    await api.pool_token()
    await api.client.get("/auth/roles", headers=bearer(api.issued[-1]))

    assert "token refused" in caplog.text and "issued a token" in caplog.text
    secrets = [u.password for u in USERS] + ["Wrong-Secret-9", "135791", "Guess-Secret-8"]
    secrets += [POOL_SECRET, saml[:40], *api.issued]
    assert [s[:10] for s in secrets if s in caplog.text] == []


async def test_an_unconfigured_auth_refuses_with_503(tmp_path: Path, clock: ManualClock) -> None:
    runtime = Runtime.from_settings(
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/auth.db"), clock=clock
    )
    service, _ = assemble(runtime, AuthSettings(environment="production"))
    app = create_app(title="auth", routers=[service.router])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
        token = await client.post("/auth/token", data={"grant_type": "client_credentials"})
        password = await client.post(
            "/auth/token", data={"grant_type": "password", "username": "a@b", "password": "c"}
        )
        creds = await client.get("/auth/credentials/pool", headers=bearer("x.y.z"))
        no_token = await client.get("/auth/credentials/pool")
    await runtime.engine.dispose()
    assert token.status_code == 401  # unknown client either way
    assert password.status_code == 503
    assert "HPCFLEET_AUTH_SIGNING_KEY" in password.json()["detail"]
    assert creds.status_code == 503
    assert no_token.status_code == 401


def test_token_lifetimes_are_bounded() -> None:
    assert AuthSettings.model_fields["token_ttl_seconds"].metadata  # ge/le present
    with pytest.raises(ValueError):
        AuthSettings(token_ttl_seconds=7200)
    assert timedelta(seconds=AuthSettings().token_ttl_seconds) <= timedelta(hours=1)
