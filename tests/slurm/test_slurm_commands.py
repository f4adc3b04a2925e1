"""How the adapter runs Slurm's programs and turns their failures into typed errors, with stand-in
programs (a `bin_dir` of shell scripts) for the failures a real Slurm will not produce on cue."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from slurm_kit import SAMPLES

from services.autogrow.slurm import (
    SlurmCommandFailed,
    SlurmOutputInvalid,
    SlurmScheduler,
    SlurmUnavailable,
    SlurmUnknownNodes,
)
from shared.clock import ManualClock
from shared.testing.slurm_cluster import SlurmNotInstalled, find_binary


def fake_bin(tmp_path: Path, **programs: str) -> Path:
    """A directory with one shell script per program (squeue="..." is the script's body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in programs.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return bin_dir


def prints(name: str) -> str:
    return f"cat {SAMPLES / name}"


async def test_snapshot_from_the_programs_output_at_the_clocks_time(tmp_path: Path) -> None:
    clock = ManualClock()
    bin_dir = fake_bin(
        tmp_path,
        squeue=prints("squeue_running.json"),
        sinfo=prints("sinfo_busy_draining_lost.json"),
    )

    snap = await SlurmScheduler(bin_dir=bin_dir, clock=clock).snapshot()

    assert snap.taken_at == clock.now()
    assert (snap.pending_jobs, snap.running_jobs, len(snap.nodes)) == (11, 11, 4)


async def test_the_environment_reaches_the_programs(tmp_path: Path) -> None:
    bin_dir = fake_bin(
        tmp_path,
        sinfo=f'[ "$SLURM_CONF" = /x/slurm.conf ] && {prints("sinfo_nodes_off.json")}',
    )

    nodes = await SlurmScheduler(bin_dir=bin_dir, env={"SLURM_CONF": "/x/slurm.conf"}).nodes()

    assert [n.name for n in nodes] == ["node001", "node002", "node003", "node004"]


async def test_an_unreachable_controller_is_unavailable(tmp_path: Path) -> None:
    bin_dir = fake_bin(
        tmp_path,
        scontrol="echo 'slurm_update error: Unable to contact slurm controller (connect failure)'"
        " >&2; exit 1",
    )

    with pytest.raises(SlurmUnavailable, match="Unable to contact slurm controller"):
        await SlurmScheduler(bin_dir=bin_dir).drain(["node001"], "test")


async def test_a_controller_that_is_down_is_unavailable_even_though_squeue_exits_0(
    tmp_path: Path,
) -> None:
    bin_dir = fake_bin(
        tmp_path,
        squeue=prints("squeue_controller_down.json"),
        sinfo=prints("sinfo_nodes_off.json"),
    )

    with pytest.raises(SlurmUnavailable, match="Failed while looking for jobs"):
        await SlurmScheduler(bin_dir=bin_dir).snapshot()


async def test_malformed_output_is_invalid_not_an_empty_queue(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, squeue="echo '{\"jobs\": ['", sinfo=prints("sinfo_nodes_off.json"))

    with pytest.raises(SlurmOutputInvalid, match="squeue --json printed no valid JSON"):
        await SlurmScheduler(bin_dir=bin_dir).snapshot()


async def test_a_program_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    bin_dir = fake_bin(tmp_path, sinfo=f"echo $$ > {pid_file}; exec sleep 30")
    started = time.monotonic()

    with pytest.raises(SlurmUnavailable, match=r"did not finish within 0\.5 s"):
        await SlurmScheduler(bin_dir=bin_dir, timeout=0.5).nodes()

    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


async def test_a_missing_program_is_unavailable_and_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(SlurmUnavailable, match="install Debian's slurm-client"):
        await SlurmScheduler(bin_dir=fake_bin(tmp_path)).nodes()


async def test_other_failures_keep_the_command_and_its_message(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, scontrol="echo 'slurm_update error: Access denied' >&2; exit 1")

    with pytest.raises(SlurmCommandFailed) as failed:
        await SlurmScheduler(bin_dir=bin_dir).drain(["node001", "node002"], "hourly billing")

    assert failed.value.command[1:] == (
        "update",
        "nodename=node[001-002]",
        "state=drain",
        "reason=hourly billing",
    )
    assert failed.value.stderr == "slurm_update error: Access denied"


async def test_resume_changes_only_nodes_that_need_it(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    bin_dir = fake_bin(
        tmp_path,
        sinfo=prints("sinfo_busy_draining_lost.json"),
        scontrol=f'echo "$@" >> {calls}',
    )
    slurm = SlurmScheduler(bin_dir=bin_dir)

    await slurm.resume(["node001", "node003"])  # busy, and drained
    await slurm.resume(["node001"])  # nothing to do: no command at all

    assert calls.read_text().splitlines() == ["update nodename=node003 state=resume"]
    with pytest.raises(SlurmUnknownNodes, match="nodes unknown to Slurm: node999"):
        await slurm.resume(["node001", "node999"])


def test_the_harness_says_what_to_install_when_slurm_is_missing() -> None:
    with pytest.raises(SlurmNotInstalled, match=r"apt-get install .*slurmctld slurmd slurm-client"):
        find_binary("slurmctld-not-installed")
