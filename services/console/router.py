"""The status page at `/`: a static page that reads the services' REST APIs in the browser.

The page needs a token like any client. Where the composition root can get one (the single-process
mode signs in to the development AD FS as its operator, through `hpcfleet login`'s code, for the
read-only scopes below), `/console/token` hands that short-lived token to callers on this machine
only, so opening the page is all a local operator does; anyone else signs in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from shared.clock import Clock
from shared.tokens import TokenIssuer

VIEWER_SCOPES = ("pool:read", "autogrow:read", "bakery:read", "audit:read")
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class ViewerToken(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    scope: str


def make_router(
    issuer: TokenIssuer | None,
    clock: Clock,
    *,
    token_source: Callable[[], Awaitable[str]] | None = None,
) -> APIRouter:
    """The page and its token route; the token comes from `token_source` (a read-only token got by
    signing in, renewed as it nears expiry) if given, else is issued with `issuer` (tests)."""
    router = APIRouter(tags=["console"])
    page = files("services.console").joinpath("static/index.html").read_text(encoding="utf-8")

    @router.get("/", include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(page)

    @router.get(
        "/console/token",
        summary="A read-only token for the status page, for callers on this machine only.",
        responses={
            403: {"description": "Not a loopback caller."},
            404: {"description": "Off."},
            503: {"description": "Signing in failed; the reason is given."},
        },
    )
    async def viewer_token(request: Request) -> ViewerToken:
        if issuer is None and token_source is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "sign in to get a token")
        if request.client is None or request.client.host not in LOOPBACK:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "only callers on this machine")
        if token_source is not None:
            try:
                token = await token_source()
            except Exception as exc:  # the sign-in failed: say why, as a 503 the page retries
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE, f"could not sign in: {exc}"
                ) from None
        else:
            assert issuer is not None
            token = issuer.issue("status-page", "viewer", VIEWER_SCOPES, clock.now())
        return ViewerToken(access_token=token, scope=" ".join(VIEWER_SCOPES))

    return router
