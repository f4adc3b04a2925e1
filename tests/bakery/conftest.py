"""Fixtures for bakery: one moto server (with a script-running SSM) for the session, reset before
each test that uses it; bakery settings tuned for tests; an assembled bakery on SQLite and the
in-memory bus under a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aioboto3
import pytest
from bakery_kit import REGION, BakeryMoto, seed_base_image, write_recipe_tree
from sqlalchemy.ext.asyncio import AsyncEngine

from services.bakery.aws import BakeryAws
from services.bakery.recipes import load_recipes
from services.bakery.service import Bakery, assemble
from services.bakery.settings import BakerySettings
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.service import Runtime
from shared.settings import Settings

# Wednesday 2026-02-11 is the day after February's Patch Tuesday
START = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def bakery_moto() -> Iterator[BakeryMoto]:
    with BakeryMoto() as server:
        yield server


@pytest.fixture
def moto(bakery_moto: BakeryMoto) -> BakeryMoto:
    bakery_moto.reset()
    return bakery_moto


@pytest.fixture
def base_image(moto: BakeryMoto) -> str:
    return seed_base_image(moto.endpoint)


@pytest.fixture(scope="session")
def aws_session() -> aioboto3.Session:
    return aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )


@pytest.fixture
async def aws(moto: BakeryMoto, aws_session: aioboto3.Session) -> AsyncIterator[BakeryAws]:
    """bakery's adapter on the moto server, without botocore retries: faults surface at once."""
    adapter = BakeryAws(aws_session, endpoint_url=moto.endpoint, max_attempts=1)
    yield adapter
    await adapter.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def recipes_file(tmp_path: Path) -> Path:
    return write_recipe_tree(tmp_path / "recipes")


@pytest.fixture
def settings(tmp_path: Path, recipes_file: Path) -> BakerySettings:
    return BakerySettings(
        recipes=recipes_file,
        work_dir=tmp_path / "work",
        packer_communicator="none",
        poll_seconds=1.0,
        retry_seconds=1.0,
        cloud_attempts=3,
        lease_seconds=120,
        build_interval=10,
        schedule_interval=60,
        retention_interval=3600,
    )


@pytest.fixture
async def runtime(sqlite_engine: AsyncEngine, clock: ManualClock) -> AsyncIterator[Runtime]:
    runtime = Runtime(Settings(), sqlite_engine, MemoryBus(), clock)
    await runtime.bus.start()
    yield runtime
    await runtime.bus.stop()


@pytest.fixture
def bakery(runtime: Runtime, settings: BakerySettings, aws: BakeryAws) -> Bakery:
    return assemble(runtime, settings, load_recipes(settings.recipes), aws)
