"""How long the trace simulator takes per policy on the full bundled SDSC-SP2 and CTC-SP2 traces.

One process, one policy at a time, the trace's own pool size and per-second billing (pass `2` as
the first argument for twice the pool). Prints the replay's wall and CPU time (on a shared machine
the CPU time is the steadier figure), the policy calls and the peak memory; asserts nothing about
time. The issue's bar: CTC-SP2 under 10 s per policy.

    .venv/bin/python tests/benchmarks/bench_simulator.py [pool multiple]
"""

from __future__ import annotations

import resource
import sys
import time

from rich.console import Console
from rich.table import Table

from services.autogrow.swf import bundled_trace, open_swf
from services.simulator.engine import SimConfig, fitting, origin_of, run
from services.simulator.policies import POLICIES

TRACES = ("SDSC-SP2-1998-4.2-cln.swf.gz", "CTC-SP2-1996-3.1-cln.swf.gz")


def main() -> None:
    multiple = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    table = Table(title=f"trace simulator: one policy per replay, pool = {multiple} x MaxNodes")
    columns = ("trace", "jobs", "nodes", "policy", "replay s", "CPU s", "policy calls", "µs / call")
    for column in columns:
        table.add_column(column, justify="left" if column in ("trace", "policy") else "right")
    for name in TRACES:
        with open_swf(bundled_trace(name)) as reader:
            jobs = list(reader)
        header = reader.header
        assert header.max_nodes and header.max_procs
        config = SimConfig(
            nodes=header.max_nodes * multiple,
            cores_per_node=header.max_procs // header.max_nodes,
        )
        jobs, _ = fitting(jobs, config.nodes, config.cores_per_node)
        for policy, make in POLICIES.items():
            started, cpu = time.perf_counter(), time.process_time()
            result = run(jobs, config, make(), origin=origin_of(header.unix_start_time))
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            per_call = f"{seconds / result.steps * 1e6:,.0f}" if result.steps else "-"
            table.add_row(
                name.removesuffix(".swf.gz"),
                f"{len(jobs):,}",
                str(config.nodes),
                policy,
                f"{seconds:.2f}",
                f"{cpu:.2f}",
                f"{result.steps:,}",
                per_call,
            )
    Console(width=140).print(table)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
