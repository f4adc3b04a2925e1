"""`SlurmScheduler` on a real Slurm controller, in the mode where hpcfleet decides: no power
saving, nodes are down until their machine boots (the harness's `node_up`), jobs wait PENDING."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from slurm_kit import eventually, running

from services.autogrow.slurm import SlurmScheduler, SlurmUnavailable, SlurmUnknownNodes
from shared.scheduler import NodeActivity, PartitionDemand
from shared.testing.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    with running(SlurmCluster(4, cpus_per_node=4)) as cluster:
        yield cluster


@pytest.fixture
async def slurm(cluster: SlurmCluster) -> AsyncIterator[SlurmScheduler]:
    """The adapter on the module's cluster; each test's jobs are cancelled after it."""
    yield SlurmScheduler(env=cluster.env, timeout=5)
    cluster.scancel()


async def demand(slurm: SlurmScheduler) -> PartitionDemand:
    (compute,) = (await slurm.snapshot()).partitions
    return compute


async def activity(slurm: SlurmScheduler) -> dict[str, NodeActivity]:
    return {n.name: n.activity for n in await slurm.nodes()}


async def test_jobs_waiting_for_nodes_that_are_off_are_demand(
    cluster: SlurmCluster, slurm: SlurmScheduler
) -> None:
    cluster.sbatch("sleep 60", nodes=1)
    cluster.sbatch("sleep 60", array="1-6%2")
    cluster.sbatch("sleep 60", hold=True)  # waits for a user, not for nodes
    cluster.sbatch("sleep 60", "--exclusive", nodes=2)

    # 1 + 6 tasks + the exclusive job; cores: 1 + 2 (%2) + 2; nodes: 2 exclusive + 1 shared
    await eventually(
        lambda: _demand_is(slurm, (8, 5, 3)), within=10, what="demand of 8 jobs, 5 cores, 3 nodes"
    )
    assert (await demand(slurm)).oldest_pending_since is not None
    assert set((await activity(slurm)).values()) == {NodeActivity.DOWN}
    assert set(cluster.job_states().values()) == {"PENDING"}


async def test_jobs_run_on_nodes_that_come_up(cluster: SlurmCluster, slurm: SlurmScheduler) -> None:
    job = cluster.sbatch("sleep 60", nodes=2, ntasks=2)

    cluster.node_up("node[001-002]")

    took = await eventually(lambda: _running(cluster, job), within=20, what=f"job {job} to run")
    print(f"node up -> job running: {took:.1f} s")
    snap = await slurm.snapshot()
    assert snap.running_jobs == 1 and snap.pending_jobs == 0
    views = {n.name: n for n in snap.nodes}
    assert [views[n].activity for n in ("node001", "node002", "node003")] == [
        NodeActivity.BUSY,
        NodeActivity.BUSY,
        NodeActivity.DOWN,
    ]
    assert views["node001"].cpus_allocated == 1
    (record,) = [j for j in cluster.squeue_json()["jobs"] if j["job_id"] == job]
    assert record["nodes"] == "node[001-002]"


async def test_a_pending_array_throttled_by_its_running_tasks(
    cluster: SlurmCluster, slurm: SlurmScheduler
) -> None:
    cluster.node_up("node[001-002]")
    array = cluster.sbatch("sleep 60", array="1-10%3")

    await eventually(lambda: _count(cluster, "RUNNING") == 3, within=20, what="3 tasks running")
    compute = await demand(slurm)
    assert (compute.pending_jobs, compute.pending_cores) == (7, 0)  # the %3 slots are all used
    assert (await slurm.snapshot()).running_jobs == 3

    cluster.scontrol("update", f"jobid={array}", "arraytaskthrottle=5")
    await eventually(lambda: _count(cluster, "RUNNING") == 5, within=20, what="5 tasks running")
    compute = await demand(slurm)
    assert (compute.pending_jobs, compute.pending_cores) == (5, 0)


async def test_drain_and_resume(cluster: SlurmCluster, slurm: SlurmScheduler) -> None:
    cluster.node_up("node[001-002]")
    await eventually(
        lambda: _activity_is(slurm, "node001", NodeActivity.IDLE), within=10, what="node001 idle"
    )

    await slurm.drain(["node001", "node002"], "idle 300 s; drain before power-off")

    nodes = await activity(slurm)
    assert (nodes["node001"], nodes["node002"]) == (NodeActivity.DRAINING, NodeActivity.DRAINING)
    reasons = {n["name"]: n["reason"] for n in cluster.sinfo_json()["nodes"]}
    assert reasons["node001"] == "idle 300 s; drain before power-off"
    job = cluster.sbatch("sleep 60", nodes=1)  # drained nodes take no new job
    assert (await demand(slurm)).pending_jobs == 1

    await slurm.resume(["node001", "node002"])
    await slurm.resume(["node001", "node002"])  # again: nothing to do, no error

    await eventually(lambda: _running(cluster, job), within=20, what=f"job {job} to run")
    assert NodeActivity.DRAINING not in (await activity(slurm)).values()


async def test_unknown_node_names_are_refused(slurm: SlurmScheduler) -> None:
    with pytest.raises(SlurmUnknownNodes, match="nodes unknown to Slurm: gpu01"):
        await slurm.drain(["node001", "gpu01"], "test")
    with pytest.raises(SlurmUnknownNodes, match="nodes unknown to Slurm: gpu01"):
        await slurm.resume(["gpu01"])


async def test_a_stopped_controller_is_unavailable_and_a_restarted_one_remembers(
    cluster: SlurmCluster,
) -> None:
    job = cluster.sbatch("sleep 60", hold=True)
    cluster.stop_controller()
    slurm = SlurmScheduler(env=cluster.env, timeout=1)
    try:
        with pytest.raises(SlurmUnavailable):
            await slurm.snapshot()
    finally:
        print(f"controller restart: {cluster.start_controller():.2f} s")
    assert job in cluster.job_states()
    assert len((await slurm.snapshot()).nodes) == 4
    cluster.scancel(job)


def _running(cluster: SlurmCluster, job: int) -> bool:
    return cluster.job_states().get(job) == "RUNNING"


def _count(cluster: SlurmCluster, state: str) -> int:
    return list(cluster.job_states().values()).count(state)


async def _demand_is(slurm: SlurmScheduler, expected: tuple[int, int, int]) -> bool:
    compute = await demand(slurm)
    return (compute.pending_jobs, compute.pending_cores, compute.pending_nodes) == expected


async def _activity_is(slurm: SlurmScheduler, name: str, wanted: NodeActivity) -> bool:
    return (await activity(slurm))[name] is wanted
