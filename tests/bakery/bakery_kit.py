"""What bakery's tests share: a moto server whose SSM really runs build steps, recipes written to
disk, and a base image to build from.

moto's SSM answers Success for every command and addresses every instance, so no step could fail.
`SsmAgent` sits between the fault-injecting middleware and moto:

* SendCommand with AWS-RunShellScript runs the script with bash on this machine, in a folder that
  stands for the instance's disk (exported as HPCFLEET_ROOT, the rehearsal root that bakery's
  built-in steps honour); GetCommandInvocation reports InProgress, Success, Failed or TimedOut with
  the real exit code and output. Other documents (PowerShell) fall through to moto.
* The disks travel like EBS: CreateImage copies the instance's folder to the image, CopyImage to
  the copy, RunInstances from the image to each new instance. So a smoke check on a test instance
  sees exactly what the build steps left on the builder.
* EnableImageDeprecation, which moto lacks, is answered as AWS would once a test sets
  `deprecations` to a list (it records the calls).
* moto's images are reported EBS-backed (moto says "standard" for every image it creates, which
  Packer refuses as a source; every AMI bakery deals with is EBS-backed).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from sqlalchemy import select

from services.bakery.service import Bakery
from services.bakery.tables import MAILBOX
from shared.cloud.moto_server import AwsFidelityMiddleware, MotoServer
from shared.events import ImageReady, ImageRetired, Message, decode

REGION = "us-east-1"
OTHER_REGION = "eu-west-1"
BASE_NAME = "al2023-ami-2026.1.0-x86_64"


@dataclass
class Invocation:
    process: subprocess.Popen[str] | None = None
    status: str = "InProgress"
    exit_code: int = -1
    stdout: str = ""
    stderr: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))


def _body(environ: WSGIEnvironment) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body: bytes = environ["wsgi.input"].read(length) if length > 0 else b""
    environ["wsgi.input"] = io.BytesIO(body)
    return body


def _call(
    app: WSGIApplication, environ: WSGIEnvironment
) -> tuple[str, list[tuple[str, str]], bytes]:
    captured: dict[str, Any] = {}

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.update(status=status, headers=headers)
        return lambda _data: None

    result = app(environ, start)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured["status"], captured["headers"], body


def _reply(
    start_response: StartResponse, status: str, headers: list[tuple[str, str]], body: bytes
) -> Iterable[bytes]:
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]


class SsmAgent:
    """WSGI middleware in front of moto: runs AWS-RunShellScript commands for real."""

    def __init__(self, app: WSGIApplication, root: Path) -> None:
        self.app = app
        self.root = root
        self.invocations: dict[tuple[str, str], Invocation] = {}
        self.commands: list[str] = []  # every script run, in order
        # None: EnableImageDeprecation reaches moto, which lacks it; a list: answered as AWS does
        self.deprecations: list[tuple[str, str]] | None = None
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.endswith(".SendCommand"):
            return self._send(environ, start_response)
        if target.endswith(".GetCommandInvocation"):
            request = json.loads(_body(environ) or b"{}")
            with self._lock:
                found = self.invocations.get((request["CommandId"], request["InstanceId"]))
            if found is not None:
                return self._invocation(start_response, request, found)
        elif target == "" and "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
            form = dict(parse_qsl(_body(environ).decode()))
            action = form.get("Action")
            if action == "EnableImageDeprecation" and self.deprecations is not None:
                self.deprecations.append((form["ImageId"], form["DeprecateAt"]))
                body = (
                    b'<EnableImageDeprecationResponse xmlns="http://ec2.amazonaws.com/doc/'
                    b'2016-11-15/"><return>true</return></EnableImageDeprecationResponse>'
                )
                return _reply(start_response, "200 OK", [("Content-Type", "text/xml")], body)
            if action in ("DescribeImages", "CreateImage", "CopyImage", "RunInstances"):
                status, headers, body = _call(self.app, environ)
                if status.startswith("2"):
                    body = self._ec2(action, form, body)
                return _reply(start_response, status, headers, body)
        return self.app(environ, start_response)

    def _ec2(self, action: str | None, form: dict[str, str], body: bytes) -> bytes:
        if action == "DescribeImages":
            return body.replace(b">standard</rootDeviceType>", b">ebs</rootDeviceType>")
        text = body.decode()
        if action in ("CreateImage", "CopyImage"):
            made = re.search(r"<imageId>(ami-\w+)</imageId>", text)
            assert made is not None, text
            source = form["InstanceId"] if action == "CreateImage" else form["SourceImageId"]
            self._copy_disk(self.root / source, self.root / made.group(1))
        else:
            for instance_id in dict.fromkeys(re.findall(r"<instanceId>(i-\w+)</instanceId>", text)):
                self._copy_disk(self.root / form["ImageId"], self.root / instance_id)
        return body

    @staticmethod
    def _copy_disk(source: Path, target: Path) -> None:
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True)

    def _send(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = json.loads(_body(environ) or b"{}")
        status, headers, body = _call(self.app, environ)
        if not status.startswith("2") or request.get("DocumentName") != "AWS-RunShellScript":
            return _reply(start_response, status, headers, body)
        response = json.loads(body)
        command_id = response["Command"]["CommandId"]
        script = "\n".join(request["Parameters"]["commands"])
        limit = float(request["Parameters"].get("executionTimeout", ["3600"])[0])
        for instance_id in request.get("InstanceIds", []):
            invocation = Invocation()
            with self._lock:
                self.invocations[(command_id, instance_id)] = invocation
                self.commands.append(script)
            threading.Thread(
                target=self._run, args=(invocation, instance_id, script, limit), daemon=True
            ).start()
        response["Command"]["InstanceIds"] = request.get("InstanceIds", [])  # moto says "all"
        return _reply(start_response, status, headers, json.dumps(response).encode())

    def _run(self, invocation: Invocation, instance_id: str, script: str, limit: float) -> None:
        root = self.root / instance_id
        root.mkdir(parents=True, exist_ok=True)
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            "HPCFLEET_ROOT": str(root),
            "INSTANCE_ID": instance_id,
        }
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=root,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        invocation.process = process
        try:
            out, err = process.communicate(timeout=limit)
            status = "Success" if process.returncode == 0 else "Failed"
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            status = "TimedOut"
        with self._lock:
            invocation.stdout, invocation.stderr = out, err
            invocation.exit_code = process.returncode
            invocation.status = status

    def _invocation(
        self, start_response: StartResponse, request: dict[str, Any], found: Invocation
    ) -> Iterable[bytes]:
        with self._lock:
            body = {
                "CommandId": request["CommandId"],
                "InstanceId": request["InstanceId"],
                "DocumentName": "AWS-RunShellScript",
                "PluginName": "aws:runShellScript",
                "ResponseCode": found.exit_code,
                "ExecutionStartDateTime": found.started.isoformat(),
                "Status": found.status,
                "StatusDetails": found.status,
                "StandardOutputContent": found.stdout[-24000:],
                "StandardErrorContent": found.stderr[-8000:],
            }
        return _reply(
            start_response,
            "200 OK",
            [("Content-Type", "application/x-amz-json-1.1")],
            json.dumps(body).encode(),
        )

    def stop(self) -> None:
        """Kill scripts still running (a test that killed the worker mid-step leaves one)."""
        with self._lock:
            running = [i.process for i in self.invocations.values() if i.process is not None]
        for process in running:
            if process.poll() is None:
                process.kill()


class BakeryMoto:
    """A `MotoServer` whose SSM runs scripts (see module docstring)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bakery-ssm-")
        self.agent = SsmAgent(DomainDispatcherApplication(create_backend_app), Path(self._tmp.name))
        self.server = MotoServer()
        self.server.middleware = AwsFidelityMiddleware(self.agent)

    def __enter__(self) -> BakeryMoto:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.agent.stop()
        self.server.stop()
        self._tmp.cleanup()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def reset(self) -> None:
        self.agent.stop()
        self.agent.invocations.clear()
        self.agent.commands.clear()
        self.agent.deprecations = None
        self.server.reset()

    def root_of(self, instance_id: str) -> Path:
        return self.agent.root / instance_id


