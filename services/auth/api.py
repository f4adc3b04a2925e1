"""auth's HTTP API: tokens for people and services, AWS credentials, and the token public keys.

Routes (all under /auth):

| route                    | token / scope         | answers                                       |
| ------------------------ | --------------------- | --------------------------------------------- |
| POST /auth/token         | none (issues them)    | 200 token; 400/401/403 OAuth2 errors; 502/503 |
| GET /auth/credentials/R  | `aws:R`               | 200 container JSON; 401, 403, 404, 503        |
| GET /auth/keys           | none (public keys)    | 200 JWKS                                      |
| GET /auth/whoami         | any valid token       | 200 the token's claims; 401                   |
| GET /auth/roles          | `admin`               | 200 the broker's roles, no secrets; 401, 403  |

The credentials endpoint speaks the AWS container-credentials protocol, so any AWS SDK on a
loopback or link-local address can use it with `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
`AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)`; botocore sends that token verbatim (no "Bearer"), so
both forms are accepted. It only reads the broker's cache: botocore gives the endpoint 2 s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Path, Request, status
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
from lxml import etree
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.auth.adfs import (
    AdfsClient,
    AdfsCredentialsRequired,
    AdfsError,
    AdfsLoginFailed,
    AdfsMfaFailed,
    AdfsMfaRequired,
    AdfsUnexpectedPage,
    CodeProvider,
    MfaChallenge,
)
from services.auth.broker import (
    CredentialsUnavailable,
    RoleBinding,
    ServiceAccount,
    StsBroker,
    UnknownRole,
)
from services.auth.saml import (
    SAML_NS,
    SamlAssertion,
    SamlError,
    SamlTrust,
    verify_response,
)
from services.auth.settings import NAME_PATTERN, AuthSettings
from shared.clock import Clock
from shared.tokens import (
    SecretError,
    TokenClaims,
    TokenError,
    TokenIssuer,
    TokenScopeMissing,
    TokenVerifier,
    key_id,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The scope map: every scope, which AD FS role (for people) and which client (for services) gets
# which. Other services check these names on their routes; keep this the only list.
# ------------------------------------------------------------------------------------------------

SCOPES: Mapping[str, str] = {
    "pool:read": "See the pool's nodes, their images and power state.",
    "pool:write": "Change the pool: power nodes on or off, resize it, replace nodes.",
    "bakery:read": "See image builds and images.",
    "bakery:write": "Request image builds and retire images.",
    "autogrow:read": "See the queue snapshot and autogrow's decisions.",
    "autogrow:write": "Change autogrow's policy; drain nodes.",
    "autogrow:hook": "Slurm's power hooks: have autogrow power the named nodes on or off.",
    "audit:read": "See security alerts.",
    "audit:write": "Acknowledge security alerts.",
    "admin": "Administer auth: see the STS broker's roles.",
}
AWS_SCOPE_PREFIX = "aws:"


def aws_scope(role: str) -> str:
    """The scope that lets a caller fetch `role`'s AWS credentials from /auth/credentials."""
    return f"{AWS_SCOPE_PREFIX}{role}"


_READ = frozenset(s for s in SCOPES if s.endswith(":read"))

# People: by the IAM role their AD FS assertion grants (role name without the prefix).
PERSON_SCOPES: Mapping[str, frozenset[str]] = {
    "operator": frozenset(SCOPES),
    "auditor": _READ,
}

# Services (client-credentials grant): each gets its own AWS role's credentials and nothing else;
# they talk to each other over the bus, not over each other's APIs. `slurm` is Slurm's
# ResumeProgram / SuspendProgram (`hpcfleet slurm-resume`): autogrow's hook routes, nothing else.
CLIENT_SCOPES: Mapping[str, frozenset[str]] = {
    **{name: frozenset({aws_scope(name)}) for name in ("pool", "bakery", "autogrow", "audit")},
    "slurm": frozenset({"autogrow:hook"}),
}

# What auth's own routes require (the README's table for auth).
ROUTE_SCOPES: Mapping[str, str] = {
    "POST /auth/token": "none (issues tokens)",
    "GET /auth/keys": "none (public keys)",
    "GET /auth/credentials/{role}": "aws:{role}",
    "GET /auth/whoami": "any valid token",
    "GET /auth/roles": "admin",
}

