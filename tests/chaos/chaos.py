"""The chaos run: the distributed system under kills, restarts, AWS faults and bad input, with its
invariants checked at the end.

    python tests/chaos/chaos.py --seed 7 --minutes 10   # make chaos; or python -m tests.chaos.chaos
    python tests/chaos/chaos.py --seed 15 --minutes 1.5 --kills 5 --nodes 8 --max-jobs 200  # CI

What runs: its own PostgreSQL, RabbitMQ and moto server (`shared.testing.instances`), every
service's API and worker as processes (`shared.testing.fleet`) on one accelerated clock, auth
vending AWS credentials through a development AD FS (the harness serves it) and moto's STS, and a
Slurm controller stand-in (`slurm_standin`) replaying a slice of the bundled SDSC-SP2 trace.

The fault schedule is drawn from `--seed` alone, so a seed always means the same faults at the
same moments of the run (what the system does in between still depends on timing): `kill -9` of
random service processes, each restarted after a random delay; the broker's connections closed
from the server side; a PostgreSQL restart; AWS calls failing at `--aws-fault-rate` with
throttling, insufficient capacity and 5xx (moto's /_fault); a poison message on each consuming
service's queue; a duplicate of a real message to each; and a second image baked halfway, so the
pool rolls under fire. Then the faults stop, the run waits for the system to converge and checks
the invariants (see `Checker`); the report says what broke, and the exit status is 1 if anything
did.

    python tests/chaos/chaos.py --soak --minutes 60   # make soak

`--soak` runs no fault at all: the same fleet replays the trace at a steady rate for `--minutes`
(an hour by default, at x240: the jobs the trace submits in those ten days of its clock, arriving
evenly spaced over the whole hour, see `trace_slice`), sampling every process's memory (VmRSS with
its children's) at the start, periodically and at the end, then checks the same invariants; the
report has each process's growth and the messages sent and handled a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import boto3
import httpx
import uvicorn
from cryptography.hazmat.primitives import serialization

from services.auth.devidp import DevIdp, DevIdpConfig, DevUser, SigningKeyPair, role_value
from services.autogrow.swf import SwfJob, bundled_trace, open_swf
from services.up import default_subnets, rehearsal_recipes
from shared.clock import Clock, SystemClock
from shared.events import PowerState
from shared.process import ClockSettings, accelerated_loops, process_clock
from shared.testing.fleet import CONSUMERS, Fleet, FleetConfig
from shared.testing.instances import OwnMoto, OwnPostgres, OwnRabbitMQ
from shared.tokens import TokenIssuer, generate_signing_key, public_key_pem

try:  # python tests/chaos/chaos.py, and pytest, see this folder's modules at the top level
    from slurm_standin import NODE_TAG, POOL_TAG, SlurmStandIn
except ModuleNotFoundError:  # python -m tests.chaos.chaos
    from tests.chaos.slurm_standin import NODE_TAG, POOL_TAG, SlurmStandIn

TRACE = "SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz"
ACCOUNT = "123456789012"
PROVIDER = f"arn:aws:iam::{ACCOUNT}:saml-provider/ADFS"
AWS_CLIENTS = ("pool", "bakery", "audit")  # the services that call AWS
POISON_ROUTE = {"pool": "PowerOff", "autogrow": "NodePowerChanged", "bakery": "BuildImage"}
CORES_PER_NODE = 16  # SDSC-SP2's widest job (100 processors) fits on 7 nodes
GONE = ("shutting-down", "terminated")
BOOT = "boot-"  # a provisioning boot's power change, as the checker keeps it (see `Checker`)


# ---- options and the fault schedule --------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run: the defaults are `make chaos`'s ten minutes (see `parse` for each)."""

    seed: int = 1
    minutes: float = 10.0  # of faults
    kills: int = 24
    disconnects: int = 2
    postgres_restarts: int = 1
    aws_fault_rate: float = 0.10
    nodes: int = 16
    max_jobs: int = 400
    speed: float = 720.0  # half a day of trace a minute
    converge_minutes: float = 5.0
    workdir: Path | None = None
    keep: bool = False
    soak: bool = False  # no faults; memory sampled (see the module doc)


@dataclass(frozen=True)
class Planned:
    """One fault of the schedule: `at` seconds into the fault phase."""

    at: float
    kind: str  # kill, disconnect, postgres-restart, poison, duplicate, bake
    target: str = ""
    delay: float = 0.0  # kill: seconds before the restart; postgres: seconds down
    pick: float = 0.0  # duplicate: which real message (a fraction of the outbox)


def plan_faults(options: Options, processes: Sequence[str]) -> list[Planned]:
    """The whole schedule from the seed alone: the same seed gives the same faults."""
    rng = random.Random(options.seed)
    span = options.minutes * 60
    planned: list[Planned] = []
    # kills spread evenly (one per slot, at a random point of it) so they never pile up, and
    # going round the processes in a shuffled order, so each is killed once before any twice
    slot = span * 0.9 / max(1, options.kills)
    victims = sorted(processes)
    rng.shuffle(victims)
    for i in range(options.kills):
        planned.append(
            Planned(
                at=round(span * 0.05 + (i + rng.uniform(0.1, 0.9)) * slot, 2),
                kind="kill",
                target=victims[i % len(victims)],
                delay=round(rng.uniform(0.5, 5.0), 2),
            )
        )
    for _ in range(options.disconnects):
        planned.append(Planned(round(rng.uniform(0.1, 0.9) * span, 2), "disconnect"))
    for _ in range(options.postgres_restarts):
        at = round(rng.uniform(0.2, 0.8) * span, 2)
        planned.append(Planned(at, "postgres-restart", delay=round(rng.uniform(1.0, 4.0), 2)))
    for consumer in CONSUMERS:
        planned.append(Planned(round(rng.uniform(0.05, 0.95) * span, 2), "poison", consumer))
        at = round(rng.uniform(0.3, 0.95) * span, 2)
        planned.append(Planned(at, "duplicate", consumer, pick=round(rng.random(), 4)))
    planned.append(Planned(round(rng.uniform(0.3, 0.6) * span, 2), "bake", "linux"))
    return sorted(planned, key=lambda p: (p.at, p.kind, p.target))


def aws_faults(rate: float) -> list[dict[str, Any]]:
    """moto /_fault bodies: every call fails with probability `rate` (throttling and 5xx, half
    each); launches and starts also fail for capacity, at a third of `rate`."""
    each = 1 - math.sqrt(1 - rate)
    capacity = {
        "code": "InsufficientInstanceCapacity",
        "status": 500,
        "rate": rate / 3,
        "message": "We currently do not have sufficient capacity in the Availability Zone you "
        "requested (chaos).",
    }
    return [
        {"action": "RunInstances", **capacity},
        {"action": "StartInstances", **capacity},
        {"action": "*", "code": "RequestLimitExceeded", "status": 503, "rate": each},
        {"action": "*", "code": "InternalError", "status": 500, "rate": each},
    ]


