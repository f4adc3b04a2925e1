"""The status page at `/`: a static page that reads the services' REST APIs in the browser.

The page needs a token like any client. Where the composition root holds auth's signing key (the
single-process mode), `/console/token` hands a short-lived read-only token to callers on this
machine only, so opening the page is all a local operator does; anyone else signs in.
"""

from __future__ import annotations

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


def make_router(issuer: TokenIssuer | None, clock: Clock) -> APIRouter:
    router = APIRouter(tags=["console"])
    page = files("services.console").joinpath("static/index.html").read_text(encoding="utf-8")

    @router.get("/", include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(page)

    @router.get(
        "/console/token",
        summary="A read-only token for the status page, for callers on this machine only.",
        responses={403: {"description": "Not a loopback caller."}, 404: {"description": "Off."}},
    )
    async def viewer_token(request: Request) -> ViewerToken:
        if issuer is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "sign in to get a token")
        if request.client is None or request.client.host not in LOOPBACK:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "only callers on this machine")
        token = issuer.issue("status-page", "viewer", VIEWER_SCOPES, clock.now())
        return ViewerToken(access_token=token, scope=" ".join(VIEWER_SCOPES))

    return router