SAML2_BEARER = "urn:ietf:params:oauth:grant-type:saml2-bearer"
GRANT_TYPES = ("password", "client_credentials", SAML2_BEARER)
_RETRY_AFTER_SECONDS = "30"


def role_component(role_arn: str, prefix: str) -> str:
    """`arn:aws:iam::1:role/path/hpcfleet-operator` → `operator` (the scope map's key)."""
    name = role_arn.rpartition("/")[2]
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def person_scopes(assertion: SamlAssertion, prefix: str) -> tuple[frozenset[str], list[str]]:
    """The scopes an operator's AD FS roles grant, and the roles that counted."""
    components = sorted(
        {role_component(r.role_arn, prefix) for r in assertion.roles} & set(PERSON_SCOPES)
    )
    granted: set[str] = set()
    for component in components:
        granted |= PERSON_SCOPES[component]
    return frozenset(granted), components


# ------------------------------------------------------------------------------------------------
# What the routes share; built once by `service.build`, the broker added by the router's lifespan.
# ------------------------------------------------------------------------------------------------


@dataclass
class AuthContext:
    settings: AuthSettings
    clock: Clock
    region: str
    sts_endpoint_url: str | None
    issuer: TokenIssuer | None
    verifier: TokenVerifier | None
    public_keys: tuple[Ed25519PublicKey, ...]
    trust: SamlTrust | None
    adfs_verify: ssl.SSLContext | bool = True
    broker: StsBroker | None = None
    used_assertions: dict[str, datetime] = field(default_factory=dict)

    def adfs_client(self, mfa: CodeProvider | None = None, mfa_attempts: int = 3) -> AdfsClient:
        if self.settings.adfs_url is None:
            raise AdfsError("no AD FS is configured (HPCFLEET_AUTH_ADFS_URL)")
        return AdfsClient(
            str(self.settings.adfs_url),
            relying_party=self.settings.relying_party,
            verify=self.adfs_verify,
            mfa=mfa,
            mfa_attempts=mfa_attempts,
        )

    def make_broker(self) -> StsBroker | None:
        """The STS broker for the configured roles, or None when there are none."""
        if not self.settings.roles or self.trust is None:
            return None
        bindings = [
            RoleBinding(
                name=name,
                role_arn=role.role_arn,
                principal_arn=self.settings.principal_arn(name),
                account=ServiceAccount(role.username, role.password),
                duration_seconds=role.duration_seconds,
            )
            for name, role in self.settings.roles.items()
        ]
        return StsBroker(
            bindings,
            adfs_client=self.adfs_client,
            trust=self.trust,
            clock=self.clock,
            sts_endpoint_url=self.sts_endpoint_url,
            region=self.region,
        )


# ------------------------------------------------------------------------------------------------
# Tokens on requests
# ------------------------------------------------------------------------------------------------


class _TokenScheme(OAuth2PasswordBearer):
    """`Authorization: Bearer <token>`, or the bare token that botocore's container provider
    sends; declared as OAuth2 password flow so the docs' Authorize button works."""

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, rest = header.strip().partition(" ")
        if not rest:
            return scheme
        if scheme.lower() == "bearer" and " " not in rest.strip():
            return rest.strip()
        return ""


token_scheme = _TokenScheme(
    tokenUrl="/auth/token",
    scopes=dict(SCOPES) | {f"{AWS_SCOPE_PREFIX}<role>": "Fetch that role's AWS credentials."},
    auto_error=False,
    description="A token from POST /auth/token; botocore's bare AWS_CONTAINER_AUTHORIZATION_TOKEN "
    "is accepted too.",
)


def _unauthorized(message: str, error: str = "invalid_token") -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": f'Bearer error="{error}"'},
    )