def trace_slice(
    seed: int, budget_seconds: float, max_jobs: int, *, steady: bool = False
) -> tuple[list[SwfJob], dict[str, Any]]:
    """Consecutive jobs of the bundled trace from a seeded offset that fit `budget_seconds` of
    clock time (submit offset plus run time); jobs longer than the window are left out.

    By default the jobs keep the trace's own arrival times and arrive over the first 60 % of the
    window (the rest lets the last ones finish). `steady` (the soak's): the jobs the trace submits
    over the whole window, in its order and each with its own size and run time, arrive evenly
    spaced across the whole window instead, so the event rate is the same in the last minutes as
    in the first (the trace's arrivals come in bursts, several times the mean rate for hours)."""
    with open_swf(bundled_trace(TRACE)) as reader:
        jobs = list(reader)
    rng = random.Random(seed * 7919 + 1)
    offset = rng.randrange(0, len(jobs) // 2)
    first = jobs[offset].submit
    chosen: list[SwfJob] = []
    left_out = 0
    if steady:
        window = [j for j in jobs[offset:] if j.submit - first <= budget_seconds][:max_jobs]
        gap = budget_seconds / max(1, len(window))
        for i, job in enumerate(window):
            at = round(i * gap)
            if at + job.run_time > budget_seconds:
                left_out += 1
                continue
            chosen.append(job._replace(submit=first + at))
    else:
        for job in jobs[offset:]:
            if job.submit - first > budget_seconds * 0.6 or len(chosen) >= max_jobs:
                break
            if job.submit - first + job.run_time > budget_seconds:
                left_out += 1
                continue
            chosen.append(job)
    span = chosen[-1].submit - chosen[0].submit if chosen else 0
    about = {
        "trace": TRACE,
        "first_job": chosen[0].job_id if chosen else None,
        "last_job": chosen[-1].job_id if chosen else None,
        "jobs": len(chosen),
        "left_out_too_long": left_out,
        "arrivals": "evenly spaced" if steady else "as in the trace",
        "arrivals_span_fraction": round(span / budget_seconds, 3) if budget_seconds else 0.0,
        "processors": sum(j.procs for j in chosen),
        "node_hours": round(
            sum(j.run_time * -(-j.procs // CORES_PER_NODE) for j in chosen) / 3600, 1
        ),
    }
    return chosen, about


# ---- the report ----------------------------------------------------------------------------------


@dataclass
class KillRecord:
    process: str
    at: float  # seconds into the fault phase
    pid: int
    down_seconds: float
    ready_seconds: float | None = None  # after the restart, until it serves again
    settled_seconds: float | None = None  # after the restart, until its backlog is drained


@dataclass
class Invariant:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    seed: int
    command: str
    options: dict[str, Any]
    trace: dict[str, Any] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    aws_faults: dict[str, int] = field(default_factory=dict)
    aws_calls_failed: int = 0
    kills: list[KillRecord] = field(default_factory=list)
    postgres_down_seconds: list[float] = field(default_factory=list)
    disconnected_connections: list[int] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    warmup_seconds: float = 0.0
    fault_seconds: float = 0.0
    converge_seconds: float | None = None
    converge_waits: list[str] = field(default_factory=list)
    invariants: list[Invariant] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)  # the soak's: see `ChaosRun.sample`
    workdir: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.invariants) and all(i.passed for i in self.invariants)

    def text(self) -> str:
        lines = [
            f"hpcfleet {'soak' if self.options.get('soak') else 'chaos'} run, seed {self.seed}: "
            f"{'PASSED' if self.passed else 'FAILED'}",
            f"  reproduce: {self.command}",
            f"  trace: {self.trace.get('jobs')} jobs of {self.trace.get('trace')} "
            f"(ids {self.trace.get('first_job')}..{self.trace.get('last_job')}, "
            f"{self.trace.get('node_hours')} node-hours; arrivals "
            f"{self.trace.get('arrivals', 'as in the trace')} over "
            f"{100 * self.trace.get('arrivals_span_fraction', 0):.0f} % of the run), "
            f"clock x{self.options.get('speed')}",
            f"  run {self.total_seconds:.0f} s: warm-up {self.warmup_seconds:.0f} s, faults "
            f"{self.fault_seconds:.0f} s, converged "
            + (
                f"{self.converge_seconds:.1f} s after the faults stopped"
                if self.converge_seconds is not None
                else "NEVER: " + "; ".join(self.converge_waits)
            ),
            "  faults injected: "
            + ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())),
            f"  AWS calls failed: {self.aws_calls_failed} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.aws_faults.items()))})",
            f"  broker connections closed: {self.disconnected_connections}; "
            f"PostgreSQL down: {[round(s, 1) for s in self.postgres_down_seconds]} s",
        ]
        if self.kills:
            ready = [k.ready_seconds for k in self.kills if k.ready_seconds is not None]
            settled = [k.settled_seconds for k in self.kills if k.settled_seconds is not None]
            lines.append(
                f"  kills: {len(self.kills)}; back serving after restart: median "
                f"{_median(ready):.1f} s, max {max(ready, default=0):.1f} s; backlog drained: "
                f"median {_median(settled):.1f} s, max {max(settled, default=0):.1f} s"
            )
            for kill in self.kills:
                lines.append(
                    f"    {kill.at:7.1f} s  kill -9 {kill.process:<16} down "
                    f"{kill.down_seconds:4.1f} s, ready {_fmt(kill.ready_seconds)}, settled "
                    f"{_fmt(kill.settled_seconds)}"
                )
        if len(self.samples) > 1:
            lines += soak_table(self.samples)
        if self.crashes:
            lines.append(f"  processes that died on their own: {self.crashes}")
        lines.append("  invariants:")
        for invariant in self.invariants:
            mark = "PASS" if invariant.passed else "FAIL"
            lines.append(f"    [{mark}] {invariant.name}: {invariant.detail}")
        if self.numbers:
            lines.append(
                "  numbers: " + ", ".join(f"{k} {v}" for k, v in sorted(self.numbers.items()))
            )
        lines.append(f"  logs and report.json: {self.workdir}")
        return "\n".join(lines)


def soak_table(samples: Sequence[dict[str, Any]]) -> list[str]:
    """The soak's lines: messages a second, and each process's memory at the start and the end."""
    first, last = samples[0], samples[-1]
    span = max(1e-9, last["at"] - first["at"])
    sent, handled = last["sent"] - first["sent"], last["handled"] - first["handled"]
    lines = [
        f"  soak: {span:.0f} s, {len(samples)} samples; {sent} messages sent "
        f"({sent / span:.2f}/s), {handled} handled ({handled / span:.2f}/s)",
        f"    {'process (RSS with children)':<28} {'start MB':>9} {'end MB':>9} {'growth':>16}",
    ]
    for name, start in first["rss_mb"].items():
        end = last["rss_mb"].get(name)
        if start is None or end is None:
            growth = "(not running)"
        else:
            growth = f"{end - start:+.1f} MB {100 * (end - start) / start:+.0f}%"
        lines.append(f"    {name:<28} {_fmt_mb(start):>9} {_fmt_mb(end):>9} {growth:>16}")
    return lines


def _fmt_mb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:.1f}"


def memory_mb(pids: dict[str, int | None]) -> dict[str, float | None]:
    """Each process's VmRSS plus its descendants' (a server's own workers: PostgreSQL's backends,
    RabbitMQ's beam), in MB, from /proc; None for a process not running."""
    children: defaultdict[int, list[int]] = defaultdict(list)
    rss: dict[int, int] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            status = (proc / "status").read_text()
            kb = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
            rss[int(proc.name)] = int(kb.group(1)) if kb else 0
            children[ppid].append(int(proc.name))
    found: dict[str, float | None] = {}
    for name, pid in pids.items():
        if pid is None or pid not in rss:
            found[name] = None
            continue
        total, todo = 0, [pid]
        while todo:
            current = todo.pop()
            total += rss.get(current, 0)
            todo += children[current]
        found[name] = round(total / 1024, 1)
    return found


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


# ---- small clients: the database and the broker, through restarts --------------------------------


