"""The pure half of the Slurm adapter, on squeue/sinfo outputs recorded from a real Slurm 22.05."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from slurm_kit import SAMPLES, sample

from services.autogrow.slurm import (
    NodeNameMap,
    SlurmOutputInvalid,
    SlurmUnavailable,
    array_task_count,
    load_json,
    node_activity,
    parse_jobs,
    parse_nodes,
    queue_snapshot,
)
from shared.scheduler import NodeActivity, PartitionDemand, QueueSnapshot

NOW = datetime(2026, 11, 29, 17, 0, tzinfo=UTC)


def snapshot(squeue: str, sinfo: str) -> QueueSnapshot:
    return queue_snapshot(sample(squeue), sample(sinfo), NOW)


def activities(snap: QueueSnapshot) -> dict[str, NodeActivity]:
    return {n.name: n.activity for n in snap.nodes}


def test_waiting_jobs_on_nodes_that_are_off_are_demand_except_those_nodes_cannot_help() -> None:
    # 1-node jobs x2, array 1-10%3, held, 2-node, exclusive, -n3 -c2, -N5 (too big), 2 arrays
    snap = snapshot("squeue_pending_nodes_off.json", "sinfo_nodes_off.json")

    assert snap.partitions == (
        PartitionDemand(
            partition="compute",
            pending_jobs=24,  # 1+1 + 10 array tasks + 2-node + exclusive + -n3 + 5 + 4 tasks
            pending_cores=23,  # the %3 array adds 3 tasks' cores, not 10
            pending_nodes=3,  # the exclusive node + the widest shared job (2 nodes)
            oldest_pending_since=datetime.fromtimestamp(1795970145, UTC),
        ),
    )
    assert snap.running_jobs == 0
    assert set(activities(snap).values()) == {NodeActivity.DOWN}
    assert all(n.cpus == 4 and n.partitions == ("compute",) for n in snap.nodes)


def test_a_throttled_array_with_all_its_slots_running_adds_jobs_but_no_cores() -> None:
    snap = snapshot("squeue_running.json", "sinfo_busy_draining_lost.json")

    (demand,) = snap.partitions
    # waiting: -n3 -c2 (Resources, 6 cores on 2 nodes), 7 tasks of 4-10%3 (3 of 3 running),
    # tasks 3,5,7 of an unthrottled array; held, too-big, completed and completing jobs are not
    assert (demand.pending_jobs, demand.pending_cores, demand.pending_nodes) == (11, 9, 2)
    assert snap.running_jobs == 11
    assert activities(snap) == {
        "node001": NodeActivity.BUSY,
        "node002": NodeActivity.BUSY,
        "node003": NodeActivity.DRAINING,  # drained with jobs still on it
        "node004": NodeActivity.DOWN,  # stopped under a job: NOT_RESPONDING
    }
    busy = {n.name: n for n in snap.nodes}["node003"]
    assert busy.cpus_allocated == 4 and busy.idle_since is None


def test_configuring_jobs_wait_while_their_nodes_power_up() -> None:
    snap = snapshot("squeue_configuring.json", "sinfo_powering_up.json")

    (demand,) = snap.partitions
    # the -N2 job and four array tasks are CONFIGURING on node[001-002], two tasks throttled
    assert (demand.pending_jobs, demand.pending_cores, demand.pending_nodes) == (7, 6, 2)
    assert snap.running_jobs == 0
    assert set(activities(snap).values()) == {NodeActivity.DOWN}  # booting or powered down


def test_configuring_jobs_on_booted_nodes_count_as_running() -> None:
    # Slurm flags them RUNNING only at its next 30 s pass; counting them as demand till then
    # would power on nodes for jobs that already have theirs.
    snap = snapshot("squeue_booted.json", "sinfo_power_states.json")

    (demand,) = snap.partitions
    assert (demand.pending_jobs, demand.pending_cores, demand.pending_nodes) == (2, 0, 0)
    assert snap.running_jobs == 5
    assert activities(snap) == {
        "node001": NodeActivity.BUSY,
        "node002": NodeActivity.BUSY,
        "node003": NodeActivity.DOWN,  # powered down
        "node004": NodeActivity.DOWN,
        "node005": NodeActivity.DOWN,  # powering down
        "node006": NodeActivity.DOWN,  # drained while powered down
    }
    mixed = {n.name: n for n in snap.nodes}["node002"]
    assert (mixed.cpus, mixed.cpus_allocated) == (4, 2)


def test_an_idle_node_reports_since_when() -> None:
    data = sample("sinfo_power_states.json")
    data["nodes"][1] |= {"state": "idle", "alloc_cpus": 0, "last_busy": 1795970180}

    (node,) = [n for n in parse_nodes(data) if n.name == "node002"]

    assert node.view().activity is NodeActivity.IDLE
    assert node.view().idle_since == datetime.fromtimestamp(1795970180, UTC)


@pytest.mark.parametrize(
    ("state", "flags", "expected"),
    [
        ("idle", [], NodeActivity.IDLE),
        ("idle", ["CLOUD"], NodeActivity.IDLE),
        ("mixed", ["CLOUD"], NodeActivity.BUSY),
        ("allocated", [], NodeActivity.BUSY),
        ("idle", ["COMPLETING"], NodeActivity.BUSY),
        ("idle", ["DRAIN"], NodeActivity.DRAINING),
        ("allocated", ["DRAIN"], NodeActivity.DRAINING),
        ("idle", ["CLOUD", "DRAIN", "POWER_DOWN"], NodeActivity.DRAINING),  # power_down pending
        ("idle", ["CLOUD", "POWERED_DOWN"], NodeActivity.DOWN),
        ("allocated", ["CLOUD", "NOT_RESPONDING", "POWERING_UP"], NodeActivity.DOWN),
        ("idle", ["CLOUD", "POWERING_DOWN"], NodeActivity.DOWN),
        ("idle", ["NOT_RESPONDING"], NodeActivity.DOWN),
        ("down", [], NodeActivity.DOWN),
        ("future", [], NodeActivity.DOWN),
        ("something-new", [], NodeActivity.DOWN),
    ],
)
def test_node_activity(state: str, flags: list[str], expected: NodeActivity) -> None:
    assert node_activity(state, flags) is expected


@pytest.mark.parametrize(
    ("spec", "count"),
    [("1-1000", 1000), ("1,3,5,7,9", 5), ("4-10%3", 7), ("0-15:4", 4), ("7", 1), ("1-3,8-9", 5)],
)
def test_array_task_count(spec: str, count: int) -> None:
    assert array_task_count(spec) == count


@pytest.mark.parametrize("spec", ["1-x", "9-1", "1-9:0"])
def test_array_task_count_refuses_what_it_does_not_understand(spec: str) -> None:
    with pytest.raises(SlurmOutputInvalid, match="array task string"):
        array_task_count(spec)


def test_a_pending_array_is_one_record_for_all_its_tasks() -> None:
    jobs = {j.job_id: j for j in parse_jobs(sample("squeue_pending_nodes_off.json"))}

    array = jobs[3]
    assert (array.array_job_id, array.array_task_id, array.tasks, array.array_max_tasks) == (
        3,
        None,
        10,
        3,
    )
    assert jobs[1].tasks == 1 and jobs[1].array_job_id is None
    assert jobs[6].exclusive and not jobs[1].exclusive
    assert jobs[4].blocked and jobs[8].blocked and not jobs[1].blocked


def test_allocated_nodes_are_expanded_from_the_host_list() -> None:
    jobs = {j.job_id: j for j in parse_jobs(sample("squeue_configuring.json"))}

    assert jobs[1].nodes == ("node001", "node002")


@pytest.mark.parametrize("name", ["squeue_controller_down.json", "sinfo_controller_down.json"])
def test_an_output_with_errors_is_no_view_at_all(name: str) -> None:
    # the controller was down: exit 0, no jobs, no nodes, only the errors list says why
    text = (SAMPLES / name).read_text()

    with pytest.raises(SlurmUnavailable, match="could not read Slurm's state"):
        load_json(text, name)


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"errors": [], "meta": {}'])
def test_output_that_is_not_a_json_object_is_invalid(text: str) -> None:
    with pytest.raises(SlurmOutputInvalid):
        load_json(text, "squeue --json")


def test_records_missing_what_the_adapter_needs_are_invalid() -> None:
    squeue = sample("squeue_running.json")
    del squeue["jobs"][3]["job_state"]

    with pytest.raises(SlurmOutputInvalid, match="job record 4"):
        parse_jobs(squeue)
    with pytest.raises(SlurmOutputInvalid, match="no list of nodes"):
        parse_nodes({"errors": [], "nodes": None})


def test_node_name_map_from_pool_tags() -> None:
    names = NodeNameMap.from_tags(
        "hpcfleet:slurm-node",
        {
            "pool-a-1": {"hpcfleet:slurm-node": "node001"},
            "pool-a-2": {"hpcfleet:slurm-node": "node002"},
            "pool-a-3": {},  # launched, not named yet
        },
    )

    assert names.pool_nodes("node[001-003]") == (["pool-a-1", "pool-a-2"], ["node003"])
    assert names.pool_nodes(["node002"]) == (["pool-a-2"], [])
    assert names.slurm_name("pool-a-2") == "node002"
    assert names.slurm_name("pool-a-3") is None


def test_two_pool_nodes_claiming_one_slurm_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="node001 is tagged on pool nodes a and b"):
        NodeNameMap.from_tags("t", {"a": {"t": "node001"}, "b": {"t": "node001"}})
