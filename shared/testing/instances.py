"""Throw-away PostgreSQL, RabbitMQ and moto servers of a run's own, in temp dirs on free ports.

Chaos and end-to-end runs restart their database and close their broker's connections on purpose;
doing that to the machine's shared servers would disturb every other test and engineer. So each
run starts its own: `OwnPostgres` (initdb + postgres, as the `postgres` user when run as root,
since PostgreSQL refuses root), `OwnRabbitMQ` (its own Erlang node name, ports, cookie and data
dir) and `OwnMoto` (``python -m shared.cloud.moto_server`` as a process). Each is started, stopped
and restarted by the PID of the process it started, never by name.

The APIs are blocking (subprocesses and polls with deadlines); async callers use
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Self

_PG_ROOT = Path("/usr/lib/postgresql")
_RABBIT_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
_RABBIT_CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")


class InstanceError(RuntimeError):
    """A server of our own would not start or stop; the message carries its log's tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


def _stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Signal one process we started, by its PID, and wait for it; SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them out of PATH, per major version."""
    for version in sorted(_PG_ROOT.glob("*"), key=lambda p: p.name, reverse=True):
        candidate = version / "bin" / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise InstanceError(f"{name} not found: apt-get install postgresql")
    return found


class OwnServer:
    """What the three servers share: the process we started (its PID while it runs), started on
    entering a ``with`` block, stopped and its files deleted on leaving it."""

    process: subprocess.Popen[bytes] | None = None
    base: Path | None = None  # the temp dir holding its data and logs, deleted by close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self, timeout: float = 60) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 60) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop and delete everything."""
        self.stop()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class OwnPostgres(OwnServer):
    """A PostgreSQL cluster of our own: trust auth on 127.0.0.1:`port`, one database `database`.

    Run as root, the data dir is handed to the ``postgres`` user and the server runs as that user
    through ``setpriv`` (which execs, so the PID we hold is the postmaster itself).
    """

    def __init__(self, *, database: str = "hpcfleet", max_connections: int = 400) -> None:
        self.database = database
        self.max_connections = max_connections
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="hpcfleet-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._initialised = False
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self._as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]

    @property
    def dsn(self) -> str:
        """For asyncpg and libpq tools."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def url(self) -> str:
        """For SQLAlchemy (HPCFLEET_DATABASE_URL)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*self._as, *command], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise InstanceError(f"{' '.join(command)}: {result.stderr.strip()[-2000:]}")

    def start(self, timeout: float = 60) -> None:
        """initdb (first time only), start the server, create the database (first time only)."""
        if self.pid is not None:
            return
        if not self._initialised:
            self._run(
                _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--no-sync",
            )  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self._as, _pg_bin("postgres"), "-D", str(self.data),
                    "-p", str(self.port), "-k", str(self.base), "-c", "listen_addresses=127.0.0.1",
                    "-c", f"max_connections={self.max_connections}", "-c", "fsync=off",
                    "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready(timeout)
        if not self._initialised:
            self._run(
                _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                self.database,
            )  # fmt: skip
            self._initialised = True

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise InstanceError(f"postgres exited at start:\n{_tail(self.log)}")
            ready = subprocess.run(
                [_pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
                timeout=10,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise InstanceError(f"postgres not ready within {timeout} s:\n{_tail(self.log)}")

    def stop(self, timeout: float = 60) -> None:
        """Fast shutdown (SIGINT): open transactions abort and every client is disconnected."""
        _stop_process(self.process, signal.SIGINT, timeout)
        self.process = None

    def restart(self) -> float:
        """Stop and start again on the same port and data; returns the seconds it was down."""
        began = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - began


class OwnRabbitMQ(OwnServer):
    """A RabbitMQ node of our own: its own node name, AMQP and distribution ports, Erlang cookie
    (HOME is its dir) and data dir; guest/guest on 127.0.0.1 only."""

    def __init__(self) -> None:
        if not _RABBIT_SERVER.exists():
            raise InstanceError(
                "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
            )
        self.base = Path(tempfile.mkdtemp(prefix="hpcfleet-rabbit-"))
        self.port = free_port()
        self.node = f"hpcfleet-{uuid.uuid4().hex[:8]}@localhost"
        self.log = self.base / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(self.base),  # its Erlang cookie lives here, not in anyone's home
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 90) -> None:
        """Start the node (the real script, not Debian's wrapper, which would switch user and
        write over the shared broker's log) and wait until it accepts AMQP connections."""
        if self.pid is not None:
            return
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(_RABBIT_SERVER)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.process.poll() is not None:
                raise InstanceError(f"own RabbitMQ exited at start:\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise InstanceError(f"own RabbitMQ not up within {timeout} s:\n{_tail(self.log)}")
            time.sleep(0.2)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to the server, which stops the node gracefully."""
        _stop_process(self.process, signal.SIGTERM, timeout)
        self.process = None

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node (never the machine's shared broker)."""
        result = subprocess.run(
            [str(_RABBIT_CTL), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise InstanceError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()[-1000:]}")
        return result.stdout

    def connection_count(self) -> int:
        listing = self.ctl("list_connections", "-s", "pid")
        return sum(1 for line in listing.splitlines() if line.strip())

    def close_all_connections(self, reason: str = "closed by the server (chaos)") -> int:
        """Close every client connection from the server side; returns how many were open."""
        count = self.connection_count()
        self.ctl("close_all_connections", reason)
        return count


class OwnMoto(OwnServer):
    """``python -m shared.cloud.moto_server`` as a process of its own: AWS for a distributed run,
    with the fault-injecting wrapper at ``/_fault``."""

    def __init__(
        self,
        *,
        seed: int = 0,
        log: Path | None = None,
        clock_speed: float = 1.0,
        clock_epoch: float | None = None,
    ) -> None:
        """`clock_speed` / `clock_epoch`: EC2's instance times on the run's accelerated clock."""
        self.seed = seed
        self.clock = ["--clock-speed", repr(clock_speed)]
        if clock_epoch is not None:
            self.clock += ["--clock-epoch", repr(clock_epoch)]
        self.port = free_port()
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        if self.pid is not None:
            return
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
        command = [sys.executable, "-m", "shared.cloud.moto_server", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--seed", str(self.seed), *self.clock],
            stdout=subprocess.DEVNULL,
            stderr=self._log or subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise InstanceError("the moto server did not start")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        _stop_process(self.process, signal.SIGTERM, timeout)
        self.process = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