def _verify(context: AuthContext, token: str | None, scopes: Iterable[str] = ()) -> TokenClaims:
    """The token's claims, or 401 (no/bad/expired token), 403 (scope missing), 503 (no key)."""
    if token is None:
        raise _unauthorized("a token is required: Authorization: Bearer <token>", "invalid_request")
    if not token:
        raise _unauthorized("the Authorization header must be 'Bearer <token>'", "invalid_request")
    if context.verifier is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="auth has no token-signing key: set HPCFLEET_AUTH_SIGNING_KEY",
        )
    try:
        return context.verifier.verify(token, context.clock.now(), required_scopes=scopes)
    except TokenScopeMissing as exc:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=str(exc),
            headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
        ) from None
    except TokenError as exc:  # invalid, forged, expired
        raise _unauthorized(str(exc)) from None
    except Exception as exc:  # whatever else a hostile token makes PyJWT raise: still a 401
        log.warning("a token was refused with an unexpected %s", type(exc).__name__)
        raise _unauthorized("the token is not valid") from None


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class TokenResponse(BaseModel):
    access_token: str = Field(description="The signed token (an EdDSA JWT).")
    token_type: str = Field(default="bearer", description="Always bearer.")
    expires_in: int = Field(description="Seconds until the token expires.")
    scope: str = Field(description="The granted scopes, space-separated.")


class OAuthErrorBody(BaseModel):
    error: str = Field(description="RFC 6749 error code, e.g. invalid_grant.")
    error_description: str = Field(description="What went wrong, for a person.")
    detail: str = Field(description="The same, as every hpcfleet error has it.")


class ContainerCredentials(BaseModel):
    """The AWS container-credentials body botocore's ContainerProvider reads."""

    AccessKeyId: str
    SecretAccessKey: str
    Token: str
    Expiration: str = Field(description="ISO 8601 in UTC with a Z.")
    AccountId: str | None = None


class Jwk(BaseModel):
    kty: str = "OKP"
    crv: str = "Ed25519"
    x: str = Field(description="The raw public key, base64url without padding.")
    kid: str = Field(description="The key id tokens carry in their header.")
    alg: str = "EdDSA"
    use: str = "sig"


class Jwks(BaseModel):
    keys: list[Jwk]


class WhoAmI(BaseModel):
    subject: str
    role: str
    scopes: list[str]
    expires_at: datetime


class RoleState(BaseModel):
    name: str
    ready: bool = Field(description="Credentials with enough time left are cached.")
    expiration: datetime | None
    failures: int = Field(description="Refreshes failed in a row.")
    last_error: str | None


def jwks(public_keys: Iterable[Ed25519PublicKey]) -> Jwks:
    """The keys as a JSON Web Key Set (RFC 8037 OKP keys)."""
    keys = []
    for key in public_keys:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        keys.append(Jwk(x=x, kid=key_id(key)))
    return Jwks(keys=keys)


# ------------------------------------------------------------------------------------------------
# The token endpoint's grants
# ------------------------------------------------------------------------------------------------


