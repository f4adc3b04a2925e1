"""Fixtures for the bus tests: `kit` runs a test on MemoryBus and on RabbitBus."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from bus_kit import BusKit, require_rabbitmq


@pytest.fixture(params=["memory", pytest.param("rabbit", marks=pytest.mark.rabbitmq)])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[BusKit]:
    if request.param == "rabbit":
        require_rabbitmq()
    kit = BusKit(request.param)
    yield kit
    await kit.close()


@pytest.fixture
async def rabbit_kit() -> AsyncIterator[BusKit]:
    require_rabbitmq()
    kit = BusKit("rabbit")
    yield kit
    await kit.close()
