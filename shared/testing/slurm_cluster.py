"""`SlurmCluster`: a private Slurm 22.05 controller with emulated compute nodes, in one temp dir.

Integration, end-to-end and chaos runs need a real Slurm that they own: its own config, ports,
state and logs, nothing shared with a system-wide Slurm (no /etc/slurm, no services, no munge: it
runs ``auth/none``, which is fine for tests only). The recipe and every gotcha behind the choices
here are in /work/shared/notes/slurm-on-one-host.md; the ones that shape this module:

* Compute nodes are emulated: one ``slurmd -N <node>`` per node on this host, each on its own port.
  `node_up` starts it (EC2 started the instance), `node_down` stops every process of that node (EC2
  stopped it), so jobs on it die as they would on a real machine.
* Each slurmd runs in a new time namespace whose uptime starts near 0: slurmctld ignores the
  registration of a node whose boot time is older than its resume request, and the host's uptime
  would make every "boot" look old. Uptime is reported in whole seconds, so a node never boots
  within `BOOT_MARGIN` seconds of its resume request; `node_up` waits that long when needed.
* With ``power_saving=True`` the nodes are CLOUD nodes: Slurm allocates jobs to powered-down nodes
  (the jobs are CONFIGURING) and calls ResumeProgram / SuspendProgram. Those are scripts here that
  log each call (`power_calls`) and then run the command the caller gave, if any, with the host
  list. Without power saving, nodes start DOWN and come back when their slurmd registers
  (``ReturnToService=2``); jobs wait PENDING meanwhile.

Use it as a context manager or with `start` / `stop`; from a shell:
``python -m shared.testing.slurm_cluster --nodes 8 --power-saving`` runs one until interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import hostlist

INSTALL_HINT = (
    "install Debian's Slurm packages: "
    "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client"
)
BOOT_MARGIN = 2.0
"""Seconds between a node's resume request and its slurmd start, so Slurm accepts the boot."""

_SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
_POWER_ACTIONS = ("resume", "suspend", "resume_fail")
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0
_NODE_STOP_GRACE = 2.0  # slurmd stops at once; slurmstepd ignores SIGTERM and needs the SIGKILL


class SlurmNotInstalled(RuntimeError):
    """A Slurm binary is missing; the message says what to install."""


class SlurmClusterError(RuntimeError):
    """The test cluster could not do what was asked; the message carries the log's tail."""


@dataclass(frozen=True)
class PowerCall:
    """One call Slurm made to ResumeProgram, SuspendProgram or ResumeFailProgram."""

    at: float  # epoch seconds
    action: str  # resume, suspend or resume_fail
    hostlist: str  # as Slurm passed it, e.g. node[001-003]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(hostlist.expand_hostlist(self.hostlist))


def find_binary(name: str) -> str:
    """The path of a Slurm program, also where root's PATH is not set (sbin)."""
    path = os.environ.get("PATH", "")
    found = shutil.which(name, path=os.pathsep.join([path, *_SEARCH_PATH]))
    if found is None:
        raise SlurmNotInstalled(f"{name} not found; {INSTALL_HINT}")
    return found


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, every: float = 0.1
) -> float:
    """Poll `condition` until it holds and return the seconds it took; raise saying what never
    happened."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise SlurmClusterError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _ports_free(ports: Iterable[int]) -> bool:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
    return True


def _pick_ports(count: int) -> int:
    """A base port with `count` free ports from it, below the ephemeral range."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - count)
        if _ports_free(range(base, base + count)):
            return base
    raise SlurmClusterError(f"no {count} consecutive free ports found")


def _time_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/time")
    except OSError:
        return None