class OAuthError(Exception):
    """An RFC 6749 error answer; `description` must never hold a secret."""

    def __init__(
        self,
        status_code: int,
        error: str,
        description: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.status_code = status_code
        self.error = error
        self.description = description
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": self.error, "error_description": self.description}
        return JSONResponse(
            body | {"detail": self.description},
            status_code=self.status_code,
            headers={"Cache-Control": "no-store", **self.headers},
        )


def _bad_grant(description: str) -> OAuthError:
    return OAuthError(400, "invalid_grant", description)


def _requested_scopes(scope: str | None, granted: frozenset[str]) -> frozenset[str]:
    """The requested subset of `granted` (all of it if none asked for); more is invalid_scope."""
    requested = frozenset((scope or "").split())
    if not requested:
        return granted
    extra = sorted(requested - granted)
    if extra:
        raise OAuthError(400, "invalid_scope", f"not granted to you: {' '.join(extra)}")
    return requested


def _adfs_failure(exc: AdfsError) -> OAuthError:
    """AD FS's answer as an OAuth2 error: its own words for refusals, 502/503 for breakage."""
    if isinstance(exc, AdfsMfaRequired):
        return _bad_grant(f"{exc}: send the one-time code in the mfa_code field")
    if isinstance(exc, AdfsLoginFailed | AdfsMfaFailed | AdfsCredentialsRequired):
        return _bad_grant(str(exc))
    if isinstance(exc, AdfsUnexpectedPage):
        return OAuthError(502, "temporarily_unavailable", str(exc))
    return OAuthError(
        503, "temporarily_unavailable", str(exc), {"Retry-After": _RETRY_AFTER_SECONDS}
    )


def _one_code(code: str | None) -> CodeProvider:
    """An MFA code provider that answers once with the code from the form."""
    codes = [code] if code else []

    async def provide(challenge: MfaChallenge) -> str:
        if not codes:
            raise AdfsMfaRequired(f"AD FS asks for a second factor ({challenge.auth_method})")
        return codes.pop()

    return provide


def _assertion_id(saml_response: str) -> str:
    """The ID of the (already verified) Assertion, to refuse a second exchange of it."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    root = etree.fromstring(base64.b64decode(saml_response.strip()), parser=parser)
    assertion = root.find(f"{{{SAML_NS}}}Assertion")
    return assertion.get("ID", "") if assertion is not None else ""


class Grants:
    """The three grants of POST /auth/token."""

    def __init__(self, context: AuthContext) -> None:
        self._context = context

    def _issuer(self) -> TokenIssuer:
        if self._context.issuer is None:
            raise OAuthError(
                503,
                "temporarily_unavailable",
                "auth has no token-signing key: set HPCFLEET_AUTH_SIGNING_KEY",
            )
        return self._context.issuer

    def _trust(self) -> SamlTrust:
        if self._context.trust is None:
            raise OAuthError(
                503,
                "temporarily_unavailable",
                "no AD FS is configured: set HPCFLEET_AUTH_ADFS_URL and "
                "HPCFLEET_AUTH_ADFS_SIGNING_CERTIFICATES",
            )
        return self._context.trust

    def _issue(self, subject: str, role: str, scopes: frozenset[str], grant: str) -> TokenResponse:
        issuer = self._issuer()
        token = issuer.issue(subject, role, scopes, self._context.clock.now())
        log.info(
            "issued a token to %s (%s, %s grant) with scopes %s",
            subject,
            role,
            grant,
            " ".join(sorted(scopes)),
        )
        return TokenResponse(
            access_token=token,
            expires_in=int(issuer.ttl.total_seconds()),
            scope=" ".join(sorted(scopes)),
        )

    def _person_token(
        self, assertion: SamlAssertion, scope: str | None, grant: str
    ) -> TokenResponse:
        granted, components = person_scopes(assertion, self._context.settings.role_prefix)
        if not granted:
            roles = ", ".join(r.role_arn for r in assertion.roles)
            raise OAuthError(
                403, "access_denied", f"your AD FS roles grant no hpcfleet scope ({roles})"
            )
        scopes = _requested_scopes(scope, granted)
        return self._issue(assertion.name_id, ",".join(components), scopes, grant)

    async def password(
        self, username: str | None, password: str | None, mfa_code: str | None, scope: str | None
    ) -> TokenResponse:
        """An operator's AD FS user name and password (and MFA code): the docs' Authorize."""
        if not username or password is None:
            raise OAuthError(400, "invalid_request", "the password grant needs username, password")
        self._issuer()
        trust = self._trust()
        try:
            async with self._context.adfs_client(_one_code(mfa_code), mfa_attempts=1) as client:
                response = await client.sign_in(username, password)
        except AdfsError as exc:
            raise _adfs_failure(exc) from None
        try:
            assertion = verify_response(response, trust, self._context.clock.now())
        except SamlError as exc:
            # AD FS itself answered: an unverifiable assertion is a configuration fault here.
            raise OAuthError(
                502, "temporarily_unavailable", f"AD FS's SAML response was refused: {exc}"
            ) from None
        return self._person_token(assertion, scope, "password")

    def saml(self, saml_response: str | None, scope: str | None) -> TokenResponse:
        """A SAMLResponse the caller got from AD FS itself (`hpcfleet login`), once only."""
        if not saml_response:
            raise OAuthError(400, "invalid_request", "the saml2-bearer grant needs an assertion")
        self._issuer()
        now = self._context.clock.now()
        try:
            assertion = verify_response(saml_response, self._trust(), now)
        except SamlError as exc:
            raise _bad_grant(f"the SAML response was refused: {exc}") from None
        assertion_id = _assertion_id(saml_response)
        used = self._context.used_assertions
        for old in [k for k, until in used.items() if until < now]:
            del used[old]
        if not assertion_id or assertion_id in used:
            raise _bad_grant("this SAML assertion was already exchanged for a token")
        token = self._person_token(assertion, scope, "saml2-bearer")
        used[assertion_id] = assertion.not_on_or_after + timedelta(minutes=5)
        return token

    async def client_credentials(
        self, client_id: str | None, client_secret: str | None, scope: str | None
    ) -> TokenResponse:
        """A service's own id and secret; the scope map decides what it gets."""
        invalid = OAuthError(
            401, "invalid_client", "unknown client or wrong secret", {"WWW-Authenticate": "Basic"}
        )
        if not client_id or not client_secret:
            raise invalid
        reference = self._context.settings.clients.get(client_id)
        if reference is None or client_id not in CLIENT_SCOPES:
            raise invalid
        self._issuer()
        try:
            expected = await asyncio.to_thread(reference.read)
        except SecretError as exc:
            log.error("cannot read the secret of client %s: %s", client_id, exc)
            raise OAuthError(
                503, "temporarily_unavailable", f"the secret of client {client_id} is unreadable"
            ) from None
        if not secrets.compare_digest(expected.encode(), client_secret.encode()):
            raise invalid
        scopes = _requested_scopes(scope, CLIENT_SCOPES[client_id])
        return self._issue(client_id, client_id, scopes, "client_credentials")


def _loggable_user(username: str | None) -> str:
    """The user name for a log line, unless it may be a password typed into the wrong field."""
    if (
        username
        and ("\\" in username or "@" in username)
        and not any(c.isspace() for c in username)
    ):
        return username[:128]
    return "(a malformed user name)"


def _printable(text: str | None, limit: int = 128) -> str:
    """A caller's text for a log line: control characters escaped, so that a form field cannot
    start a forged log line with a newline; cut at `limit`."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit])


def _basic_auth(request: Request) -> tuple[str | None, str | None]:
    """Client id and secret from `Authorization: Basic`, RFC 6749's preferred form."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value:
        return None, None
    try:
        client_id, sep, secret = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return (client_id, secret) if sep else (None, None)


# ------------------------------------------------------------------------------------------------
# The router
# ------------------------------------------------------------------------------------------------


class _OAuthRoute(APIRoute):
    """auth's routes answer a body that cannot be read (a form field over the form parser's
    1 MB limit, a body that does not parse) as RFC 6749 does, `invalid_request`, rather than
    with FastAPI's bare 400: the token endpoint's 400 is an OAuth2 error, as it declares."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as exc:  # Starlette's form parser raises its own
                if exc.status_code != status.HTTP_400_BAD_REQUEST:
                    raise
                return OAuthError(400, "invalid_request", str(exc.detail)).response()

        return handle


FormText = Annotated[str | None, Form(max_length=1024)]
TokenDep = Annotated[str | None, Depends(token_scheme)]


def make_router(context: AuthContext) -> APIRouter:
    """auth's routes; the router's lifespan runs the STS broker where these routes are served."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        broker = context.make_broker()
        if broker is not None:
            await broker.start()
            context.broker = broker
            log.info("STS broker started for roles %s", ", ".join(sorted(context.settings.roles)))
        try:
            yield
        finally:
            if broker is not None:
                context.broker = None
                await broker.stop()

    router = APIRouter(prefix="/auth", tags=["auth"], lifespan=lifespan, route_class=_OAuthRoute)
    grants = Grants(context)

    @router.post(
        "/token",
        summary="Get a token: operators with AD FS credentials, services with client credentials.",
        responses={
            400: {"model": OAuthErrorBody, "description": "Refused grant or bad request."},
            401: {"model": OAuthErrorBody, "description": "Unknown client or wrong secret."},
            403: {"model": OAuthErrorBody, "description": "No hpcfleet scope for these roles."},
            502: {"model": OAuthErrorBody, "description": "AD FS answered something unusable."},
            503: {"model": OAuthErrorBody, "description": "AD FS unreachable or auth unset."},
        },
    )
    async def issue_token(
        request: Request,
        grant_type: FormText = None,
        username: FormText = None,
        password: FormText = None,
        mfa_code: Annotated[str | None, Form(max_length=64)] = None,
        scope: FormText = None,
        client_id: FormText = None,
        client_secret: FormText = None,
        assertion: Annotated[str | None, Form(max_length=400_000)] = None,
    ) -> Any:
        """OAuth2 token endpoint (form-encoded).

        - `password`: an operator's AD FS user name and password, plus `mfa_code` when AD FS asks
          for one; scopes come from the operator's AD FS roles.
        - `client_credentials`: a service's `client_id` and `client_secret` (form or HTTP Basic).
        - `urn:ietf:params:oauth:grant-type:saml2-bearer`: `assertion` is the base64
          SAMLResponse from AD FS (what `hpcfleet login` sends); each is accepted once.
        """
        try:
            if grant_type == "password":
                result = await grants.password(username, password, mfa_code, scope)
            elif grant_type == "client_credentials":
                basic_id, basic_secret = _basic_auth(request)
                result = await grants.client_credentials(
                    client_id or basic_id, client_secret or basic_secret, scope
                )
            elif grant_type == SAML2_BEARER:
                result = grants.saml(assertion, scope)
            else:
                raise OAuthError(
                    400,
                    "unsupported_grant_type",
                    f"grant_type must be one of: {', '.join(GRANT_TYPES)}",
                )
        except OAuthError as exc:
            who = _loggable_user(username) if grant_type == "password" else client_id or "-"
            log.warning(
                "token refused (%s grant) for %s: %s",
                _printable(grant_type),
                _printable(who),
                exc.description,
            )
            return exc.response()
        return JSONResponse(
            result.model_dump(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
        )

    @router.get(
        "/credentials/{role}",
        summary="AWS credentials for a role, in the container-credentials format.",
        response_model=ContainerCredentials,
        response_model_exclude_none=True,
        responses={
            401: {"description": "No token, or an invalid or expired one."},
            403: {"description": "The token lacks aws:<role>."},
            404: {"description": "No such role is configured."},
            503: {"description": "No fresh credentials for the role right now."},
        },
    )
    async def role_credentials(
        role: Annotated[str, Path(pattern=NAME_PATTERN)], token: TokenDep
    ) -> JSONResponse:
        _verify(context, token, [aws_scope(role)])
        broker = context.broker
        if role not in context.settings.roles:
            raise HTTPException(404, detail=f"no role named {role!r} is configured")
        if broker is None:
            raise HTTPException(
                503, detail="the STS broker is not running", headers={"Retry-After": "5"}
            )
        try:
            credentials = broker.credentials(role)
        except UnknownRole as exc:
            raise HTTPException(404, detail=str(exc)) from None
        except CredentialsUnavailable as exc:
            raise HTTPException(
                503, detail=str(exc), headers={"Retry-After": _RETRY_AFTER_SECONDS}
            ) from None
        return JSONResponse(credentials.container_json(), headers={"Cache-Control": "no-store"})

    @router.get("/keys", summary="The public keys that verify auth's tokens (JWKS).")
    async def public_keys() -> Jwks:
        return jwks(context.public_keys)

    @router.get(
        "/whoami",
        summary="The caller's token, as auth reads it.",
        responses={401: {"description": "No token, or an invalid or expired one."}},
    )
    async def whoami(token: TokenDep) -> WhoAmI:
        claims = _verify(context, token)
        return WhoAmI(
            subject=claims.subject,
            role=claims.role,
            scopes=sorted(claims.scopes),
            expires_at=claims.expires_at,
        )

    @router.get(
        "/roles",
        summary="The STS broker's roles and whether each has fresh credentials.",
        responses={
            401: {"description": "No token, or an invalid or expired one."},
            403: {"description": "The token lacks admin."},
        },
    )
    async def roles(token: TokenDep) -> list[RoleState]:
        _verify(context, token, ["admin"])
        broker = context.broker
        if broker is None:
            return [
                RoleState(name=n, ready=False, expiration=None, failures=0, last_error=None)
                for n in sorted(context.settings.roles)
            ]
        return [
            RoleState(
                name=s.name,
                ready=s.ready,
                expiration=s.expiration,
                failures=s.failures,
                last_error=s.last_error,
            )
            for s in broker.status()
        ]

    return router


def broker_ready(context: AuthContext) -> Callable[[], Any]:
    """A readiness check (for /readyz) that fails while a role has no fresh credentials."""

    async def check() -> None:
        broker = context.broker
        if context.settings.roles and broker is None:
            raise RuntimeError("the STS broker is not running")
        if broker is not None and not broker.ready():
            waiting = [s.name for s in broker.status() if not s.ready]
            raise RuntimeError(f"no fresh credentials yet for: {', '.join(waiting)}")

    return check