class Db:
    """Queries against the run's PostgreSQL, each on a fresh connection, retried while the
    server restarts."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def fetch(self, sql: str, *args: Any, patience: float = 30.0) -> list[asyncpg.Record]:
        deadline = time.monotonic() + patience
        while True:
            try:
                connection = await asyncpg.connect(self.dsn, timeout=5)
                try:
                    return list(await connection.fetch(sql, *args, timeout=30))
                finally:
                    await connection.close(timeout=5)
            except (
                OSError,
                TimeoutError,
                asyncpg.InterfaceError,
                asyncpg.PostgresConnectionError,
                asyncpg.exceptions.OperatorInterventionError,
            ):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def value(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None


class Broker:
    """The harness's own AMQP connection to the run's RabbitMQ: publishes bad input, reads queue
    depths and dead letters."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url = url
        self.exchange = exchange
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def connection(self) -> aio_pika.abc.AbstractRobustConnection:
        if self._connection is None:
            self._connection = await aio_pika.connect_robust(
                self.url, client_properties={"connection_name": "chaos-harness"}
            )
        return self._connection

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        message_id: str,
        correlation_id: str,
        *,
        attempts: int = 20,
    ) -> None:
        for attempt in range(attempts):
            try:
                connection = await self.connection()
                channel = await connection.channel(publisher_confirms=True)
                try:
                    exchange = await channel.get_exchange(self.exchange)
                    message = aio_pika.Message(
                        body,
                        message_id=message_id,
                        correlation_id=correlation_id,
                        type=routing_key,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                    await exchange.publish(message, routing_key=routing_key, timeout=10)
                    return
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            except (aio_pika.exceptions.AMQPError, ConnectionError, TimeoutError):
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.5)

    async def queue_state(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue; None if it does not exist or cannot be read."""
        try:
            connection = await self.connection()
            channel = await connection.channel()
        except (aio_pika.exceptions.AMQPError, ConnectionError, TimeoutError):
            return None
        try:
            queue = await channel.declare_queue(name, passive=True, robust=False)
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        except (aio_pika.exceptions.AMQPError, ConnectionError, TimeoutError):
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def drain(self, name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take every message off a queue (the dead letters, at the end)."""
        connection = await self.connection()
        channel = await connection.channel()
        taken = []
        try:
            queue = await channel.declare_queue(name, passive=True, robust=False)
            while (message := await queue.get(fail=False, timeout=10)) is not None:
                await message.ack()
                taken.append(message)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return []
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return taken


async def wait_for(
    condition: Callable[[], Awaitable[bool]], within: float, every: float = 0.25
) -> float | None:
    """Seconds until `condition` held, or None if it never did within `within` seconds."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        try:
            if await condition():
                return time.monotonic() - began
        except Exception:  # a check that fails under chaos is just not true yet
            pass
        await asyncio.sleep(every)
    return None


# ---- the run -------------------------------------------------------------------------------------


class ChaosRun:
    """One run: servers, fleet, warm-up, faults, convergence, invariants; see the module doc."""

    def __init__(self, options: Options, command: str) -> None:
        self.options = options
        self.workdir = options.workdir or Path(tempfile.mkdtemp(prefix="hpcfleet-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.exchange = f"chaos{options.seed}"
        self.report = Report(
            seed=options.seed,
            command=command,
            options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
            workdir=str(self.workdir),
        )
        self.epoch = time.time()
        self.clock: Clock = process_clock(ClockSettings(speed=options.speed, epoch=self.epoch))
        self.secrets: set[str] = set()
        self.vended: set[str] = set()
        self.poison: dict[str, tuple[str, str]] = {}  # message id -> (consumer, routing key)
        self.duplicates: list[tuple[str, str, str]] = []  # (consumer, name, message id)
        self.down: set[str] = set()  # processes killed on purpose, not yet restarted
        self._http = httpx.AsyncClient(timeout=10)
        self.postgres: OwnPostgres | None = None
        self.rabbit: OwnRabbitMQ | None = None
        self.moto: OwnMoto | None = None
        self.fleet: Fleet | None = None
        self.standin: SlurmStandIn | None = None
        self._idp: uvicorn.Server | None = None
        self._idp_task: asyncio.Task[None] | None = None
        self.db: Db | None = None
        self.broker: Broker | None = None
        self.phase_started = 0.0
        self.started = time.monotonic()

    # ---- helpers ---------------------------------------------------------------------------------

    def note(self, line: str) -> None:
        if self.phase_started:
            entry = f"{time.monotonic() - self.phase_started:7.1f} s  {line}"
        else:
            entry = f"  setup {time.monotonic() - self.started:5.1f} s  {line}"
        self.report.timeline.append(entry)
        print(entry, flush=True)

    def every(self, real_seconds: float) -> str:
        return str(real_seconds * self.options.speed)

    # ---- setting up ------------------------------------------------------------------------------

    async def start_servers(self) -> None:
        self.postgres = OwnPostgres()
        self.rabbit = OwnRabbitMQ()
        self.moto = OwnMoto(
            seed=self.options.seed,
            log=self.workdir / "moto.log",
            clock_speed=self.options.speed,
            clock_epoch=self.epoch,
        )
        await asyncio.gather(
            asyncio.to_thread(self.postgres.start),
            asyncio.to_thread(self.rabbit.start),
            asyncio.to_thread(self.moto.start),
        )
        self.db = Db(self.postgres.dsn)
        self.broker = Broker(self.bus_url, self.exchange)

    @property
    def bus_url(self) -> str:
        assert self.rabbit is not None
        return f"{self.rabbit.url}?reconnect_interval=0.5"

    def _write_secret(self, name: str, value: str) -> Path:
        path = self.workdir / "secrets" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(value)
        path.chmod(0o600)
        self.secrets.add(value)
        return path

    async def start_idp(self) -> tuple[str, Path, dict[str, Any]]:
        """The development AD FS, served by the harness: one service account per AWS role."""
        users = []
        roles: dict[str, Any] = {}
        for name in AWS_CLIENTS:
            password = f"{name}-Adfs-{uuid.uuid4().hex[:12]}"
            username = f"svc-{name}@example.test"
            role_arn = f"arn:aws:iam::{ACCOUNT}:role/hpcfleet-{name}"
            users.append(DevUser(username, password, roles=(role_value(role_arn, PROVIDER),)))
            roles[name] = {
                "role_arn": role_arn,
                "username": username,
                "password": f"file:{self._write_secret(f'{name}.adfs-password', password)}",
            }
        signing = SigningKeyPair.generate("adfs.example.test", datetime.now(UTC))
        config = DevIdpConfig(environment="development", users=tuple(users), secure_cookies=False)
        idp = DevIdp(config, signing, SystemClock())  # moto's STS stamps real time
        certificate = self.workdir / "adfs-signing.crt"
        certificate.write_bytes(signing.cert_pem)
        server = uvicorn.Server(
            uvicorn.Config(idp.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        self._idp = server
        self._idp_task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag, not an event)
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", certificate, roles

    def aws_setup(self) -> tuple[Path, list[dict[str, str]], str, str]:
        """In moto: the base image and recipes (as `hpcfleet up` makes them), the default
        subnets, and audit's security-event queue and alert topic."""
        assert self.moto is not None
        region = "us-east-1"
        recipes = rehearsal_recipes(self.workdir, self.moto.endpoint, region)
        subnets = default_subnets(self.moto.endpoint, region)
        sqs = boto3.client(
            "sqs",
            endpoint_url=self.moto.endpoint,
            region_name=region,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        queue_url = sqs.create_queue(QueueName="hpcfleet-security-events")["QueueUrl"]
        sns = boto3.client(
            "sns",
            endpoint_url=self.moto.endpoint,
            region_name=region,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        topic = sns.create_topic(Name="hpcfleet-alerts")["TopicArn"]
        return recipes, subnets, queue_url, topic

    async def build_fleet(self) -> None:
        assert self.postgres and self.moto
        options = self.options
        key = generate_signing_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        key_file = self._write_secret("token-signing-key.pem", pem)
        public_keys = self.workdir / "token-public-keys.pem"
        public_keys.write_text(public_key_pem(key.public_key()))
        self.issuer = TokenIssuer(key)
        self.operator_token = self.issuer.issue(
            "chaos@example.test",
            "operator",
            ["bakery:read", "bakery:write", "pool:read", "autogrow:read", "audit:read"],
            datetime.now(UTC),
        )
        self.secrets.add(self.operator_token)
        clients = {
            name: self._write_secret(f"{name}.client-secret", f"{name}-{uuid.uuid4().hex}")
            for name in AWS_CLIENTS
        }
        self.client_secrets = {name: path.read_text() for name, path in clients.items()}
        adfs_url, certificate, roles = await self.start_idp()
        recipes, subnets, queue_url, topic = await asyncio.to_thread(self.aws_setup)

        env = {
            "HPCFLEET_AUTH_ENVIRONMENT": "development",
            "HPCFLEET_AUTH_SIGNING_KEY": f"file:{key_file}",
            "HPCFLEET_BAKERY_WORK_DIR": str(self.workdir / "bakery"),
            "HPCFLEET_BAKERY_RECIPES": str(recipes),
            **accelerated_loops(options.speed),  # hpcfleet up's: a few passes a second of real time
        }
        self.node_names = [f"node{i:03d}" for i in range(1, options.nodes * 2 + 1)]
        spec = {
            "name": "default",
            "size": options.nodes,
            "instance_types": ["c5.xlarge", "c5a.xlarge"],
            "subnets": subnets,
            "recipe": "linux",
            "boot_timeout": float(self.every(30)),
        }
        env.update(
            {
                "HPCFLEET_POOL_DEFAULT_POOL": json.dumps(spec),
                "HPCFLEET_AUTOGROW_SCHEDULER": "slurm",
                "HPCFLEET_AUTOGROW_SLURM_BIN_DIR": str(self.workdir / "slurm-bin"),
                "HPCFLEET_AUTOGROW_SLURM_TIMEOUT": "10",
                "HPCFLEET_AUTOGROW_POLICY__CORES_PER_NODE": str(CORES_PER_NODE),
                "HPCFLEET_AUTH_ADFS_URL": adfs_url,
                "HPCFLEET_AUTH_ADFS_SIGNING_CERTIFICATES": str(certificate),
                "HPCFLEET_AUTH_ADFS_ISSUER": "http://adfs.example.test/adfs/services/trust",
                "HPCFLEET_AUTH_SAML_PROVIDER_ARN": PROVIDER,
                "HPCFLEET_AUTH_ROLES": json.dumps(roles),
                "HPCFLEET_AUTH_CLIENTS": json.dumps(
                    {name: f"file:{path}" for name, path in clients.items()}
                ),
                "HPCFLEET_AUDIT_QUEUE_URL": queue_url,
                "HPCFLEET_AUDIT_TOPIC_ARN": topic,
                "HPCFLEET_AUDIT_WAIT_SECONDS": "1",
                "HPCFLEET_AUDIT_NOTIFY_INTERVAL": self.every(1),
                "HPCFLEET_AUDIT_RETRY_SECONDS": self.every(0.5),
                "HPCFLEET_AUDIT_RETRY_MAX_SECONDS": self.every(5),
            }
        )
        self.fleet = Fleet(
            FleetConfig(
                workdir=self.workdir,
                database_url=self.postgres.url,
                bus_url=self.bus_url,
                aws_endpoint_url=self.moto.endpoint,
                exchange=self.exchange,
                speed=options.speed,
                epoch=self.epoch,
                token_public_keys=public_keys,
                client_secrets=clients,
                env=env,
            )
        )
        await asyncio.to_thread(self.fleet.migrate)
        self.standin = SlurmStandIn(
            self.clock,
            self.node_names,
            cores_per_node=CORES_PER_NODE,
            boot_seconds=60.0,
            aws_endpoint=self.moto.endpoint,
            region="us-east-1",
            database_dsn=self.postgres.dsn,
            bin_dir=self.workdir / "slurm-bin",
        )
        await self.standin.start()

    async def start_fleet(self) -> None:
        """Every process but autogrow's worker, then that one once pool's queue is declared:
        it publishes the queue at once, and an event published before its consumer's queue
        exists is dropped (nothing else publishes before the harness asks for an image)."""
        fleet = self.fleet
        assert fleet is not None
        first = [name for name in fleet.processes if name != "autogrow-worker"]
        fleet.start(first)
        await self.wait_ready("pool-worker", 120)
        fleet.start(["autogrow-worker"])
        await asyncio.gather(*(self.wait_ready(name, 120) for name in fleet.processes))

    async def process_ready(self, name: str) -> bool:
        fleet = self.fleet
        assert fleet is not None and self.broker is not None
        process = fleet.processes[name]
        if not process.alive:
            return False
        if process.kind == "api":
            return await fleet.api_ready(process.service, self._http)
        text = process.log.read_text(errors="replace")
        if f"worker {process.service} started" not in text.rpartition("--- start ")[2]:
            return False
        if process.service in CONSUMERS:
            state = await self.broker.queue_state(f"{self.exchange}.{process.service}")
            return state is not None and state[1] >= 1
        return True

    async def wait_ready(self, name: str, within: float) -> float:
        waited = await wait_for(lambda: self.process_ready(name), within)
        if waited is None:
            assert self.fleet is not None
            log = self.fleet.processes[name].log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} not ready within {within} s; its log ends:\n{log}")
        return waited

    async def api(self, method: str, service: str, path: str, **kwargs: Any) -> httpx.Response:
        assert self.fleet is not None
        headers = {"authorization": f"Bearer {self.operator_token}"}
        return await self._http.request(
            method, f"{self.fleet.api_url(service)}{path}", headers=headers, **kwargs
        )

    async def bake(self, reason: str) -> str | None:
        for _ in range(100):
            try:
                response = await self.api(
                    "POST", "bakery", "/bakery/builds", json={"recipe": "linux", "reason": reason}
                )
            except httpx.HTTPError:
                await asyncio.sleep(0.5)
                continue
            if response.status_code == 202:
                return str(response.json()["build_id"])
            if response.status_code == 409:
                return None
            await asyncio.sleep(0.5)
        raise RuntimeError("bakery never accepted a build")

    async def warm_up(self) -> None:
        """Bake the first image and wait for the pool to fill on it."""
        began = time.monotonic()
        await self.bake("chaos warm-up")
        converged = await wait_for(self.pool_converged, 240, every=0.5)
        if converged is None:
            raise RuntimeError(f"the pool never filled: {await self.pool_problem()}")
        self.report.warmup_seconds = time.monotonic() - began

    # ---- the fault phase -------------------------------------------------------------------------

    async def fault_phase(self) -> None:
        fleet, moto = self.fleet, self.moto
        assert fleet is not None and moto is not None and self.standin is not None
        schedule = [] if self.options.soak else plan_faults(self.options, list(fleet.processes))
        (self.workdir / "schedule.json").write_text(
            json.dumps([asdict(p) for p in schedule], indent=1)
        )
        budget = self.options.minutes * 60 * self.options.speed
        jobs, about = trace_slice(
            self.options.seed, budget, self.options.max_jobs, steady=self.options.soak
        )
        self.report.trace = about
        self.phase_started = time.monotonic()
        self.standin.begin(jobs)
        self.note(f"replaying {about['jobs']} jobs; {len(schedule)} faults scheduled")
        for body in [] if self.options.soak else aws_faults(self.options.aws_fault_rate):
            response = await self._http.post(f"{moto.endpoint}/_fault", json=body)
            response.raise_for_status()
        monitor = asyncio.create_task(self.monitor())
        running: list[asyncio.Task[None]] = []
        try:
            for planned in schedule:
                wait = planned.at - (time.monotonic() - self.phase_started)
                if wait > 0:
                    await asyncio.sleep(wait)
                running.append(asyncio.create_task(self.inject(planned)))
            end = self.options.minutes * 60 - (time.monotonic() - self.phase_started)
            if end > 0:
                await asyncio.sleep(end)
            await asyncio.gather(*running)
        finally:
            listing = (await self._http.get(f"{moto.endpoint}/_fault")).json()["faults"]
            await self._http.delete(f"{moto.endpoint}/_fault")
            for fault in listing:
                key = f"{fault['action']}:{fault['code']}"
                self.report.aws_faults[key] = fault["hits"]
            self.report.aws_calls_failed = sum(self.report.aws_faults.values())
            self.report.fault_seconds = time.monotonic() - self.phase_started
            self.note("faults stopped")
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            if self.options.soak:
                await self.sample()
            for name in sorted(self.down):  # a restart still pending: do it now
                fleet.restart(name)
            self.down.clear()

    async def inject(self, planned: Planned) -> None:
        try:
            await getattr(self, f"fault_{planned.kind.replace('-', '_')}")(planned)
            self.report.faults[planned.kind] += 1
        except Exception as exc:
            self.note(f"fault {planned.kind} {planned.target} could not be injected: {exc!r}")

    async def fault_kill(self, planned: Planned) -> None:
        fleet = self.fleet
        assert fleet is not None
        name = planned.target
        if name in self.down or not fleet.processes[name].alive:
            # already down: another one, drawn from the schedule's own numbers
            alive = [n for n in fleet.processes if n not in self.down and fleet.processes[n].alive]
            if not alive:
                return
            name = random.Random(planned.at).choice(sorted(alive))
        self.down.add(name)
        at = time.monotonic() - self.phase_started
        pid = fleet.kill(name)
        self.note(f"kill -9 {name} (pid {pid}); restart in {planned.delay} s")
        await asyncio.sleep(planned.delay)
        fleet.restart(name)
        self.down.discard(name)
        record = KillRecord(name, round(at, 1), pid, planned.delay)
        self.report.kills.append(record)
        process = fleet.processes[name]
        ready = await wait_for(lambda: self.process_ready(name), 120)
        record.ready_seconds = None if ready is None else round(ready, 2)
        if ready is not None:
            settled = await wait_for(lambda: self.service_settled(process.service), 120, 0.5)
            record.settled_seconds = None if settled is None else round(ready + settled, 2)
        if process.service == "auth":
            await self.collect_vended()

    async def fault_disconnect(self, planned: Planned) -> None:
        assert self.rabbit is not None
        closed = await asyncio.to_thread(self.rabbit.close_all_connections, "chaos")
        self.report.disconnected_connections.append(closed)
        self.note(f"broker closed {closed} connections from the server side")

    async def fault_postgres_restart(self, planned: Planned) -> None:
        postgres = self.postgres
        assert postgres is not None
        began = time.monotonic()
        self.note(f"PostgreSQL stops for {planned.delay} s")
        await asyncio.to_thread(postgres.stop)
        await asyncio.sleep(planned.delay)
        await asyncio.to_thread(postgres.start)
        down = time.monotonic() - began
        self.report.postgres_down_seconds.append(down)
        self.note(f"PostgreSQL back after {down:.1f} s")

    async def fault_poison(self, planned: Planned) -> None:
        assert self.broker is not None
        consumer, route = planned.target, POISON_ROUTE[planned.target]
        message_id = str(uuid.UUID(int=random.Random(planned.at).getrandbits(128), version=4))
        body = json.dumps({"chaos": "poison", "for": consumer}).encode()[:-1]  # broken JSON
        await self.broker.publish(route, body, message_id, message_id)
        self.poison[message_id] = (consumer, route)
        self.note(f"poison {route} {message_id} onto {consumer}'s queue")

    async def fault_duplicate(self, planned: Planned) -> None:
        """Publish again a message some service really sent, that `planned.target` consumes."""
        assert self.db is not None and self.broker is not None
        consumer = planned.target
        names = {
            "pool": ("PowerOn", "PowerOff", "ImageReady", "QueueDepthChanged"),
            "autogrow": ("NodePowerChanged", "NodeProvisioned", "PowerRefused", "ImageReady"),
            "bakery": ("BuildImage",),
        }[consumer]
        rows: list[Any] = []
        for service in ("pool", "autogrow", "bakery"):
            rows += await self.db.fetch(
                f"SELECT id, name, body, message_id, correlation_id FROM {service}_outbox "
                "WHERE published_at IS NOT NULL AND name = ANY($1) ORDER BY id",
                list(names),
            )
        if not rows:
            self.note(f"no real message for {consumer} to duplicate yet")
            return
        row = rows[min(len(rows) - 1, int(planned.pick * len(rows)))]
        await self.broker.publish(
            row["name"], row["body"], row["message_id"], row["correlation_id"]
        )
        self.duplicates.append((consumer, row["name"], row["message_id"]))
        self.note(f"duplicate of {row['name']} {row['message_id']} (for {consumer})")

    async def fault_bake(self, planned: Planned) -> None:
        build = await self.bake("chaos: a new image mid-run")
        self.note(f"second image asked of bakery: build {build}")

    async def monitor(self) -> None:
        """Processes that die on their own are crashes: note them and start them again. In a
        soak, also take a memory sample now and then (a dozen in the run, at least 10 s apart)."""
        fleet = self.fleet
        assert fleet is not None
        every, due = max(10.0, self.options.minutes * 5), 0.0
        while True:
            if self.options.soak and time.monotonic() >= due:
                due = time.monotonic() + every
                await self.sample()
            await asyncio.sleep(0.5)
            for name, process in fleet.processes.items():
                if name in self.down or process.alive:
                    continue
                tail = process.log.read_text(errors="replace")[-1500:]
                self.report.crashes.append(f"{name} exited {process.exit_code}")
                self.note(
                    f"CRASH: {name} exited {process.exit_code}; restarting. Log tail:\n{tail}"
                )
                fleet.restart(name)

    async def sample(self) -> None:
        """One soak sample: every process's memory, and the messages sent and handled so far."""
        fleet, db = self.fleet, self.db
        assert fleet is not None and db is not None
        servers = {"postgresql": self.postgres, "rabbitmq": self.rabbit, "moto": self.moto}
        pids = {name: process.pid for name, process in fleet.processes.items()}
        pids.update({name: server.pid for name, server in servers.items() if server is not None})
        try:
            sent = sum(
                [await db.value(f"SELECT count(*) FROM {s}_outbox") for s in fleet.config.services]
            )
            handled = sum([await db.value(f"SELECT count(*) FROM {c}_inbox") for c in CONSUMERS])
        except Exception as exc:
            self.note(f"soak sample failed: {exc!r}")
            return
        memory = memory_mb(pids)
        at = round(time.monotonic() - self.phase_started, 1)
        self.report.samples.append({"at": at, "sent": sent, "handled": handled, "rss_mb": memory})
        total = sum(mb for mb in memory.values() if mb is not None)
        self.note(f"memory {total:.0f} MB in all; {sent} messages sent, {handled} handled")

    # ---- convergence -----------------------------------------------------------------------------

    async def newest_image(self) -> str | None:
        assert self.db is not None
        value = await self.db.value(
            "SELECT image_id FROM bakery_images WHERE status = 'available' AND region = $1 "
            "ORDER BY built_at DESC LIMIT 1",
            "us-east-1",
        )
        return None if value is None else str(value)

    async def pool_problem(self) -> str | None:
        """Why the pool is not at its size on the newest image, or None."""
        assert self.db is not None
        newest = await self.newest_image()
        if newest is None:
            return "no image available yet"
        spec = await self.db.value("SELECT spec::text FROM pool_pools WHERE name = 'default'")
        if spec is None:
            return "no pool yet"
        spec_image = json.loads(spec).get("image_id")
        if spec_image != newest:
            return f"pool is on image {spec_image}, the newest is {newest}"
        rows = await self.db.fetch(
            "SELECT state, image_id, provisioned, retiring FROM pool_nodes WHERE pool = 'default'"
        )
        live = [r for r in rows if r["state"] not in (*GONE, "failed")]
        good = [
            r
            for r in live
            if r["provisioned"]
            and r["image_id"] == newest
            and r["retiring"] is None
            and r["state"] in ("running", "stopped")
        ]
        if len(live) != self.options.nodes or len(good) != self.options.nodes:
            states = Counter(f"{r['state']}{'' if r['provisioned'] else '(new)'}" for r in live)
            return f"{len(good)} of {len(live)} live nodes settled on {newest}: {dict(states)}"
        return None

    async def pool_converged(self) -> bool:
        return await self.pool_problem() is None

    async def service_settled(self, service: str) -> bool:
        assert self.db is not None and self.broker is not None
        unpublished = await self.db.value(
            f"SELECT count(*) FROM {service}_outbox WHERE published_at IS NULL"
        )
        if unpublished:
            return False
        if service in CONSUMERS:
            state = await self.broker.queue_state(f"{self.exchange}.{service}")
            return state is not None and state[0] == 0 and state[1] >= 1
        return True

    async def waiting_on(self) -> list[str]:
        """What the system has not settled yet; empty once it converged."""
        fleet, standin = self.fleet, self.standin
        assert fleet is not None and standin is not None
        waits = []
        for name in fleet.processes:
            if not await self.process_ready(name):
                waits.append(f"{name} not ready")
        if not standin.done:
            unfinished = standin.unfinished()
            waits.append(f"{len(unfinished)} jobs unfinished (e.g. {unfinished[0].job_id})")
        problem = await self.pool_problem()
        if problem is not None:
            waits.append(problem)
        for service in fleet.config.services:
            if not await self.service_settled(service):
                waits.append(f"{service}: outbox or queue not drained")
        return waits

    async def converge(self) -> None:
        began = time.monotonic()
        deadline = began + self.options.converge_minutes * 60
        waits: list[str] = ["not checked"]
        last_note = began
        while time.monotonic() < deadline:
            try:
                waits = await self.waiting_on()
            except Exception as exc:
                waits = [f"check failed: {exc!r}"]
            if not waits:
                self.report.converge_seconds = round(time.monotonic() - began, 1)
                self.note(f"converged in {self.report.converge_seconds} s")
                return
            if time.monotonic() - last_note > 15:
                last_note = time.monotonic()
                self.note(f"converging: {'; '.join(waits)}")
            await asyncio.sleep(1.0)
        self.report.converge_waits = waits
        self.note(f"did not converge: {waits}")

    # ---- secrets ---------------------------------------------------------------------------------

    async def collect_vended(self) -> None:
        """The AWS credentials auth hands out now, fetched as each client: none may be logged."""
        assert self.fleet is not None
        base = self.fleet.api_url("auth")
        for name, secret in self.client_secrets.items():
            try:
                token = await self._http.post(
                    f"{base}/auth/token",
                    data={"grant_type": "client_credentials"},
                    auth=(name, secret),
                )
                access = token.json()["access_token"]
                self.vended.add(access)
                credentials = await self._http.get(
                    f"{base}/auth/credentials/{name}",
                    headers={"authorization": f"Bearer {access}"},
                )
                body = credentials.json()
                self.vended.update({body["SecretAccessKey"], body["Token"]})
            except (httpx.HTTPError, KeyError, ValueError):
                continue

    # ---- the whole run ---------------------------------------------------------------------------

    async def run(self) -> Report:
        try:
            await self.start_servers()
            self.note("PostgreSQL, RabbitMQ and moto up")
            await self.build_fleet()
            self.note("migrated; Slurm stand-in up")
            await self.start_fleet()
            self.note("every process ready")
            await self.collect_vended()
            await self.warm_up()
            self.note(f"warm-up done in {self.report.warmup_seconds:.0f} s")
            await self.fault_phase()
            await self.converge()
            await self.collect_vended()
            checker = Checker(self)
            self.report.invariants = await checker.check()
            self.report.numbers = checker.numbers
            self.note("invariants checked")
        finally:
            await self.teardown()
        return self.report

    async def teardown(self) -> None:
        if self.fleet is not None:
            codes = await asyncio.to_thread(self.fleet.stop)
            unclean = {name: code for name, code in codes.items() if code not in (0, None)}
            if self.report.invariants:
                self.report.invariants.append(
                    Invariant(
                        "every process stops cleanly on SIGTERM",
                        not unclean,
                        "all exit 0" if not unclean else f"exit codes {unclean}",
                    )
                )
            leaks = scan_logs(self.fleet.log_paths(), self.secrets | self.vended)
            if self.report.invariants:
                self.report.invariants.append(
                    Invariant(
                        "no credential or token in any log",
                        not leaks,
                        f"{len(self.secrets | self.vended)} secrets and tokens searched in "
                        f"{len(self.fleet.log_paths())} logs, plus token patterns; none found"
                        if not leaks
                        else "; ".join(leaks[:10]),
                    )
                )
        if self.standin is not None:
            await self.standin.stop()
        if self._idp is not None:
            self._idp.should_exit = True
            if self._idp_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._idp_task
        if self.broker is not None:
            await self.broker.close()
        await self._http.aclose()
        for server in (self.moto, self.rabbit, self.postgres):
            if server is None:
                continue
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    server.stop if isinstance(server, OwnMoto) else server.close
                )
        self.report.total_seconds = time.monotonic() - self.started
        (self.workdir / "report.json").write_text(json.dumps(report_json(self.report), indent=1))


_TOKEN = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}")


