"""`Processes`: hpcfleet's services run as the distributed mode runs them, one process each.

End-to-end tests and benchmarks start each service's API and worker (``python -m
services.<service>.worker``) with the environment they give, and stop them by PID with SIGTERM, as
an orchestrator would. An API runs as ``hpcfleet serve <service>`` does (the service's uvicorn
factory, SIGTERM a clean exit) through ``python -m shared.testing.processes api <service>``:
the ``hpcfleet`` command imports every service and the simulator first, which doubles an API's
start-up CPU, and ten processes start at once on two cores. Each process writes its output to its
own log file rather than a pipe: a pipe nobody reads while the test runs fills up and blocks the
service mid-write. `tail` and `report` show the logs when something went wrong.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

STOP_TIMEOUT = 60.0
"""Seconds a service gets to stop after SIGTERM before it is killed (ten processes stopping at
once on two busy cores can take tens of seconds just to get the CPU)."""


class ProcessFailed(RuntimeError):
    """A service process exited when it should run, or did not come up; the message has its log."""


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


class Processes:
    """Service processes sharing one base environment; each one's output goes to
    ``<log_dir>/<name>.log``."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.running: list[ServiceProcess] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """``python <args>`` with the base environment plus `env`."""
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, *args],
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started = ServiceProcess(name, process, log)
        self.running.append(started)
        return started

    def api(self, service: str, port: int, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """The service's API, as ``hpcfleet serve <service> --port <port>`` runs it."""
        return self.start(
            f"{service}-api", "-m", __name__, "api", service, "--port", str(port), env=env
        )

    def worker(self, service: str, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """The service's worker, as ``python -m services.<service>.worker``."""
        return self.start(f"{service}-worker", "-m", f"services.{service}.worker", env=env)

    def check(self) -> None:
        """Raise if a process has exited: a dead service would only show as a timeout later."""
        for service in self.running:
            code = service.process.poll()
            if code is not None:
                raise ProcessFailed(
                    f"{service.name} exited with {code}:\n{self.tail(service.name)}"
                )

    async def wait_healthy(
        self,
        url: str,
        *,
        name: str | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109 (a polling deadline)
    ) -> float:
        """Wait until ``{url}/healthz`` answers 200 (the API is serving) and return the seconds it
        took; fail at once if a process dies meanwhile, and with the log of process `name` (the
        API's) if it never answers."""
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                self.check()
                try:
                    if (await client.get(f"{url.rstrip('/')}/healthz")).status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass
                if time.monotonic() - started > timeout:
                    log = f":\n{self.tail(name)}" if name else ""
                    raise ProcessFailed(
                        f"{name or url} did not answer /healthz within {timeout} s{log}"
                    )
                await asyncio.sleep(0.1)

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> dict[str, int]:
        """SIGTERM every process (all at once, so they stop in parallel), kill what is left after
        `timeout`; each one's exit status by name (0: it stopped cleanly)."""
        for service in self.running:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for service in self.running:
            try:
                codes[service.name] = service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                codes[service.name] = service.process.wait()
        return codes

    def tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a process's log."""
        path = self.log_dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def report(self, names: list[str] | None = None, lines: int = 15) -> str:
        """The tails of these processes' logs (all by default), for a failure message."""
        chosen = names if names is not None else [s.name for s in self.running]
        return "\n".join(f"--- {name} ---\n{self.tail(name, lines)}" for name in chosen)


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any HPCFLEET_ or AWS setting of its own (so a developer's
    shell cannot leak into a test's services), plus `extra`."""
    kept = {
        k: v for k, v in os.environ.items() if not k.startswith(("HPCFLEET_", "AWS_", "SLURM_"))
    }
    return {**kept, **extra}


def serve_api(service: str, port: int) -> None:
    """What ``hpcfleet serve <service> --port <port>`` does: the service's uvicorn factory with the
    settings of the environment; SIGTERM stops it gracefully and it exits 0."""
    import uvicorn

    from shared.logs import configure_logging
    from shared.settings import ConfigurationError, Settings, load_settings

    try:
        settings = load_settings(Settings)
    except ConfigurationError as exc:
        print(f"hpcfleet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    # uvicorn re-raises the SIGTERM it stopped on; this handler makes that a no-op (exit 0).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    uvicorn.run(
        f"services.{service}.app:create_app",
        factory=True,
        host=settings.api_host,
        port=port,
        log_config=None,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m shared.testing.processes api <service> --port <port>``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shared.testing.processes")
    parser.add_argument("what", choices=["api"])
    parser.add_argument("service")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve_api(args.service, args.port)


if __name__ == "__main__":
    main()
