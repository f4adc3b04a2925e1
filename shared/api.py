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
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
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


class ApiGuard:
    """Every service route needs a bearer token: `<service>:read` to look, `<service>:write` to
    change anything. Tokens are verified locally with auth's public key(s)."""

    def __init__(self, verifier: TokenVerifier, clock: Clock) -> None:
        self.verifier = verifier
        self.clock = clock

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
            scope = f"{service}:{'read' if request.method in _READ_METHODS else 'write'}"
            try:
                claims = self.verifier.verify(credentials.credentials, self.clock.now(), [scope])
            except TokenScopeMissing as exc:
                raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
            except TokenError as exc:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
                ) from None
            request.state.claims = claims
            return claims

        return require_token


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
    for router in routers:
        if guard is None or not router.prefix or router.prefix in public_prefixes:
            app.include_router(router)
        else:
            service = router.prefix.strip("/")
            app.include_router(router, dependencies=[Depends(guard.for_service(service))])

    @app.get("/healthz", tags=["health"], summary="The process is alive.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database and the bus answer.")
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

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics.")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

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
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
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

    return app
