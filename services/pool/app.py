"""pool's API as a uvicorn factory: `uvicorn --factory services.pool.app:create_app`."""

from fastapi import FastAPI

from services.pool.service import build
from shared.process import service_app


def create_app() -> FastAPI:
    return service_app(build, title="hpcfleet pool")