def _alive(pid: int, namespace: str | None) -> bool:
    """True while `pid` runs in `namespace` (a zombie, or a new process that reused the PID in
    another namespace, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return namespace is None or _time_namespace(pid) == namespace


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # not written yet, or half-written
        return None


def _terminate(processes: Mapping[int, str | None]) -> None:
    """SIGTERM, then SIGKILL what is left after a grace period; return once all are gone.
    `processes` maps each PID to the time namespace it must still be in to be signalled."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, namespace in processes.items():
            if _alive(pid, namespace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + _NODE_STOP_GRACE
        while any(_alive(p, ns) for p, ns in processes.items()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return
    raise SlurmClusterError(f"processes {list(processes)} survived SIGKILL")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """A private slurmctld plus `nodes` emulated compute nodes named ``<prefix>001``…, all down
    at first; every file lives under `base_dir` (a fresh temp dir by default, removed on `stop`)."""

    def __init__(
        self,
        nodes: int = 4,
        *,
        cpus_per_node: int = 4,
        memory_mb: int = 4000,
        node_prefix: str = "node",
        partition: str = "compute",
        power_saving: bool = False,
        resume_command: Sequence[str] | None = None,
        suspend_command: Sequence[str] | None = None,
        resume_fail_command: Sequence[str] | None = None,
        suspend_time: int = 86400,
        suspend_timeout: int = 30,
        resume_timeout: int = 60,
        slurmd_timeout: int = 10,
        debug: str = "info",
        base_dir: str | Path | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.node_names: tuple[str, ...] = tuple(
            f"{node_prefix}{i:03d}" for i in range(1, nodes + 1)
        )
        self.partition = partition
        self.cpus_per_node = cpus_per_node
        self.power_saving = power_saving
        self._memory_mb = memory_mb
        self._commands = {
            "resume": resume_command,
            "suspend": suspend_command,
            "resume_fail": resume_fail_command,
        }
        self._suspend_time = suspend_time
        self._suspend_timeout = suspend_timeout
        self._resume_timeout = resume_timeout
        self._slurmd_timeout = slurmd_timeout
        self._debug = debug
        self._own_dir = base_dir is None
        self._base_dir = None if base_dir is None else Path(base_dir)
        self._bin: dict[str, str] = {}
        self._unshare: str | None = None
        self._ctld: subprocess.Popen[bytes] | None = None
        self._slurmd_pids: dict[str, int] = {}
        self._lock = threading.RLock()  # hook handlers boot and stop nodes from other threads
        self.port = 0  # slurmctld's; node i listens on port + 1 + i

    # ---- paths and environment ----------------------------------------------------------------

    @property
    def dir(self) -> Path:
        if self._base_dir is None:
            raise SlurmClusterError("the cluster has not been started")
        return self._base_dir

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client needs in its environment to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def controller_log(self) -> Path:
        return self.dir / "log" / "slurmctld.log"

    def node_log(self, name: str) -> Path:
        return self.dir / "log" / f"slurmd-{name}.log"

    # ---- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config and start the controller (with a clean state); nodes stay down."""
        if self._ctld is not None:
            raise SlurmClusterError("the cluster is already started")
        self._bin = {
            name: find_binary(name)
            for name in ("slurmctld", "slurmd", "scontrol", "squeue", "sinfo", "sbatch", "scancel")
        }
        self._unshare = shutil.which("unshare", path=os.pathsep.join(_SEARCH_PATH))
        if self._unshare is None:
            raise SlurmNotInstalled("unshare not found; apt-get install -y util-linux")
        if self._base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="hpcfleet-slurm-"))
        for sub in ("state", "spool", "log", "run", "bin", "jobs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = _pick_ports(len(self.node_names) + 2)
        self._write_power_scripts()
        self.conf.write_text(self._slurm_conf())
        atexit.register(self.stop)  # a script that forgets stop() leaves no daemons behind
        self.start_controller(clean=True)

    def stop(self) -> None:
        """Stop every node and the controller by PID, then remove the cluster's directory."""
        atexit.unregister(self.stop)
        self.stop_controller()
        self.node_down(list(self._slurmd_pids))
        if self._own_dir and self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None

    def start_controller(self, *, clean: bool = False) -> float:
        """Start slurmctld and return the seconds until it answered; `clean` drops saved state
        (jobs, node states), otherwise it recovers them as after a crash."""
        if self._ctld is not None and self._ctld.poll() is None:
            raise SlurmClusterError("slurmctld is already running")
        args = [self._bin["slurmctld"], "-D", "-i", "-f", str(self.conf)]
        if clean:
            args.append("-c")
        started = time.monotonic()
        with (self.dir / "log" / "slurmctld.stderr").open("ab") as out:
            self._ctld = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._daemon_env(),
                start_new_session=True,
            )
        ctld = self._ctld
        deadline = started + _START_TIMEOUT
        while not self._answers():
            if ctld.poll() is not None or time.monotonic() > deadline:
                self.stop_controller()
                raise SlurmClusterError(
                    f"slurmctld did not start (exit {ctld.returncode}):\n"
                    + _tail(self.controller_log)
                    + "\n"
                    + _tail(self.dir / "log" / "slurmctld.stderr")
                )
            time.sleep(0.02)
        return time.monotonic() - started

    def stop_controller(self) -> None:
        """Stop slurmctld (SIGTERM, SIGKILL after a grace period); nodes keep running."""
        ctld, self._ctld = self._ctld, None
        if ctld is None or ctld.poll() is not None:
            return
        ctld.terminate()
        try:
            ctld.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            ctld.kill()
            ctld.wait()

    def _answers(self) -> bool:
        ping = subprocess.run(
            [self._bin["scontrol"], "ping"],
            env=self._client_env(),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return ping.returncode == 0 and "is UP" in ping.stdout

    # ---- emulated nodes -----------------------------------------------------------------------

    def node_up(self, names: str | Iterable[str]) -> None:
        """Boot these nodes as if EC2 started their instances: one slurmd each, in its own time
        namespace. Nodes already up are left alone. Returns once every slurmd runs; registration
        with the controller follows within about a second."""
        with self._lock:
            self._boot([n for n in self._names(names) if n not in self.up_nodes()])

    def _boot(self, wanted: list[str]) -> None:
        if not wanted:
            return
        last_request = max(
            (
                c.at
                for c in self.power_calls()
                if c.action == "resume" and set(c.nodes) & set(wanted)
            ),
            default=0.0,
        )
        time.sleep(max(0.0, last_request + BOOT_MARGIN - time.time()))
        uptime = int(float(Path("/proc/uptime").read_text().split()[0]))
        prefix = [self._unshare or "unshare"]
        if os.geteuid() != 0:
            prefix.append("--map-current-user")
        prefix += ["--time", "--boottime", str(-uptime)]
        starters = []
        for name in wanted:
            (self.dir / "spool" / name).mkdir(exist_ok=True)
            self._pid_file(name).unlink(missing_ok=True)
            starters.append(
                subprocess.Popen(
                    [*prefix, self._bin["slurmd"], "-N", name, "-f", str(self.conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=self._daemon_env(),
                )
            )
        for name, starter in zip(wanted, starters, strict=True):
            _, err = starter.communicate(timeout=_START_TIMEOUT)
            if starter.returncode != 0:
                raise SlurmClusterError(
                    f"slurmd -N {name} failed: {err.decode(errors='replace')}\n"
                    + _tail(self.node_log(name))
                )
        for name in wanted:
            self._slurmd_pids[name] = self._wait_for_pid(name)

    def node_down(self, names: str | Iterable[str]) -> None:
        """Power these nodes off as if EC2 stopped their instances: every process of the node
        (slurmd, its job steps, the jobs) gets SIGTERM, then SIGKILL after 2 s.
        Slurm is not told; it notices when the node stops answering."""
        doomed: dict[int, str | None] = {}
        host_ns = _time_namespace(os.getpid())
        with self._lock:
            for name in self._names(names):
                pid = self._slurmd_pids.pop(name, None)
                if pid is None:
                    continue
                ns = _time_namespace(pid)
                if ns is None or ns == host_ns:  # never sweep the host's own namespace
                    doomed[pid] = None
                else:
                    doomed |= dict.fromkeys(self._pids_in(ns), ns)
                self._pid_file(name).unlink(missing_ok=True)
            _terminate(doomed)

    def up_nodes(self) -> list[str]:
        """Nodes whose emulated machine is running."""
        return [n for n, pid in self._slurmd_pids.items() if _alive(pid, None)]

    @staticmethod
    def _pids_in(namespace: str) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _time_namespace(int(entry.name)) == namespace:
                pids.append(int(entry.name))
        return pids

    def _wait_for_pid(self, name: str) -> int:
        """The PID the daemonized slurmd of `name` writes once it runs."""
        deadline = time.monotonic() + _START_TIMEOUT
        while (pid := _read_pid(self._pid_file(name))) is None:
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"slurmd -N {name} wrote no PID:\n{_tail(self.node_log(name))}"
                )
            time.sleep(0.01)
        return pid

    def _pid_file(self, name: str) -> Path:
        return self.dir / "run" / f"slurmd-{name}.pid"

    def _names(self, names: str | Iterable[str]) -> list[str]:
        listed = hostlist.expand_hostlist(names) if isinstance(names, str) else list(names)
        unknown = sorted(set(listed) - set(self.node_names))
        if unknown:
            raise ValueError(f"not nodes of this cluster: {', '.join(unknown)}")
        return listed

    # ---- power programs -----------------------------------------------------------------------

    def power_calls(self) -> list[PowerCall]:
        """Every ResumeProgram / SuspendProgram / ResumeFailProgram call so far, oldest first."""
        log = self.dir / "log" / "power.log"
        if not log.exists():
            return []
        calls = []
        for line in log.read_text().splitlines():
            at, action, hosts = line.split(" ", 2)
            calls.append(PowerCall(float(at), action, hosts))
        return calls

    def _write_power_scripts(self) -> None:
        for action in _POWER_ACTIONS:
            command = self._commands[action]
            out = self.dir / "log" / f"{action}.out"
            hand_on = (
                f'exec {shlex.join(command)} "$1" >> {shlex.quote(str(out))} 2>&1'
                if command
                else "exit 0"
            )
            script = self.dir / "bin" / f"{action}.sh"
            script.write_text(
                "#!/bin/sh\n"
                f"# {action} program of an hpcfleet test cluster: log the call, then hand it on.\n"
                f'echo "$(date +%s.%N) {action} $1" >> '
                f"{shlex.quote(str(self.dir / 'log' / 'power.log'))}\n"
                f"{hand_on}\n"
            )
            script.chmod(0o755)

    # ---- config -------------------------------------------------------------------------------

    def _slurm_conf(self) -> str:
        d = self.dir
        user = _user_name()
        first, last = self.port + 2, self.port + 1 + len(self.node_names)
        nodes = hostlist.collect_hostlist(list(self.node_names))
        ports = f"[{first}-{last}]" if last > first else str(first)
        lines = [
            "# hpcfleet test cluster: see shared/testing/slurm_cluster.py",
            "ClusterName=hpcfleet-test",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={self.port}",
            f"SlurmdPort={self.port + 1}",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            f"SlurmctldDebug={self._debug}",
            f"SlurmdDebug={self._debug}",
            f"PlugStackConfig={d}/plugstack.conf",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1",  # jobs behind a blocked one start in ~1 s, not 30
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            f"SlurmdTimeout={self._slurmd_timeout}",
            "KillWait=2",
            "TreeWidth=65533",
            "CommunicationParameters=NoAddrCache",
        ]
        state = "DOWN"
        if self.power_saving:
            state = "CLOUD"
            lines += [
                "PrivateData=cloud",
                "SlurmctldParameters=idle_on_node_suspend,power_save_interval=1,"
                "power_save_min_interval=0",
                f"ResumeProgram={d}/bin/resume.sh",
                f"SuspendProgram={d}/bin/suspend.sh",
                f"ResumeFailProgram={d}/bin/resume_fail.sh",
                f"SuspendTime={self._suspend_time}",
                f"SuspendTimeout={self._suspend_timeout}",
                f"ResumeTimeout={self._resume_timeout}",
                "ResumeRate=0",
                "SuspendRate=0",
            ]
        lines += [
            f"NodeName={nodes} NodeAddr=127.0.0.1 Port={ports} CPUs={self.cpus_per_node} "
            f"RealMemory={self._memory_mb} State={state}",
            f"PartitionName={self.partition} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP",
        ]
        (d / "plugstack.conf").write_text("")
        return "\n".join(lines) + "\n"

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _daemon_env(self) -> dict[str, str]:
        return {"PATH": os.pathsep.join(_SEARCH_PATH), **self.env}

    # ---- client commands ----------------------------------------------------------------------

    def run(self, program: str, *args: str, stdin: str | None = None) -> str:
        """Run a Slurm client program against this cluster; its stdout, or an error with stderr."""
        binary = self._bin.get(program) or find_binary(program)
        done = subprocess.run(
            [binary, *args],
            env=self._client_env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise SlurmClusterError(
                f"{program} {shlex.join(args)} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def scontrol(self, *args: str) -> str:
        return self.run("scontrol", *args)

    def sbatch(
        self,
        script: str = "sleep 1",
        *options: str,
        partition: str | None = None,
        nodes: int | None = None,
        ntasks: int | None = None,
        cpus_per_task: int | None = None,
        array: str | None = None,
        hold: bool = False,
    ) -> int:
        """Submit a job and return its id. `script` is a whole batch script if it starts with
        ``#!``, else a command line; `options` are passed to sbatch as they are."""
        args = [
            "--parsable",
            f"--chdir={self.dir / 'jobs'}",
            f"--output={self.dir / 'jobs' / 'slurm-%A_%a.out'}",
            f"--partition={partition or self.partition}",
        ]
        for flag, value in (
            ("--nodes", nodes),
            ("--ntasks", ntasks),
            ("--cpus-per-task", cpus_per_task),
            ("--array", array),
        ):
            if value is not None:
                args.append(f"{flag}={value}")
        if hold:
            args.append("--hold")
        args += options
        if script.startswith("#!"):
            out = self.run("sbatch", *args, stdin=script)
        else:
            out = self.run("sbatch", *args, f"--wrap={script}")
        return int(out.strip().split(";")[0])

    def scancel(self, *job_ids: int) -> None:
        """Cancel these jobs, or every job of this user when none is given."""
        if job_ids:
            self.run("scancel", *(str(j) for j in job_ids))
        else:
            self.run("scancel", "--user", _user_name())

    def squeue_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.run("squeue", "--json"))
        return result

    def sinfo_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.run("sinfo", "--json"))
        return result

    def job_states(self) -> dict[int, str]:
        """Each job's (or array task's) state by job id, e.g. {7: "RUNNING"}."""
        return {j["job_id"]: j["job_state"] for j in self.squeue_json()["jobs"]}

    def node_states(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Each node's state and state flags, e.g. {"node001": ("idle", ("CLOUD",))}."""
        return {
            n["name"]: (n["state"], tuple(n["state_flags"])) for n in self.sinfo_json()["nodes"]
        }


def hpcfleet_hook(
    action: str,
    autogrow_url: str,
    *,
    auth_url: str | None = None,
    client_secret_file: str | Path | None = None,
) -> list[str]:
    """The command a production wrapper script runs for ResumeProgram (`resume`) or
    SuspendProgram (`suspend`), for `resume_command` / `suspend_command`; Slurm appends the host
    list. With `auth_url` and `client_secret_file` it gets its token from auth (API auth on)."""
    command = [sys.executable, "-m", "services.autogrow.slurm_hooks", action]
    command += ["--autogrow-url", autogrow_url]
    if auth_url is not None and client_secret_file is not None:
        command += ["--auth-url", auth_url, "--client-secret-file", str(client_secret_file)]
    return command


def _user_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def main(argv: Sequence[str] | None = None) -> int:
    """Run a test cluster until SIGINT/SIGTERM, for manual, end-to-end and chaos runs."""
    parser = argparse.ArgumentParser(prog="python -m shared.testing.slurm_cluster")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--cpus-per-node", type=int, default=4)
    parser.add_argument("--power-saving", action="store_true")
    parser.add_argument("--resume-command", help="command (shell words) ResumeProgram runs")
    parser.add_argument("--suspend-command", help="command (shell words) SuspendProgram runs")
    parser.add_argument("--suspend-time", type=int, default=86400)
    parser.add_argument("--resume-timeout", type=int, default=60)
    parser.add_argument("--up", default="", help="host list of nodes to boot at once")
    parser.add_argument("--dir", help="cluster directory (kept); default a temp dir (removed)")
    args = parser.parse_args(argv)
    cluster = SlurmCluster(
        args.nodes,
        cpus_per_node=args.cpus_per_node,
        power_saving=args.power_saving,
        resume_command=shlex.split(args.resume_command) if args.resume_command else None,
        suspend_command=shlex.split(args.suspend_command) if args.suspend_command else None,
        suspend_time=args.suspend_time,
        resume_timeout=args.resume_timeout,
        base_dir=args.dir,
    )
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with cluster:
        if args.up:
            cluster.node_up(args.up)
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        print(
            f"# nodes {hostlist.collect_hostlist(list(cluster.node_names))}, "
            f"logs in {cluster.dir / 'log'}; stop with SIGINT or SIGTERM",
            file=sys.stderr,
        )
        while not stop:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
