"""pool's settings and composition: the default pool from the environment, AWS from settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pool_service_kit import REGION, fast_settings, harness, pool_engine, pool_spec
from sqlalchemy import select

from services.pool.service import assemble, build, make_cloud
from services.pool.settings import PoolSettings
from services.pool.tables import pools
from shared.bus.memory import MemoryBus
from shared.clock import ManualClock
from shared.cloud.aws import AwsCloud
from shared.service import Runtime
from shared.settings import ConfigurationError, Settings, load_settings


def test_the_default_pool_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pool_spec(size=8).model_dump(mode="json")
    monkeypatch.setenv("HPCFLEET_POOL_DEFAULT_POOL", json.dumps(spec))
    monkeypatch.setenv("HPCFLEET_POOL_RECONCILE_INTERVAL", "60")
    settings = load_settings(PoolSettings)
    assert settings.default_pool is not None and settings.default_pool.size == 8
    assert settings.reconcile_interval == 60


def test_a_bad_default_pool_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCFLEET_POOL_DEFAULT_POOL", json.dumps({"name": "x", "size": -1}))
    with pytest.raises(ConfigurationError, match="HPCFLEET_POOL_DEFAULT_POOL"):
        load_settings(PoolSettings)


def test_aws_comes_from_auth_or_a_rehearsal_endpoint(tmp_path: Path) -> None:
    rehearsal = Settings(aws_endpoint_url="http://127.0.0.1:5000", aws_region="eu-west-1")
    cloud, why = make_cloud(rehearsal, PoolSettings())
    assert isinstance(cloud, AwsCloud) and cloud.region == "eu-west-1" and why == ""

    cloud, why = make_cloud(Settings(), PoolSettings())
    assert cloud is None and "HPCFLEET_POOL_AUTH_URL" in why

    with pytest.raises(ConfigurationError, match="AUTH_CLIENT_SECRET"):
        make_cloud(Settings(), PoolSettings(auth_url="https://auth.example"))
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    cloud, _ = make_cloud(
        Settings(),
        PoolSettings(auth_url="https://auth.example", auth_client_secret=f"file:{secret}"),
    )
    assert isinstance(cloud, AwsCloud)


async def test_the_default_pool_is_created_once_then_left_to_the_api(tmp_path: Path) -> None:
    settings = fast_settings(default_pool=pool_spec(size=3))
    async with harness(tmp_path, settings=settings) as h:
        await h.tick()
        assert (await h.spec()).size == 3
        assert (await h.put(pool_spec(size=5))).status_code == 200
        await h.tick()
        assert (await h.spec()).size == 5


async def test_without_aws_the_pool_says_why_it_does_nothing(tmp_path: Path) -> None:
    settings = fast_settings(default_pool=pool_spec(image_id="ami-1"))
    cloud, why = make_cloud(Settings(), settings)
    engine = await pool_engine(tmp_path / "pool.db")
    runtime = Runtime(Settings(aws_region=REGION), engine, MemoryBus(), ManualClock())
    try:
        assert build(runtime, settings).name == "pool"
        pool = assemble(runtime, settings, cloud, unavailable=why)
        await pool.reconciler.reconcile()
        async with engine.connect() as conn:
            problems = await conn.scalar(select(pools.c.problems))
        assert problems == [why]
    finally:
        await engine.dispose()
