"""`Fleet`: the distributed system as processes, for chaos and end-to-end runs.

Every service's API (``python -m services.cli serve <name>``) and worker
(``python -m services.<name>.worker``) runs as its own process, configured only by the environment
(``HPCFLEET_*``) against the database, bus and AWS endpoint the caller gives (typically the
servers of `shared.testing.instances`), on one accelerated clock (`HPCFLEET_CLOCK_SPEED` from one
shared `HPCFLEET_CLOCK_EPOCH`) when a workload is replayed faster than real time. `hpcfleet
migrate` runs first. A process can be killed with SIGKILL and started again; everything is
stopped by the PIDs this object started, never by name. Each process appends its output to
``<workdir>/logs/<process>.log`` across restarts, so a run's logs can be searched afterwards.

What each service needs beyond the shared wiring (its pool spec, recipes, scheduler, intervals)
is the caller's: pass it as `FleetConfig.env`. With `client_secrets`, the services fetch their
AWS credentials from auth's API with the client-credentials grant, as in production.

This module imports no service: it starts them by module name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from shared.testing.instances import free_port

SERVICES = ("auth", "bakery", "pool", "autogrow", "audit")
"""Every service, in the order they are started: auth first, as the others get credentials there."""

CONSUMERS = ("pool", "bakery", "autogrow")
"""The services with a bus queue (auth and audit consume nothing from the bus)."""


class FleetError(RuntimeError):
    """A process of the fleet would not start, migrate or get ready; says which and why."""


@dataclass(frozen=True)
class FleetConfig:
    """Where the fleet's servers are, how fast its clock runs, and each service's own settings."""

    workdir: Path
    database_url: str
    bus_url: str
    aws_endpoint_url: str
    exchange: str = "hpcfleet"
    aws_region: str = "us-east-1"
    speed: float = 1.0
    epoch: float = field(default_factory=time.time)
    token_public_keys: Path | None = None
    client_secrets: Mapping[str, Path] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    services: Sequence[str] = SERVICES
    log_level: str = "INFO"


@dataclass
class FleetProcess:
    """One process of the fleet: a service's API or worker."""

    name: str  # e.g. pool-api, pool-worker
    service: str
    kind: str  # api or worker
    port: int | None
    command: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    _log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.popen.poll() is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


class Fleet:
    """The processes of one distributed run; see the module docstring."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.logs = config.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, FleetProcess] = {}
        python = sys.executable
        for service in config.services:
            port = free_port()
            self.processes[f"{service}-api"] = FleetProcess(
                f"{service}-api",
                service,
                "api",
                port,
                [python, "-m", "services.cli", "serve", service, "--port", str(port)],
                self.logs / f"{service}-api.log",
            )
            self.processes[f"{service}-worker"] = FleetProcess(
                f"{service}-worker",
                service,
                "worker",
                None,
                [python, "-m", f"services.{service}.worker"],
                self.logs / f"{service}-worker.log",
            )
        self.env = self._environment()

    # ---- configuration ----------------------------------------------------------------------

    def api_url(self, service: str) -> str:
        port = self.processes[f"{service}-api"].port
        return f"http://127.0.0.1:{port}"

    def _environment(self) -> dict[str, str]:
        config = self.config
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPCFLEET_")}
        env.update(
            {
                "HPCFLEET_DATABASE_URL": config.database_url,
                "HPCFLEET_BUS_URL": config.bus_url,
                "HPCFLEET_EXCHANGE": config.exchange,
                "HPCFLEET_AWS_ENDPOINT_URL": config.aws_endpoint_url,
                "HPCFLEET_AWS_REGION": config.aws_region,
                "HPCFLEET_CLOCK_SPEED": repr(config.speed),
                "HPCFLEET_CLOCK_EPOCH": repr(config.epoch),
                "HPCFLEET_LOG_FORMAT": "json",
                "HPCFLEET_LOG_LEVEL": config.log_level,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if config.token_public_keys is not None:
            env["HPCFLEET_TOKEN_PUBLIC_KEYS"] = str(config.token_public_keys)
        else:
            env["HPCFLEET_API_AUTH"] = "disabled"
        if "auth" in config.services:
            for service, secret in config.client_secrets.items():
                prefix = f"HPCFLEET_{service.upper()}_"
                env[f"{prefix}AUTH_URL"] = self.api_url("auth")
                env[f"{prefix}AUTH_CLIENT_SECRET"] = f"file:{secret}"
        env.update(config.env)
        return env

    # ---- lifecycle --------------------------------------------------------------------------

    def migrate(self, timeout: float = 120) -> None:
        """`hpcfleet migrate`: every service's tables, before any process starts."""
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "migrate"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise FleetError(f"hpcfleet migrate failed: {result.stderr.strip()[-2000:]}")

    def start(self, names: Iterable[str] | None = None) -> None:
        """Start the named processes (default: all not running), in the fleet's order."""
        for name in list(names) if names is not None else list(self.processes):
            if not self.processes[name].alive:
                self.start_one(name)

    def start_one(self, name: str) -> FleetProcess:
        process = self.processes[name]
        if process.alive:
            return process
        self._close_log(process)
        process._log_file = process.log.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        process._log_file.write(f"--- start {process.starts + 1} at {stamp}\n".encode())
        process._log_file.flush()
        process.popen = subprocess.Popen(
            process.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=process._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the run reaches the run, not each service
        )
        process.starts += 1
        return process

    def kill(self, name: str) -> int:
        """SIGKILL one process by its PID (no clean stop: connections drop, work is cut); returns
        the PID killed."""
        process = self.processes[name]
        pid = process.pid
        if pid is None or process.popen is None:
            raise FleetError(f"{name} is not running")
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait(30)
        process.kills += 1
        return pid

    def restart(self, name: str) -> FleetProcess:
        return self.start_one(name)

    def exited(self) -> dict[str, int]:
        """Processes that exited on their own (not killed by `kill`, not stopped): name -> code."""
        return {
            name: code
            for name, p in self.processes.items()
            if (code := p.exit_code) is not None and code != -signal.SIGKILL
        }

    def stop(self, timeout: float = 30) -> dict[str, int | None]:
        """SIGTERM every running process (a clean stop), SIGKILL what is left after `timeout`;
        returns each process's exit code (None: it was not running)."""
        codes: dict[str, int | None] = {}
        running = [p for p in self.processes.values() if p.alive]
        for process in running:
            assert process.popen is not None
            process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            if process.popen is None or process not in running:
                codes[process.name] = None
                continue
            try:
                codes[process.name] = process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                codes[process.name] = process.popen.wait(10)
        for process in self.processes.values():
            self._close_log(process)
        return codes

    def _close_log(self, process: FleetProcess) -> None:
        if process._log_file is not None:
            process._log_file.close()
            process._log_file = None

    # ---- readiness ---------------------------------------------------------------------------

    async def api_ready(
        self, service: str, client: httpx.AsyncClient, path: str = "/readyz"
    ) -> bool:
        """Whether a service's API answers `path` with 200."""
        try:
            response = await client.get(f"{self.api_url(service)}{path}", timeout=5)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def log_paths(self) -> list[Path]:
        return sorted(self.logs.glob("*.log"))