def write_recipe_tree(
    folder: Path,
    *,
    name: str = "linux",
    steps: dict[str, str] | None = None,
    smoke_check: str = 'test -f "$HPCFLEET_ROOT/etc/slurm-installed"\n',
    **overrides: Any,
) -> Path:
    """Write step scripts, a first-boot template, a smoke check and a recipes.json; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = steps or {
        "os-updates": 'echo "updating $HPCFLEET_RECIPE $HPCFLEET_VERSION"\n',
        "slurm-node": 'mkdir -p "$HPCFLEET_ROOT/etc"\ntouch "$HPCFLEET_ROOT/etc/slurm-installed"\n',
    }
    step_list = []
    for step_name, body in steps.items():
        path = folder / f"{step_name}.sh"
        path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
        path.chmod(0o755)
        step_list.append({"name": step_name, "script": path.name, "timeout_seconds": 60})
    (folder / "join-domain.sh").write_text(
        "#!/bin/bash\nrealm join --computer-ou='${ou}' '${domain}'\n"
    )
    check = folder / "smoke.sh"
    check.write_text("#!/bin/bash\nset -euo pipefail\n" + smoke_check)
    recipe: dict[str, Any] = {
        "base": {"filter": {"owners": ["self"], "name": "al2023-ami-*"}},
        "instance_type": "c5.large",
        "steps": step_list,
        "first_boot": {
            "kind": "cloud-init",
            "template": "join-domain.sh",
            "variables": {"domain": "corp.example.org", "ou": "OU=HPC"},
        },
        "tags": {"cost-centre": "hpc"},
        "regions": [REGION],
        "validation": {"smoke_check": "smoke.sh", "timeout_seconds": 60},
        **overrides,
    }
    path = folder / "recipes.json"
    path.write_text(json.dumps({"recipes": {name: recipe}}, indent=2))
    return path


def seed_base_image(endpoint: str, name: str = BASE_NAME, region: str = REGION) -> str:
    """An available self-owned image, as a base to build from (moto loads no public AMIs here)."""
    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    instance = ec2.run_instances(
        ImageId="ami-12345678", InstanceType="t3.micro", MinCount=1, MaxCount=1
    )
    instance_id = instance["Instances"][0]["InstanceId"]
    image_id: str = ec2.create_image(InstanceId=instance_id, Name=name)["ImageId"]
    ec2.terminate_instances(InstanceIds=[instance_id])
    return image_id


class ClockDriver:
    """Moves a ManualClock forward in the background, so polls that sleep on it come back."""

    def __init__(self, clock: Any, step: float = 1.0, every: float = 0.005) -> None:
        self.clock = clock
        self.step = step
        self.every = every
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ClockDriver:
        async def drive() -> None:
            while True:
                await asyncio.sleep(self.every)
                self.clock.advance(self.step)

        self._task = asyncio.create_task(drive())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def ec2(endpoint: str, region: str = REGION) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def live_instances(endpoint: str, region: str = REGION) -> list[str]:
    reservations = ec2(endpoint, region).describe_instances(
        Filters=[
            {"Name": "tag-key", "Values": ["hpcfleet:build"]},
            {
                "Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped"],
            },
        ]
    )["Reservations"]
    return [i["InstanceId"] for r in reservations for i in r["Instances"]]


def build_images(endpoint: str, build_id: str, region: str = REGION) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = ec2(endpoint, region).describe_images(
        Owners=["self"], Filters=[{"Name": "tag:hpcfleet:build", "Values": [build_id]}]
    )["Images"]
    return images


async def outbox(bakery: Bakery) -> list[Message]:
    """Every message bakery emitted, in order."""
    table = MAILBOX.outbox
    async with bakery.service.mailbox.engine.connect() as conn:
        rows = (await conn.execute(select(table.c.name, table.c.body).order_by(table.c.id))).all()
    return [decode(r.name, r.body) for r in rows]


async def published(bakery: Bakery) -> list[ImageReady]:
    return [m for m in await outbox(bakery) if isinstance(m, ImageReady)]


async def retired(bakery: Bakery) -> list[ImageRetired]:
    return [m for m in await outbox(bakery) if isinstance(m, ImageRetired)]
