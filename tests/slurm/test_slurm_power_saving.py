"""The mode where Slurm decides: CLOUD nodes with power saving, whose ResumeProgram and
SuspendProgram run the hook as production's wrapper script does (a token from a real auth as the
`slurm` client), which posts to autogrow's hook routes on a stand-in decider that boots or stops
the emulated nodes, as the real one will through the pool."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from slurm_kit import HookServer, eventually, running

from services.autogrow.slurm import SlurmScheduler
from shared.scheduler import NodeActivity
from shared.testing.slurm_cluster import SlurmCluster, hpcfleet_hook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(hook_server: HookServer) -> Iterator[SlurmCluster]:
    def hook(action: str) -> list[str]:
        secret = hook_server.auth.secret_files["slurm"]
        return hpcfleet_hook(
            action, hook_server.url, auth_url=hook_server.auth.url, client_secret_file=secret
        )

    cluster = SlurmCluster(
        4,
        power_saving=True,
        resume_command=hook("resume"),
        suspend_command=hook("suspend"),
        suspend_timeout=2,
    )

    def act(action: str, nodes: list[str]) -> None:
        (cluster.node_up if action == "resume" else cluster.node_down)(nodes)

    hook_server.on_call = act
    with running(cluster):
        yield cluster


@pytest.fixture
def slurm(cluster: SlurmCluster) -> SlurmScheduler:
    return SlurmScheduler(env=cluster.env, timeout=5)


async def test_autogrow_powers_idle_nodes_off_through_slurm(
    cluster: SlurmCluster, slurm: SlurmScheduler, hook_server: HookServer
) -> None:
    nodes = ["node003", "node004"]
    cluster.node_up(nodes)  # booted without a request from Slurm, e.g. kept warm by autogrow
    await eventually(lambda: _all(slurm, nodes, NodeActivity.IDLE), within=10, what="idle nodes")

    await slurm.drain(nodes, "idle at the end of its paid hour")
    await eventually(lambda: _all(slurm, nodes, NodeActivity.DRAINING), within=10, what="drained")
    await slurm.power_down(nodes)

    await eventually(
        lambda: hook_server.nodes_for("suspend") == nodes, within=15, what="SuspendProgram's hook"
    )
    await eventually(
        lambda: all(cluster.node_states()[n] == ("idle", ("CLOUD", "POWERED_DOWN")) for n in nodes),
        within=15,
        what="the nodes powered down, drain cleared (idle_on_node_suspend)",
    )
    assert not set(nodes) & set(cluster.up_nodes())
    assert await _all(slurm, nodes, NodeActivity.DOWN)


async def test_a_job_powers_nodes_on_through_the_hook_and_runs_on_them(
    cluster: SlurmCluster, slurm: SlurmScheduler, hook_server: HookServer
) -> None:
    started = time.monotonic()
    job = cluster.sbatch("sleep 3", nodes=2)

    (compute,) = (await slurm.snapshot()).partitions
    assert (compute.pending_jobs, compute.pending_nodes) == (1, 2)

    took = await eventually(
        lambda: hook_server.nodes_for("resume") == ["node001", "node002"],
        within=20,
        what="ResumeProgram's hook",
    )
    print(f"sbatch -> resume hook: {took:.1f} s")
    assert cluster.job_states()[job] == "CONFIGURING"  # allocated to nodes that are booting

    await eventually(
        lambda: _all(slurm, ["node001", "node002"], NodeActivity.BUSY),
        within=20,
        what="the booted nodes to register",
    )
    print(f"sbatch -> nodes registered: {time.monotonic() - started:.1f} s")
    snap = await slurm.snapshot()  # still CONFIGURING in Slurm, but no longer waiting for nodes
    assert (snap.pending_jobs, snap.running_jobs) == (0, 1)

    await eventually(
        lambda: cluster.job_states()[job] in ("RUNNING", "COMPLETED"),
        within=40,  # Slurm settles CONFIGURING jobs every 30 s
        what=f"job {job} to run",
        every=0.5,
    )
    print(f"sbatch -> job running: {time.monotonic() - started:.1f} s")


async def _all(slurm: SlurmScheduler, names: list[str], wanted: NodeActivity) -> bool:
    activity = {n.name: n.activity for n in await slurm.nodes()}
    return all(activity[n] is wanted for n in names)
