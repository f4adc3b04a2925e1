"""A Slurm controller stand-in for chaos runs: a trace slice replayed on the run's fast clock, its
nodes up while their EC2 instances run, behind Slurm's own client programs.

Why not autogrow's built-in simulated scheduler (`HPCFLEET_AUTOGROW_SCHEDULER=simulated`, as
`hpcfleet up` runs it)? That one lives inside autogrow's worker: a `kill -9` of the worker would
restart the trace from its first job and lose which jobs ran where, so nothing could check that
every job ran. A real controller is its own process that outlives autogrow, and so is this one:
it runs in the chaos harness, answers ``squeue --json``, ``sinfo --json`` and ``scontrol update``
through shims in a bin dir (`HPCFLEET_AUTOGROW_SLURM_BIN_DIR`), so autogrow goes through its
production Slurm adapter, and it keeps the record of every job run for the invariants.

The machines: a node registers `boot_seconds` (clock time) after the harness first sees its EC2
instance running, and goes down as soon as the instance is seen not running (a job on it is then
killed and requeued, as Slurm would, and counted). As the bundled images do, a node does not
register on its instance's first boot: that is the pool's provisioning boot, which the pool ends
by stopping the node. EC2 is read directly, not hpcfleet's tables, so
the scheduler follows what really runs; the pool's table only gives each instance's node name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import hostlist
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from services.autogrow.simulated import SimulatedJob, SimulatedScheduler
from services.autogrow.swf import SwfJob
from shared.clock import Clock
from shared.scheduler import NodeActivity

log = logging.getLogger(__name__)

POOL_TAG = "hpcfleet:pool"  # services/pool/spec.py: the tags the pool puts on its instances
NODE_TAG = "hpcfleet:node"
PARTITION = "batch"


@dataclass
class JobRun:
    """One run of a job: where and when (clock time); `killed` if a node went down under it."""

    job_id: int
    start: datetime
    end: datetime
    nodes: tuple[str, ...]
    killed: datetime | None = None


@dataclass
class Stretch:
    """A stretch of time an instance was seen running (Unix seconds of the run's clock): it ran
    at least from `start` to `last_seen`, and stopped by `end` (None: still running)."""

    node: str  # the scheduler's name
    node_id: str  # the pool's
    instance_id: str
    start: float
    last_seen: float
    end: float | None = None
    boot: int = 1  # the instance's first boot (the pool's provisioning boot), second, ...


class RecordingScheduler(SimulatedScheduler):
    """The simulated scheduler, noting every start and every kill of a job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.runs: list[JobRun] = []
        self._current: dict[int, JobRun] = {}
        super().__init__(*args, **kwargs)

    def _start(self, job: SimulatedJob) -> None:
        super()._start(job)
        assert job.start is not None and job.end is not None
        run = JobRun(job.job_id, self._at(job.start), self._at(job.end), job.nodes)
        self.runs.append(run)
        self._current[job.job_id] = run

    def _interrupt(self, job: SimulatedJob) -> None:
        run = self._current.pop(job.job_id, None)
        if run is not None:
            run.killed = self._at(self._now)
        super()._interrupt(job)


@dataclass
class StandInStats:
    reads: int = 0
    updates: int = 0
    ec2_errors: int = 0
    names_errors: int = 0
    follow_passes: int = 0
    errors: list[str] = field(default_factory=list)


class SlurmStandIn:
    """See the module docstring: `start()` serves and follows EC2, `begin(jobs)` replays."""

    def __init__(
        self,
        clock: Clock,
        node_names: Sequence[str],
        *,
        cores_per_node: int,
        boot_seconds: float,
        aws_endpoint: str,
        region: str,
        database_dsn: str,
        bin_dir: Path,
        pool: str = "default",
        follow_every: float = 0.2,
    ) -> None:
        self.clock = clock
        self.node_names = list(node_names)
        self.cores_per_node = cores_per_node
        self.boot = timedelta(seconds=boot_seconds)
        self.aws_endpoint = aws_endpoint
        self.region = region
        self.database_dsn = database_dsn
        self.bin_dir = bin_dir
        self.pool = pool
        self.follow_every = follow_every
        self.scheduler = self._new_scheduler([], clock.now())
        self.jobs: list[SimulatedJob] = []
        self.began_at: datetime | None = None
        self.stats = StandInStats()
        self.stretches: list[Stretch] = []  # EC2 running stretches as seen, every instance
        self._open: dict[str, Stretch] = {}  # instance id -> its open stretch
        self._serving: dict[str, tuple[Stretch, datetime]] = {}  # slurmd runs: since when
        self._names: dict[str, str] = {}  # pool node id -> scheduler node name
        self._boots: dict[str, int] = {}  # instance id -> boots seen
        self._up: dict[str, Stretch] = {}  # registered nodes, and the run they registered in
        self._drained: set[str] = set()
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    def _new_scheduler(self, jobs: Sequence[SwfJob], origin: datetime) -> RecordingScheduler:
        return RecordingScheduler(
            jobs,
            self.clock,
            nodes=self.node_names,
            cores_per_node=self.cores_per_node,
            origin=origin,
            partition=PARTITION,
        )

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        app = Starlette(
            routes=[
                Route("/squeue", self._squeue),
                Route("/sinfo", self._sinfo),
                Route("/scontrol", self._scontrol, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._tasks.append(asyncio.create_task(self._server.serve()))
        while not self._server.started:  # noqa: ASYNC110 (uvicorn sets a flag)
            await asyncio.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._write_shims()
        self._tasks.append(asyncio.create_task(self._follow_loop()))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def begin(self, jobs: Sequence[SwfJob]) -> None:
        """Replay `jobs` from now: the first arrives at once. Nodes keep their state."""
        now = self.clock.now()
        first = min((job.submit for job in jobs), default=0)
        scheduler = self._new_scheduler(jobs, now - timedelta(seconds=first))
        for name in sorted(self._up):
            scheduler.node_up(name)
        if self._drained:
            scheduler.drain_nodes(sorted(self._drained))
        self.scheduler = scheduler
        self.jobs = scheduler.jobs
        self.began_at = now

    def _write_shims(self) -> None:
        """squeue and sinfo as curl if there is one (autogrow reads them a few times a second),
        scontrol as a small Python script, which keeps each argument whole and turns a refusal
        into Slurm's stderr."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{self.port}"
        client = (
            "import json, sys, urllib.request, urllib.error\n"
            "program, args = sys.argv[0].rsplit('/', 1)[-1], sys.argv[1:]\n"
            "data = json.dumps(args).encode() if program == 'scontrol' else None\n"
            f"request = urllib.request.Request({base!r} + '/' + program, data=data)\n"
            "try:\n"
            "    with urllib.request.urlopen(request, timeout=10) as answer:\n"
            "        sys.stdout.write(answer.read().decode())\n"
            "except urllib.error.HTTPError as refused:\n"
            "    sys.stderr.write(refused.read().decode())\n"
            "    sys.exit(1)\n"
            "except OSError as error:\n"
            "    sys.stderr.write(f'Unable to contact slurm controller ({error})')\n"
            "    sys.exit(1)\n"
        )
        curl = shutil.which("curl")
        for program in ("squeue", "sinfo", "scontrol"):
            shim = self.bin_dir / program
            if curl and program != "scontrol":
                shim.write_text(f"#!/bin/sh\nexec {curl} -sSf --max-time 10 {base}/{program}\n")
            else:
                shim.write_text(f"#!{sys.executable} -SE\n{client}")
            shim.chmod(0o755)

    # ---- following EC2 ---------------------------------------------------------------------------

    async def _follow_loop(self) -> None:
        session = aioboto3.Session(aws_access_key_id="standin", aws_secret_access_key="standin")
        async with session.client(
            "ec2", endpoint_url=self.aws_endpoint, region_name=self.region
        ) as ec2:
            while True:
                try:
                    await self._follow(ec2)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats.ec2_errors += 1
                    if len(self.stats.errors) < 20:
                        self.stats.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(self.follow_every)

    async def _refresh_names(self, missing: set[str]) -> None:
        try:
            connection = await asyncpg.connect(self.database_dsn, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            self.stats.names_errors += 1
            return
        try:
            rows = await connection.fetch(
                "SELECT node_id, scheduler_node_name FROM pool_nodes WHERE node_id = ANY($1)",
                sorted(missing),
            )
        except (OSError, asyncpg.PostgresError):
            self.stats.names_errors += 1
            return
        finally:
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)
        self._names.update({row["node_id"]: row["scheduler_node_name"] for row in rows})

    async def _follow(self, ec2: Any) -> None:
        """One look at EC2: every instance of the pool, its state, and so which nodes are up.

        A run is told apart from the next by EC2's LaunchTime, which every start restarts: a stop
        and a start between two looks are a reboot, not one long run. What the answer says held
        at some moment between the question and the answer (on a loaded machine, a second of real
        time is many minutes of the run's clock): an instance it shows running surely ran until
        the question was asked, and one it does not show had stopped by the time it came."""
        asked_at = self.clock.now().timestamp()
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{POOL_TAG}", "Values": [self.pool]}]
        )
        running: dict[str, tuple[str, float]] = {}  # node id -> (instance id, launch time)
        async for page in pages:
            for reservation in page["Reservations"]:
                for item in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in item.get("Tags", [])}
                    node_id = tags.get(NODE_TAG)
                    if node_id and item["State"]["Name"] == "running":
                        running[node_id] = (item["InstanceId"], item["LaunchTime"].timestamp())
        seen_at = self.clock.now().timestamp()  # after the answer
        missing = set(running) - set(self._names)
        if missing:
            await self._refresh_names(missing)
        self.stats.follow_passes += 1
        runs: dict[str, tuple[str, str, float]] = {}  # name -> (node id, instance id, launched)
        for node_id, (instance_id, launched) in running.items():
            name = self._names.get(node_id)
            if name is not None:
                runs[name] = (node_id, instance_id, launched)
        for instance_id, stretch in list(self._open.items()):
            run = runs.get(stretch.node)
            if run is None or run[1] != instance_id:
                stretch.end = seen_at  # stopped (or gone) since the last look
                del self._open[instance_id]
            elif run[2] > stretch.start + 1:
                stretch.end = run[2]  # stopped and started again since the last look
                del self._open[instance_id]
        for name, (node_id, instance_id, launched) in runs.items():
            if instance_id not in self._open:
                self._boots[instance_id] = self._boots.get(instance_id, 0) + 1
                start = min(launched, seen_at)  # launched after the question, maybe: not before
                stretch = Stretch(name, node_id, instance_id, start, max(start, asked_at))
                stretch.boot = self._boots[instance_id]
                self._open[instance_id] = stretch
                self.stretches.append(stretch)
            stretch = self._open[instance_id]
            stretch.last_seen = max(stretch.start, asked_at)
        now = self.clock.now()
        for name in list(self._serving):  # slurmd runs from the second boot on (see the doc)
            run = runs.get(name)
            if run is None or self._open.get(run[1]) is not self._serving[name][0]:
                del self._serving[name]
        for name, (_node_id, instance_id, _launched) in runs.items():
            stretch = self._open[instance_id]
            if stretch.boot > 1:
                self._serving.setdefault(name, (stretch, now))
        for name in sorted(set(self._up) | set(self._serving)):
            serving = self._serving.get(name)
            wanted = serving[0] if serving and serving[1] + self.boot <= now else None
            if name in self._up and self._up[name] is not wanted:
                self.scheduler.node_down(name)  # powered off, or rebooted: its job dies
                del self._up[name]
            if wanted is not None and name not in self._up:
                self.scheduler.node_up(name)
                self._up[name] = wanted

    # ---- what the Slurm programs answer ----------------------------------------------------------

    def _epoch(self, moment: datetime | None) -> int:
        return int(moment.timestamp()) if moment is not None else 0

    async def _squeue(self, _request: Request) -> JSONResponse:
        self.stats.reads += 1
        scheduler = self.scheduler
        now = self.clock.now()
        scheduler.advance_to(now)
        at = (now - scheduler.origin).total_seconds()
        rejected = {id(job) for job in scheduler.rejected}
        records = []
        for job in scheduler.jobs:
            if job.submit > at or id(job) in rejected:
                continue
            if job.start is not None and job.end is not None and job.end <= at:
                continue  # finished
            running = job.start is not None
            records.append(
                {
                    "job_id": job.job_id,
                    "job_state": "RUNNING" if running else "PENDING",
                    "state_reason": "None" if running else "Resources",
                    "partition": PARTITION,
                    "node_count": job.nodes_needed,
                    "cpus": job.procs,
                    "shared": "none",  # whole nodes, as the replay places them
                    "nodes": hostlist.collect_hostlist(list(job.nodes)) if running else "",
                    "submit_time": self._epoch(scheduler.origin + timedelta(seconds=job.submit)),
                }
            )
        return JSONResponse({"jobs": records, "errors": []})

    async def _sinfo(self, _request: Request) -> JSONResponse:
        self.stats.reads += 1
        records = []
        for node in await self.scheduler.nodes():
            flags = ["CLOUD"]
            if node.activity is NodeActivity.DOWN:
                state = "idle"
                flags.append("POWERED_DOWN")
            elif node.cpus_allocated:
                state = "allocated"
            else:
                state = "idle"
            if node.name in self._drained:
                flags.append("DRAIN")
            records.append(
                {
                    "name": node.name,
                    "state": state,
                    "state_flags": flags,
                    "cpus": node.cpus,
                    "alloc_cpus": node.cpus_allocated,
                    "partitions": list(node.partitions),
                    "last_busy": self._epoch(node.idle_since),
                }
            )
        return JSONResponse({"nodes": records, "errors": []})

    async def _scontrol(self, request: Request) -> PlainTextResponse:
        """``scontrol update nodename=<hostlist> state=drain|resume|power_down[_force] ...``."""
        self.stats.updates += 1
        args = [str(a) for a in await request.json()]
        settings = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        if not args or args[0] != "update" or "nodename" not in settings:
            return PlainTextResponse(f"scontrol: unsupported: {' '.join(args)}", status_code=400)
        names = hostlist.expand_hostlist(settings["nodename"])
        unknown = [n for n in names if n not in self.node_names]
        if unknown:
            return PlainTextResponse(
                f"slurm_update error: Invalid node name specified {','.join(unknown)}",
                status_code=400,
            )
        state = settings.get("state", "").lower()
        if state == "drain":
            self._drained.update(names)
            self.scheduler.drain_nodes(names)
        elif state == "resume":
            self._drained.difference_update(names)
            self.scheduler.resume_nodes(names)
        elif state.startswith("power_down"):
            pass  # slurm-decides mode only; this run lets hpcfleet decide
        else:
            return PlainTextResponse(f"scontrol: unsupported state {state!r}", status_code=400)
        return PlainTextResponse("")

    # ---- the record ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every job of the replay ran to its end."""
        self.scheduler.advance_to(self.clock.now())
        return bool(self.jobs) and self.scheduler.done

    def unfinished(self) -> list[SimulatedJob]:
        now = (self.clock.now() - self.scheduler.origin).total_seconds()
        return [j for j in self.jobs if j.start is None or j.end is None or j.end > now]