def scan_logs(paths: Iterable[Path], secrets: set[str]) -> list[str]:
    """Where a known secret, or anything shaped like a signed token, appears in a log."""
    found = []
    needles = sorted(s for s in secrets if len(s) >= 8)
    for path in paths:
        text = path.read_text(errors="replace")
        for needle in needles:
            if needle in text:
                found.append(f"{path.name}: a secret starting {needle[:4]}...")
        for match in _TOKEN.finditer(text):
            found.append(f"{path.name}: a token {match.group(0)[:12]}...")
    return found


def report_json(report: Report) -> dict[str, Any]:
    data = asdict(report)
    data["passed"] = report.passed
    data["faults"] = dict(report.faults)
    return data


# ---- the invariants ------------------------------------------------------------------------------


class Checker:
    """Reads EC2, the tables, the broker and the scheduler's record after convergence, and says
    of each invariant whether it holds and, if not, what broke."""

    def __init__(self, run: ChaosRun) -> None:
        assert run.db and run.broker and run.moto and run.standin and run.rabbit
        self.run = run
        self.db = run.db
        self.numbers: dict[str, Any] = {}

    async def check(self) -> list[Invariant]:
        instances = await asyncio.to_thread(self._instances)
        power, names = await self._pool_power_events()
        results = [
            await self.no_orphan_no_ghost(instances),
            self.no_double_launch(instances),
            await self.pool_converged(),
            await self.jobs_ran(power, names),
            await self.outbox_and_inbox(),
            await self.dead_letters(),
            await self.billing(power),
        ]
        await self.keep_evidence(power, names)
        crashes = self.run.report.crashes
        results.append(
            Invariant(
                "no process died on its own",
                not crashes,
                "none" if not crashes else f"{len(crashes)}: {crashes}",
            )
        )
        return results

    async def keep_evidence(self, power: Power, names: dict[str, set[str]]) -> None:
        """What the invariants were checked on, in the workdir, to see what broke."""
        standin = self.run.standin
        assert standin is not None
        billed = await self.db.fetch("SELECT * FROM autogrow_power_intervals ORDER BY node_id")
        evidence = {
            "epoch": self.run.epoch,
            "speed": self.run.options.speed,
            "pool_power_events": {
                node: [(kind, str(since), str(at)) for kind, since, at in events]
                for node, events in power.items()
            },
            "names": {name: sorted(ids) for name, ids in names.items()},
            "billed": [{k: str(v) for k, v in dict(row).items()} for row in billed],
            "ec2_stretches": [asdict(s) for s in standin.stretches],
            "job_runs": [
                {
                    "job": run.job_id,
                    "nodes": run.nodes,
                    "start": run.start.timestamp(),
                    "end": run.end.timestamp(),
                    "killed": None if run.killed is None else str(run.killed),
                }
                for run in standin.scheduler.runs
            ],
            "standin": asdict(standin.stats),
        }
        (self.run.workdir / "evidence.json").write_text(json.dumps(evidence, indent=1))

    def _instances(self) -> list[dict[str, Any]]:
        assert self.run.moto is not None
        ec2 = boto3.client(
            "ec2",
            endpoint_url=self.run.moto.endpoint,
            region_name="us-east-1",
            aws_access_key_id="check",
            aws_secret_access_key="check",
        )
        found = []
        for page in ec2.get_paginator("describe_instances").paginate():
            for reservation in page["Reservations"]:
                found.extend(reservation["Instances"])
        return found

    async def no_orphan_no_ghost(self, instances: list[dict[str, Any]]) -> Invariant:
        live = {i["InstanceId"]: i for i in instances if i["State"]["Name"] not in GONE}
        tagged = {
            iid
            for iid, i in live.items()
            if {t["Key"]: t["Value"] for t in i.get("Tags", [])}.get(POOL_TAG) == "default"
        }
        rows = await self.db.fetch(
            "SELECT node_id, instance_id, state FROM pool_nodes WHERE instance_id IS NOT NULL"
        )
        table = {r["instance_id"]: r for r in rows if r["state"] not in GONE}
        orphans = sorted(tagged - set(table))
        ghosts = sorted(iid for iid in table if iid not in live)
        others = sorted(set(live) - tagged)  # bakery's builders and testers must be gone too
        self.numbers["instances_launched"] = len(instances)
        self.numbers["pool_instances_live"] = len(tagged)
        problems = []
        if orphans:
            problems.append(f"orphans (in EC2, not in pool_nodes): {orphans}")
        if ghosts:
            states = {iid: table[iid]["state"] for iid in ghosts}
            problems.append(f"ghosts (in pool_nodes, not live in EC2): {states}")
        if others:
            problems.append(f"instances no pool owns still live: {others}")
        return Invariant(
            "every pool-tagged instance is a pool node and vice versa",
            not problems,
            "; ".join(problems)
            or f"{len(tagged)} live pool instances = {len(table)} live rows, no other instance",
        )

    def no_double_launch(self, instances: list[dict[str, Any]]) -> Invariant:
        by_node: defaultdict[str, list[str]] = defaultdict(list)
        by_token: defaultdict[str, list[str]] = defaultdict(list)
        for item in instances:
            tags = {t["Key"]: t["Value"] for t in item.get("Tags", [])}
            if tags.get(POOL_TAG) != "default":
                continue
            by_node[tags.get(NODE_TAG, "?")].append(item["InstanceId"])
            if item.get("ClientToken"):
                by_token[item["ClientToken"]].append(item["InstanceId"])
        twice = {k: v for k, v in by_node.items() if len(v) > 1}
        twice_token = {k: v for k, v in by_token.items() if len(v) > 1}
        self.numbers["launch_intents"] = len(by_node)
        return Invariant(
            "no node launched twice for one intent",
            not twice and not twice_token,
            f"{len(by_node)} intents, one instance each"
            if not twice and not twice_token
            else f"by node tag: {twice}; by client token: {twice_token}",
        )

    async def pool_converged(self) -> Invariant:
        # autogrow may still be powering off the nodes the last jobs left idle: a stop in flight
        # is not a failure, a pool that does not settle within a minute is
        settled = await wait_for(self.run.pool_converged, 60, every=0.5)
        problem = None if settled is not None else await self.run.pool_problem()
        newest = await self.run.newest_image()
        images = await self.db.value("SELECT count(*) FROM bakery_images")
        self.numbers["images_baked"] = images
        return Invariant(
            "the pool converged to its size on the newest validated image",
            problem is None,
            problem or f"{self.run.options.nodes} nodes on {newest} ({images} images baked)",
        )

    async def _pool_power_events(self) -> tuple[Power, dict[str, set[str]]]:
        """Per pool node: (state, since, occurred_at) of every NodePowerChanged the pool sent (the
        state prefixed `boot-` for a provisioning boot's, which no job may run on), and
        ('retired', occurred_at, occurred_at) for NodeRetired, in the order sent; and each
        scheduler name with every pool node that carried it (a name is reused once freed)."""
        rows = await self.db.fetch(
            "SELECT name, body FROM pool_outbox WHERE name IN "
            "('NodePowerChanged', 'NodeRetired', 'NodeProvisioned') ORDER BY id"
        )
        events: Power = defaultdict(list)
        names: defaultdict[str, set[str]] = defaultdict(set)
        for row in rows:
            body = json.loads(row["body"])
            if body.get("scheduler_node_name"):
                names[body["scheduler_node_name"]].add(body["node_id"])
            occurred = datetime.fromisoformat(body["occurred_at"])
            if row["name"] == "NodeRetired":
                events[body["node_id"]].append(("retired", occurred, occurred))
            elif row["name"] == "NodePowerChanged":
                since = datetime.fromisoformat(body["since"])
                kind = BOOT + body["state"] if body.get("provisioning") else body["state"]
                events[body["node_id"]].append((kind, since, occurred))
        return events, names

    async def jobs_ran(self, power: Power, names: dict[str, set[str]]) -> Invariant:
        standin = self.run.standin
        assert standin is not None
        scheduler = standin.scheduler
        unfinished = standin.unfinished()
        killed = [run for run in scheduler.runs if run.killed is not None]
        outside: list[str] = []
        for run in scheduler.runs:
            if run.killed is not None:
                continue
            start = run.start.timestamp() + 0.001
            for node in run.nodes:
                states = {
                    node_id: recorded_state(power.get(node_id, []), start)
                    for node_id in sorted(names.get(node, ()))
                }
                if PowerState.RUNNING.value not in states.values():
                    outside.append(
                        f"job {run.job_id} started on {node} at {run.start} while the pool "
                        f"recorded {states or 'no node of that name'}"
                    )
        self.numbers["jobs"] = len(standin.jobs)
        self.numbers["job_runs"] = len(scheduler.runs)
        problems = []
        if unfinished:
            problems.append(
                f"{len(unfinished)} jobs never finished: {[j.job_id for j in unfinished][:10]}"
            )
        if scheduler.rejected:
            problems.append(f"{len(scheduler.rejected)} jobs rejected (too wide)")
        if killed:
            problems.append(
                f"{len(killed)} runs killed by their node stopping under them: "
                + ", ".join(
                    f"job {r.job_id} on {r.nodes} at {r.killed:%H:%M:%S}" for r in killed[:5]
                )
            )
        if outside:
            problems.append(f"{len(outside)} runs on nodes not recorded running: {outside[:5]}")
        return Invariant(
            "every job of the slice ran, none on a node that was not running",
            not problems,
            "; ".join(problems)
            or f"{len(standin.jobs)} jobs ran to their end, each on nodes the pool recorded "
            "running, none interrupted",
        )

    async def outbox_and_inbox(self) -> Invariant:
        assert self.run.rabbit is not None and self.run.fleet is not None
        exchange = self.run.exchange
        listing = await asyncio.to_thread(
            self.run.rabbit.ctl, "list_bindings", "-s", "source_name", "destination_name",
            "routing_key",
        )  # fmt: skip
        bound: defaultdict[str, set[str]] = defaultdict(set)  # name -> consumers
        for line in listing.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0] == exchange and parts[1].startswith(f"{exchange}."):
                bound[parts[2]].add(parts[1][len(exchange) + 1 :])
        problems = []
        sent: dict[str, str] = {}  # message id -> name
        total = 0
        for service in self.run.fleet.config.services:
            rows = await self.db.fetch(
                f"SELECT message_id, name, published_at FROM {service}_outbox"
            )
            total += len(rows)
            unpublished = [r["message_id"] for r in rows if r["published_at"] is None]
            if unpublished:
                problems.append(f"{service}: {len(unpublished)} outbox rows never published")
            sent.update({r["message_id"]: r["name"] for r in rows})
        missing: Counter[str] = Counter()
        strays: Counter[str] = Counter()
        handled = 0
        for consumer in CONSUMERS:
            rows = await self.db.fetch(
                f"SELECT message_id, name FROM {consumer}_inbox WHERE consumer = $1", consumer
            )
            seen = {r["message_id"] for r in rows}
            handled += len(rows)
            for message_id, name in sent.items():
                if consumer in bound.get(name, ()) and message_id not in seen:
                    missing[f"{consumer}<-{name}"] += 1
            for row in rows:
                if row["message_id"] not in sent:
                    strays[f"{consumer}:{row['name']}"] += 1
        if missing:
            problems.append(f"messages never handled: {dict(missing)}")
        if strays:
            problems.append(f"inbox rows for messages nobody sent: {dict(strays)}")
        for consumer in CONSUMERS:
            state = await self.run.broker.queue_state(f"{exchange}.{consumer}")  # type: ignore[union-attr]
            if state is None or state[0] != 0:
                problems.append(f"queue {consumer} not empty: {state}")
        self.numbers["messages_sent"] = total
        self.numbers["messages_handled"] = handled
        self.numbers["duplicates_published"] = len(self.run.duplicates)
        return Invariant(
            "every outbox row published, every consumed message has exactly one inbox row",
            not problems,
            "; ".join(problems)
            or f"{total} messages sent and published, {handled} handled once each "
            f"({len(self.run.duplicates)} duplicates absorbed)",
        )

    async def dead_letters(self) -> Invariant:
        broker = self.run.broker
        assert broker is not None
        problems = []
        found = 0
        for consumer in CONSUMERS:
            taken = await broker.drain(f"{self.run.exchange}.{consumer}.dead")
            expected = {m for m, (c, _) in self.run.poison.items() if c == consumer}
            got = {m.message_id for m in taken}
            found += len(taken)
            for message in taken:
                reason = message.headers.get("x-hpcfleet-reason")
                if message.message_id in expected and not reason:
                    problems.append(f"{consumer}: poison {message.message_id} has no reason")
                if message.message_id not in expected:
                    why = reason or message.headers.get("x-first-death-reason")
                    problems.append(
                        f"{consumer}: a real message dead-lettered: {message.type} "
                        f"{message.message_id} ({why})"
                    )
            for lost in sorted(expected - got):
                problems.append(f"{consumer}: poison {lost} is not in the dead-letter queue")
        again = found - len(self.run.poison)  # a poison message dead-lettered twice: its ack
        # was lost with a connection and the broker delivered it again (at least once)
        return Invariant(
            "the dead-letter queues hold exactly the poison messages, each with its reason",
            not problems,
            "; ".join(problems[:10])
            or f"{found} dead letters: the {len(self.run.poison)} poison messages, each with its "
            f"reason"
            + (f" ({again} of them twice, redelivered after a lost ack)" if again else ""),
        )

    async def billing(self, power: Power) -> Invariant:
        """autogrow's billed intervals against the pool's power events, and against what EC2 ran."""
        standin = self.run.standin
        assert standin is not None
        rows = await self.db.fetch(
            "SELECT node_id, started_at, ended_at FROM autogrow_power_intervals"
        )
        billed = {(r["node_id"], r["started_at"]): r["ended_at"] for r in rows}
        expected = expected_intervals(power)
        problems = []
        for key in sorted(set(expected) | set(billed)):
            if key not in billed:
                problems.append(f"{key[0]} ran from {key[1]:%H:%M:%S} but nothing was billed")
            elif key not in expected:
                problems.append(f"{key[0]} billed from {key[1]:%H:%M:%S} with no power change")
            elif billed[key] != expected[key]:
                problems.append(
                    f"{key[0]} from {key[1]:%H:%M:%S}: billed until {billed[key]}, the pool "
                    f"recorded {expected[key]}"
                )
        # and every stretch EC2 really ran (as the stand-in saw it) is billed
        now = self.run.clock.now().timestamp()
        slack = self.run.options.speed * 1.0  # EC2 stamps stops to the second, at x speed
        by_node: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
        for (node_id, started), ended in billed.items():
            end = ended.timestamp() if ended is not None else now
            by_node[node_id].append((started.timestamp(), end))
        # surely running from its launch time to its last sighting (when it stopped after that
        # depends on how soon the stand-in looked again); a new node's first boot, before the
        # pool provisions (and stops) it, is billed like any run
        unbilled = {"boot": 0.0, "run": 0.0}
        ran = {"boot": 0.0, "run": 0.0}
        unbilled_nodes: set[str] = set()
        for stretch in standin.stretches:
            kind = "boot" if stretch.boot == 1 else "run"
            seen = stretch.last_seen - stretch.start
            ran[kind] += seen
            covered = overlap((stretch.start, stretch.last_seen), by_node[stretch.node_id])
            if seen - covered > slack:
                unbilled[kind] += seen - covered
                unbilled_nodes.add(stretch.node)
        if sum(unbilled.values()):
            problems.append(
                f"{sum(unbilled.values()) / 3600:.2f} node-hours EC2 ran on "
                f"{sorted(unbilled_nodes)[:10]} not covered by any billed interval "
                f"({unbilled['boot'] / 3600:.2f} of them provisioning boots)"
            )
        boots = sum(1 for s in standin.stretches if s.boot == 1)
        self.numbers["billed_intervals"] = len(billed)
        self.numbers["ec2_node_hours"] = round(sum(ran.values()) / 3600, 1)
        self.numbers["provisioning_boots"] = boots
        self.numbers["provisioning_boot_node_hours"] = round(ran["boot"] / 3600, 2)
        self.numbers["node_hours_unbilled"] = round(sum(unbilled.values()) / 3600, 2)
        return Invariant(
            "billed intervals match the instances' recorded power changes",
            not problems,
            "; ".join(problems[:8])
            or f"{len(billed)} intervals = the pool's power changes; all "
            f"{sum(ran.values()) / 3600:.1f} node-hours EC2 ran are billed, "
            f"{ran['boot'] / 3600:.2f} of them in {boots} provisioning boots",
        )


