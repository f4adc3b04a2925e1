"""Record the squeue/sinfo JSON samples the parser tests read, from real test clusters.

Run as root from the repository root when Slurm's output format may have changed (a new Slurm):
``.venv/bin/python tests/slurm/record_slurm_samples.py``. It takes under a minute, mostly
waiting for Slurm to notice a stopped node. The tests pin numbers taken from these files, so
re-check them after recording.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.testing.slurm_cluster import SlurmCluster, wait_until

SAMPLES = Path(__file__).parent / "samples"


def _save(name: str, data: dict[str, Any]) -> None:
    (SAMPLES / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print("recorded", name)


def _queue_without_power_saving() -> None:
    """Jobs pending on nodes that are off, then running, draining and lost nodes."""
    with SlurmCluster(4) as cluster:
        done = cluster.sbatch("true", nodes=1)
        cluster.sbatch("sleep 300", nodes=1)
        cluster.sbatch("sleep 300", array="1-10%3")
        cluster.sbatch("sleep 300", hold=True)
        cluster.sbatch("sleep 300", nodes=2, ntasks=2)
        cluster.sbatch("sleep 300", "--exclusive", nodes=1)
        cluster.sbatch("sleep 300", ntasks=3, cpus_per_task=2)
        cluster.sbatch("sleep 300", nodes=5)
        cluster.sbatch("sleep 300", array="1-9:2")
        cluster.sbatch("sleep 300", array="1,3,5,7")
        wait_until(
            lambda: all(r != "None" for r in _reasons(cluster)),
            timeout=20,
            what="the scheduler to look at every job",
        )
        _save("squeue_pending_nodes_off.json", cluster.squeue_json())
        _save("sinfo_nodes_off.json", cluster.sinfo_json())

        cluster.node_up("node[001-003]")
        wait_until(
            lambda: (
                cluster.job_states().get(done) == "COMPLETED"
                and list(cluster.job_states().values()).count("RUNNING") >= 3
            ),
            timeout=30,
            what="jobs to run",
        )
        cluster.scontrol("update", "nodename=node003", "state=drain", "reason=sample drain")
        cluster.node_up("node004")
        wait_until(
            lambda: cluster.node_states()["node004"][0] in ("idle", "mixed", "allocated"),
            timeout=20,
            what="node004 up",
        )
        cluster.node_down("node004")
        wait_until(
            lambda: "NOT_RESPONDING" in cluster.node_states()["node004"][1],
            timeout=60,
            what="Slurm to notice node004 is gone",
        )
        _save("squeue_running.json", cluster.squeue_json())
        _save("sinfo_busy_draining_lost.json", cluster.sinfo_json())


def _queue_with_power_saving() -> None:
    """CLOUD nodes: jobs CONFIGURING while nodes power up, then drained and suspending nodes."""
    with SlurmCluster(6, power_saving=True, suspend_timeout=30) as cluster:
        cluster.sbatch("sleep 300", nodes=2)
        cluster.sbatch("sleep 300", array="1-6%4")
        cluster.scontrol("update", "nodename=node006", "state=drain", "reason=sample drain")
        wait_until(
            lambda: any(c.action == "resume" for c in cluster.power_calls()),
            timeout=30,
            what="ResumeProgram",
        )
        _save("squeue_configuring.json", cluster.squeue_json())
        _save("sinfo_powering_up.json", cluster.sinfo_json())
        booting = sorted({n for c in cluster.power_calls() for n in c.nodes})
        cluster.node_up(booting)
        cluster.node_up("node005")  # an unrequested boot: Slurm takes it as an idle node
        wait_until(
            lambda: all(
                "POWERING_UP" not in flags and "POWERED_DOWN" not in flags
                for name, (_, flags) in cluster.node_states().items()
                if name in (*booting, "node005")
            ),
            timeout=20,
            what="booted nodes to register",
        )
        cluster.scontrol("update", "nodename=node005", "state=power_down")
        wait_until(
            lambda: "POWERING_DOWN" in cluster.node_states()["node005"][1],
            timeout=20,
            what="node005 to power down",
        )
        _save("squeue_booted.json", cluster.squeue_json())
        _save("sinfo_power_states.json", cluster.sinfo_json())
        cluster.stop_controller()  # the clients still exit 0, with an "errors" list and no data
        _save("squeue_controller_down.json", cluster.squeue_json())
        _save("sinfo_controller_down.json", cluster.sinfo_json())


def _reasons(cluster: SlurmCluster) -> list[str]:
    return [j["state_reason"] for j in cluster.squeue_json()["jobs"]]


if __name__ == "__main__":
    SAMPLES.mkdir(exist_ok=True)
    _queue_without_power_saving()
    _queue_with_power_saving()
