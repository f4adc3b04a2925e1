"""Fixtures for the Slurm tests: a real auth service (with the `slurm` client Slurm's hooks get
their tokens as) and autogrow's hook routes checking its tokens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from slurm_kit import HookServer

from shared.testing.auth_service import AuthService, serve_auth


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthService]:
    with serve_auth(tmp_path_factory.mktemp("auth"), clients=("slurm", "pool")) as service:
        yield service


@pytest.fixture(scope="module")
def hook_server(auth: AuthService) -> Iterator[HookServer]:
    server = HookServer(auth)
    yield server
    server.close()