Power = defaultdict[str, list[tuple[str, datetime, datetime]]]


def recorded_state(events: Sequence[tuple[str, datetime, datetime]], at: float) -> str:
    """The power state the pool's events give a node at time `at`: of the events whose `since` is
    not after `at`, the last one sent (a later event corrects an earlier one, as autogrow takes
    them: a "starting" stamped when the call was made is overtaken by EC2's own launch time)."""
    state = "unknown"
    for kind, since, _occurred in events:
        if since.timestamp() <= at:
            state = kind
    return state


def expected_intervals(power: Power) -> dict[tuple[str, datetime], datetime | None]:
    """Running intervals as autogrow should have recorded them from the pool's events: applied in
    the order the pool sent them, each opening (running) or closing (stopping, stopped,
    retired) as `services.autogrow.cost.record_power` does, a provisioning boot's too."""
    intervals: dict[tuple[str, datetime], datetime | None] = {}
    for node_id, events in power.items():
        for kind, since, _occurred in events:
            if kind.removeprefix(BOOT) == PowerState.RUNNING.value:
                intervals.setdefault((node_id, since), None)
            elif kind.removeprefix(BOOT) in (PowerState.STOPPING, PowerState.STOPPED, "retired"):
                for key, ended in intervals.items():
                    if key[0] == node_id and ended is None and key[1] <= since:
                        intervals[key] = since
    return intervals


