"""The FastAPI app factory every service (and the single-process mode) builds its API with.

It adds what operators and orchestrators expect of each service: `/healthz` (the process runs),
`/readyz` (its database and bus answer), `/metrics` (Prometheus), OpenAPI docs at `/docs` with
stable operation ids, a correlation id on every request and its logs, and errors as JSON that say
what to fix — never a traceback.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.clock import Clock
from shared.tokens import TokenClaims, TokenError, TokenScopeMissing, TokenVerifier

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "hpcfleet_http_requests_total", "HTTP requests served", ["method", "route", "status"]
)
LATENCY = Histogram("hpcfleet_http_request_seconds", "HTTP request latency", ["method", "route"])

ReadinessCheck = tuple[str, Callable[[], Awaitable[None]]]
_bearer = HTTPBearer(
    auto_error=False, description="A token from `hpcfleet login` or POST /auth/token."
)
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SCOPE_KEY = "x-hpcfleet-scope"
"""A route's `openapi_extra` key naming the one scope it needs instead of read/write, for a narrow
caller (Slurm's hooks need `autogrow:hook` and nothing else); it shows in the OpenAPI document."""


def route_scope(scope: str) -> dict[str, str]:
    """`openapi_extra` for a route that needs `scope` rather than `<service>:read/write`."""
    return {SCOPE_KEY: scope}


# ---- what every error answer looks like (and the OpenAPI document says so) ---------------------


class ErrorBody(BaseModel):
    """Every hpcfleet error answer: `detail` says what went wrong and what to do about it. Some
    answers carry more fields beside it (they are described where they do)."""

    detail: str = Field(description="What went wrong, for a person.")


class Problem(BaseModel):
    where: str = Field(description="Where in the request, e.g. body.size or query.limit.")
    problem: str = Field(description="What is wrong with it.")


class InvalidRequest(BaseModel):
    """A request the API cannot act on (422): each problem is named where one can be."""

    detail: str = Field(description="What went wrong, for a person.")
    problems: list[Problem] = Field(default=[], description="Each problem, where it is.")


class ApiError(HTTPException):
    """An HTTPException whose JSON answer carries fields beside `detail` (e.g. `problems`)."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code, detail, headers)
        self.extra = extra


class Ready(BaseModel):
    status: str = Field(description="ready")
    checked: list[str] = Field(description="The checks that passed.")


class NotReady(BaseModel):
    status: str = Field(description="not ready")
    failed: dict[str, str] = Field(description="Each failed check, and why.")


class ApiGuard:
    """Every service route needs a bearer token: `<service>:read` to look, `<service>:write` to
    change anything, or the scope the route names (`route_scope`). Tokens are verified locally
    with auth's public key(s)."""

    def __init__(self, verifier: TokenVerifier, clock: Clock) -> None:
        self.verifier = verifier
        self.clock = clock

    def authenticate(self, authorization: str | None) -> TokenClaims:
        """The claims of the bearer token in an Authorization header, whatever its scopes; 401
        (an HTTPException) for none, a malformed one, or a token that is not valid. The app
        runs this before anything else of a guarded route, so that a caller without a valid
        token learns nothing about the route (not even whether its body would parse)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("a bearer token is required (hpcfleet login, or POST /auth/token)")
        try:
            return self.verifier.verify(token.strip(), self.clock.now())
        except TokenError as exc:
            raise _unauthorized(str(exc)) from None
        except Exception as exc:  # whatever else a hostile token makes PyJWT raise: still a 401
            log.warning("a token was refused with an unexpected %s", type(exc).__name__)
            raise _unauthorized("the token is not valid") from None

    def for_service(self, service: str) -> Callable[..., Awaitable[TokenClaims]]:
        async def require_token(
            request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
        ) -> TokenClaims:
            if credentials is None:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "a bearer token is required (hpcfleet login, or POST /auth/token)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            route = request.scope.get("route")
            named = (getattr(route, "openapi_extra", None) or {}).get(SCOPE_KEY)
            scope = named or f"{service}:{'read' if request.method in _READ_METHODS else 'write'}"
            try:
                claims = self.verifier.verify(credentials.credentials, self.clock.now(), [scope])
            except TokenScopeMissing as exc:
                raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
            except TokenError as exc:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
                ) from None
            except Exception as exc:  # whatever else a hostile token makes PyJWT raise
                log.warning("a token was refused with an unexpected %s", type(exc).__name__)
                raise _unauthorized("the token is not valid") from None
            request.state.claims = claims
            return claims

        return require_token


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


NUL_REFUSED = "NUL characters are not allowed (PostgreSQL cannot store them)"


async def refuse_nul(request: Request) -> None:
    """Every route's inputs (its path and query parameters, its JSON or form body) are refused
    with a 422 when a string in them holds a NUL character: PostgreSQL cannot store one in text
    or JSON, so without this a NUL that reaches a query fails there, as a 500. No hpcfleet input
    needs one."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for name, value in request.path_params.items():
        if isinstance(value, str) and "\x00" in value:
            problems.append((("path", name), value))
    for param in dependant.query_params:
        for value in request.query_params.getlist(param.alias):
            if "\x00" in value:
                problems.append((("query", param.alias), value))
    if dependant.body_params:
        content_type = request.headers.get("content-type", "")
        if "json" in content_type:
            try:
                body: Any = await request.json()
            except ValueError:  # FastAPI has answered it already; never here
                body = None
            problems.extend(((("body", *where), text) for where, text in _nul_strings(body)))
        elif "form" in content_type:
            form = await request.form()
            for key, value in form.multi_items():
                if isinstance(value, str) and "\x00" in f"{key}{value}":
                    problems.append((("body", key), value))
    if problems:
        raise RequestValidationError(
            [
                {"type": "nul_character", "loc": where, "msg": NUL_REFUSED, "input": value}
                for where, value in problems
            ]
        )


def _nul_strings(value: Any, where: tuple[str | int, ...] = ()) -> Iterator[tuple[Any, str]]:
    """Where in a parsed JSON document a key or a string holds a NUL character."""
    if isinstance(value, str):
        if "\x00" in value:
            yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                yield (*where, key), key
            yield from _nul_strings(item, (*where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nul_strings(item, (*where, index))


def operation_id(route: APIRoute) -> str:
    """Stable operation ids: `<tag>_<function name>`, so generated clients keep their names."""
    return f"{route.tags[0]}_{route.name}" if route.tags else route.name


def create_app(
    *,
    title: str,
    routers: Sequence[APIRouter],
    readiness: Sequence[ReadinessCheck] = (),
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]] | None = None,
    description: str = "",
    guard: ApiGuard | None = None,
    public_prefixes: Sequence[str] = ("/auth",),
) -> FastAPI:
    """The app; with a `guard`, every router outside `public_prefixes` requires a token (auth's
    own routes check tokens themselves)."""
    app = FastAPI(
        title=title,
        description=description,
        version="0.1.0",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    guarded: list[str] = []
    for router in routers:
        if guard is None or not router.prefix or router.prefix in public_prefixes:
            app.include_router(router, dependencies=[Depends(refuse_nul)])
        else:
            service = router.prefix.strip("/")
            token = Depends(guard.for_service(service))
            app.include_router(router, dependencies=[token, Depends(refuse_nul)])
            guarded.append(router.prefix.rstrip("/"))

    @app.get("/healthz", tags=["health"], summary="The process is alive.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="The database and the bus answer.",
        response_model=Ready,
        responses={503: {"model": NotReady, "description": "A check failed: `failed` says why."}},
    )
    async def readyz() -> JSONResponse:
        failed: dict[str, str] = {}
        for name, check in readiness:
            try:
                await check()
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
        if failed:
            return JSONResponse({"status": "not ready", "failed": failed}, status_code=503)
        return JSONResponse({"status": "ready", "checked": [name for name, _ in readiness]})

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics.",
        response_class=PlainTextResponse,
    )
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if guard is not None and guarded:

        @app.middleware("http")
        async def authenticate(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            """A valid token before anything else of a guarded route runs (its scope is checked
            by the route's dependency, which knows the route)."""
            path = request.url.path
            if any(path == prefix or path.startswith(f"{prefix}/") for prefix in guarded):
                try:
                    guard.authenticate(request.headers.get("authorization"))
                except HTTPException as exc:
                    return JSONResponse(
                        {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
                    )
            return await call_next(request)

    @app.middleware("http")
    async def correlate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        correlation_id = request.headers.get("x-correlation-id") or str(uuid.uuid4())
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
        request.state.correlation_id = correlation_id
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = route.path if isinstance(route, APIRoute) else "unmatched"
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        response.headers["x-correlation-id"] = correlation_id
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"where": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]}
            for err in exc.errors()
        ]
        return JSONResponse({"detail": "invalid request", "problems": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        extra = exc.extra if isinstance(exc, ApiError) else {}
        return JSONResponse(
            {"detail": exc.detail, **extra}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        correlation_id = getattr(request.state, "correlation_id", "")
        return JSONResponse(
            {
                "detail": "internal error; the correlation id finds it in the logs",
                "correlation_id": correlation_id,
            },
            status_code=500,
            headers={"x-correlation-id": correlation_id},
        )

    document = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, made to say what the app really answers (`declare_errors`)."""
        if app.openapi_schema is None:
            app.openapi_schema = declare_errors(document(), guarded)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_ERROR_MODELS: tuple[type[BaseModel], ...] = (ErrorBody, InvalidRequest)
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def declare_errors(document: dict[str, Any], guarded: Sequence[str]) -> dict[str, Any]:
    """Make the OpenAPI document honest about errors, so that a client (and schemathesis) can
    rely on it: 401 and 403 on every guarded route, the body of a 422 as this app's exception
    handler writes it (not FastAPI's default), 400 where a body may not parse, and the error
    body on every other error status a route declares with a description only."""
    _, defs = models_json_schema(
        [(model, "serialization") for model in _ERROR_MODELS],
        ref_template="#/components/schemas/{model}",
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))

    def body(model: type[BaseModel]) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"application/json": {"schema": ref}}

    def declare(responses: dict[str, Any], code: int, description: str) -> None:
        response = responses.setdefault(str(code), {"description": description})
        content = response.get("content", {}).get("application/json", {}).get("schema", {})
        if code == 422 and content.get("$ref", "").endswith("/HTTPValidationError"):
            response["content"] = body(InvalidRequest)  # FastAPI's default: not what we send
        elif "content" not in response:
            response["content"] = body(InvalidRequest if code == 422 else ErrorBody)

    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if any(path == prefix or path.startswith(f"{prefix}/") for prefix in guarded):
                declare(responses, 401, "No token, or a token that is not valid.")
                declare(responses, 403, "The token lacks the scope this route needs.")
            if operation.get("requestBody"):
                declare(responses, 400, "The body could not be read.")
                declare(responses, 422, "The request is invalid: each problem is named.")
            if operation.get("parameters"):
                declare(responses, 422, "The request is invalid: each problem is named.")
            for code in list(responses):
                if code.isdigit() and int(code) >= 400:
                    declare(responses, int(code), responses[code].get("description", ""))
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f"/{unused}" not in str(document.get("paths", {})):
            schemas.pop(unused)
    return document
