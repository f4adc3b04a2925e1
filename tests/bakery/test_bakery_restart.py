"""The worker process killed (SIGKILL) in the middle of a build, then started again: the new worker
takes the build over once the dead one's lease lapses, terminates the builder the dead one left
running, builds again and publishes once; it then stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bakery_kit import BakeryMoto, live_instances, write_recipe_tree
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from tests_support import wait_until

from services.bakery.tables import MAILBOX, builds
from shared.clock import SystemClock
from shared.events import BuildImage, ImageReady, decode
from shared.outbox import Mailbox


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.bakery.worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def the_build(engine: AsyncEngine) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(builds))).mappings().first()
    return dict(row) if row else None


async def test_a_killed_worker_leaves_no_builder_and_the_build_completes(
    sqlite_engine: AsyncEngine, moto: BakeryMoto, base_image: str, tmp_path: Path
) -> None:
    marker = tmp_path / "first-attempt-started"
    slow_once = f'if [ ! -e {marker} ]; then touch {marker}; sleep 60; fi\necho "updated"\n'
    install = 'mkdir -p "$HPCFLEET_ROOT/etc"\ntouch "$HPCFLEET_ROOT/etc/slurm-installed"\n'
    recipes = write_recipe_tree(
        tmp_path / "r", steps={"os-updates": slow_once, "slurm-node": install}
    )
    env = {
        **os.environ,
        "HPCFLEET_DATABASE_URL": str(sqlite_engine.url),
        "HPCFLEET_BUS_URL": "memory://",
        "HPCFLEET_RELAY_INTERVAL": "0.2",
        "HPCFLEET_LOG_LEVEL": "WARNING",
        "HPCFLEET_AWS_ENDPOINT_URL": moto.endpoint,
        "HPCFLEET_BAKERY_RECIPES": str(recipes),
        "HPCFLEET_BAKERY_WORK_DIR": str(tmp_path / "work"),
        "HPCFLEET_BAKERY_LEASE_SECONDS": "2",
        "HPCFLEET_BAKERY_BUILD_INTERVAL": "0.5",
        "HPCFLEET_BAKERY_POLL_SECONDS": "0.1",
    }
    # as the API does: the command goes into bakery's outbox, the worker's relay delivers it
    async with Mailbox(MAILBOX, sqlite_engine, SystemClock()).transaction() as tx:
        tx.emit(BuildImage(recipe="linux", reason="restart test", occurred_at=tx.now))

    first = start_worker(env)
    try:

        async def mid_step() -> bool:
            return marker.exists()  # the slow step is running on the builder

        await wait_until(mid_step, timeout=30, what="the first worker to run the slow step")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    killed = await the_build(sqlite_engine)
    assert killed is not None and killed["status"] == "running"
    assert live_instances(moto.endpoint) == [killed["builder_id"]]  # left running by the kill

    second = start_worker(env)
    try:

        async def finished() -> bool:
            build = await the_build(sqlite_engine)
            return build is not None and build["status"] in ("succeeded", "failed")

        await wait_until(finished, timeout=45, what="the second worker to finish the build")
    finally:
        second.send_signal(signal.SIGTERM)
        code = second.wait(timeout=30)
        errors = second.stderr.read().decode() if second.stderr else ""
    build = await the_build(sqlite_engine)
    assert build is not None
    assert build["status"] == "succeeded", (build["error"], build["log"][-3000:], errors[-3000:])
    assert build["attempt"] == 2
    assert "lease lapsed" in build["log"] and f"terminated {killed['builder_id']}" in build["log"]
    assert live_instances(moto.endpoint) == []
    assert code == 0, errors[-3000:]
    outbox = MAILBOX.outbox
    async with sqlite_engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.name, outbox.c.body))).all()
    ready = [m for r in rows if isinstance(m := decode(r.name, r.body), ImageReady)]
    assert [m.images for m in ready] == [{"us-east-1": build["image_id"]}]