def overlap(span: tuple[float, float], spans: Iterable[tuple[float, float]]) -> float:
    start, end = span
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans)


# ---- the command ---------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python tests/chaos/chaos.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seed", type=int, default=1, help="draws the whole fault schedule")
    parser.add_argument("--soak", action="store_true", help="no faults; memory sampled")
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="length of the fault phase (soak: 60)"
    )
    parser.add_argument("--kills", type=int, default=24, help="kill -9 of service processes")
    parser.add_argument("--disconnects", type=int, default=2, help="broker connections closed")
    parser.add_argument("--postgres-restarts", type=int, default=1)
    parser.add_argument("--aws-fault-rate", type=float, default=0.10)
    parser.add_argument("--nodes", type=int, default=16, help="the pool's size")
    parser.add_argument(
        "--max-jobs", type=int, default=400, help="jobs of the trace slice (soak: 2000)"
    )
    parser.add_argument(
        "--speed", type=float, default=720.0, help="clock speed, x real time (soak: 240)"
    )
    parser.add_argument("--converge-minutes", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs) on success")
    if "--soak" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(minutes=60.0, max_jobs=2000, speed=240.0)
    args = parser.parse_args(argv)
    return Options(
        seed=args.seed,
        minutes=args.minutes,
        kills=args.kills,
        disconnects=args.disconnects,
        postgres_restarts=args.postgres_restarts,
        aws_fault_rate=args.aws_fault_rate,
        nodes=args.nodes,
        max_jobs=args.max_jobs,
        speed=args.speed,
        converge_minutes=args.converge_minutes,
        workdir=args.workdir,
        keep=args.keep,
        soak=args.soak,
    )


def command_line(options: Options) -> str:
    if options.soak:
        return (
            f"python tests/chaos/chaos.py --soak --seed {options.seed} --minutes "
            f"{options.minutes:g} --nodes {options.nodes} --max-jobs {options.max_jobs} "
            f"--speed {options.speed:g}"
        )
    return (
        f"python tests/chaos/chaos.py --seed {options.seed} --minutes {options.minutes:g} "
        f"--kills {options.kills} --disconnects {options.disconnects} "
        f"--postgres-restarts {options.postgres_restarts} --aws-fault-rate "
        f"{options.aws_fault_rate:g} --nodes {options.nodes} --max-jobs {options.max_jobs} "
        f"--speed {options.speed:g}"
    )


async def run_chaos(options: Options) -> Report:
    run = ChaosRun(options, command_line(options))
    report = await run.run()
    if report.passed and not options.keep and options.workdir is None:
        shutil.rmtree(run.workdir, ignore_errors=True)
        report.workdir = "(deleted: the run passed; --keep keeps it)"
    return report


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    for chatty in ("aiormq", "aio_pika"):  # the harness's own link, closed by the chaos
        logging.getLogger(chatty).setLevel(logging.CRITICAL)
    report = asyncio.run(run_chaos(options))
    print(report.text())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
