"""audit's API as a uvicorn factory: `uvicorn --factory services.audit.app:create_app`.

Its readiness adds `sqs` and `notify`: the API process reads no queue itself, it reports what the
worker recorded. Like every service API it demands a token: `audit:read` to look, `audit:write`
to acknowledge.
"""

from fastapi import FastAPI

from services.audit.service import build
from shared.process import service_app


def create_app() -> FastAPI:
    return service_app(build, title="hpcfleet audit")
