"""Fixtures for the Slurm tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from slurm_kit import HookServer


@pytest.fixture(scope="module")
def hook_server() -> Iterator[HookServer]:
    server = HookServer()
    yield server
    server.close()
