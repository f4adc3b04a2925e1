"""auth: identity and credentials. This module wires its API together."""

from __future__ import annotations

from fastapi import APIRouter

from services.auth.tables import MAILBOX
from shared.service import Runtime, Service

CONSUMER = "auth"


def make_router() -> APIRouter:
    return APIRouter(prefix="/auth", tags=["auth"])


def build(runtime: Runtime) -> Service:
    return Service.create(CONSUMER, runtime, runtime.mailbox(MAILBOX), router=make_router())
