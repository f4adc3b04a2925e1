"""The Packer back-end: render an HCL2 template from the recipe, run `packer build` as a subprocess,
read the image from its manifest.

Credentials reach Packer only through its environment, never the template or the log. Packer runs
in its own process group; on cancellation or timeout it gets SIGINT (it then terminates its builder
and deletes its temporary key pair and security group), and SIGKILL if it does not finish in time.
Its builder instances carry the build's tags, so the runner's garbage collection also finds those
of a Packer killed together with the worker.

With `communicator = "none"` (a moto rehearsal: moto instances run nothing) steps are shell-local
provisioners on this host with HPCFLEET_ROOT set to the build's scratch folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.bakery.aws import BakeryAws
from services.bakery.pipeline import (
    BUILDER_ROLE,
    BuildContext,
    BuildFailed,
    Progress,
    first_boot_installer,
    generalize_script,
    tail,
)
from services.bakery.settings import BakerySettings

SOURCE = "amazon-ebs.bakery"
_SUDO_BASH = "chmod +x {{ .Path }}; {{ .Vars }} sudo -E bash '{{ .Path }}'"
_STOP_GRACE_SECONDS = 120.0
_ERROR_MARKERS = ("Provisioning step had errors", "Script exited with non-zero", "errored")
# Packer's announcements that open a phase, in the order they come
_PHASES = (
    ("Launching a source AWS instance", "launch-builder"),
    ("Stopping the source instance", "stop-builder"),
    ("Creating AMI", "create-image"),
    ("Terminating the source AWS instance", "terminate-builder"),
)


def hcl_string(value: str) -> str:
    """An HCL string literal: JSON escapes, plus HCL's own template sequences escaped."""
    return json.dumps(value).replace("${", "$${").replace("%{", "%%{")


def _hcl_map(values: Mapping[str, str], indent: str) -> str:
    lines = [f"{indent}  {hcl_string(k)} = {hcl_string(v)}" for k, v in sorted(values.items())]
    return "{\n" + "\n".join(lines) + f"\n{indent}}}"


def _hcl_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(hcl_string(v) for v in values) + "]"


def render_template(
    ctx: BuildContext,
    scripts: Sequence[tuple[str, Path, int]],
    *,
    communicator: str,
    endpoint_url: str | None,
    rehearsal_root: Path,
) -> str:
    """The HCL2 template for one build; `scripts` are (step name, file, timeout seconds)."""
    recipe = ctx.recipe
    source = [
        f"  region                  = {hcl_string(recipe.home_region)}",
        f"  source_ami              = {hcl_string(ctx.base_image)}",
        f"  instance_type           = {hcl_string(recipe.instance_type)}",
        f"  ami_name                = {hcl_string(ctx.image_name)}",
        f"  ami_description         = {hcl_string(f'hpcfleet {recipe.name} {ctx.version}')}",
        f"  communicator            = {hcl_string(communicator)}",
        f"  tags                    = {_hcl_map(ctx.image_tags, '  ')}",
        f"  run_tags                = {_hcl_map(ctx.instance_tags(BUILDER_ROLE), '  ')}",
        f"  run_volume_tags         = {_hcl_map(ctx.instance_tags(BUILDER_ROLE), '  ')}",
    ]
    if recipe.subnet_id:
        source.append(f"  subnet_id               = {hcl_string(recipe.subnet_id)}")
    if recipe.security_group_ids:
        source.append(f"  security_group_ids      = {_hcl_list(recipe.security_group_ids)}")
    if recipe.iam_instance_profile:
        source.append(f"  iam_instance_profile    = {hcl_string(recipe.iam_instance_profile)}")
    if communicator == "ssh":
        source.append(f"  ssh_username            = {hcl_string(recipe.ssh_username)}")
    elif communicator == "winrm":
        source += [
            '  winrm_username          = "Administrator"',
            "  winrm_use_ssl           = true",
            "  winrm_insecure          = true",
        ]
    if endpoint_url is not None:
        source += [
            f"  custom_endpoint_ec2     = {hcl_string(endpoint_url)}",
            "  skip_region_validation  = true",
            "  skip_metadata_api_check = true",
            "  skip_credential_validation = true",
        ]
    environment = dict(ctx.script_environment())
    if communicator == "none":
        environment["HPCFLEET_ROOT"] = str(rehearsal_root)
    env_list = _hcl_list([f"{k}={v}" for k, v in sorted(environment.items())])
    provisioners = []
    for _name, path, timeout in scripts:
        body = [
            f"    scripts          = {_hcl_list([str(path)])}",
            f'    timeout          = "{timeout}s"',
        ]
        if communicator == "none":
            kind = "shell-local"
            if recipe.platform == "windows":
                body.append('    execute_command  = ["pwsh", "-NoProfile", "-File", "{{.Script}}"]')
            body.append(f"    environment_vars = {env_list}")
        elif recipe.platform == "windows":
            kind = "powershell"
            body.append(f"    environment_vars = {env_list}")
        else:
            kind = "shell"
            body.append(f"    environment_vars = {env_list}")
            body.append(f"    execute_command  = {hcl_string(_SUDO_BASH)}")
        provisioners.append(f'  provisioner "{kind}" {{\n' + "\n".join(body) + "\n  }")
    return "\n".join(
        [
            f"# hpcfleet bakery: recipe {recipe.name}, version {ctx.version}, build {ctx.build_id}",
            'source "amazon-ebs" "bakery" {',
            *source,
            "}",
            "",
            "build {",
            f'  sources = ["source.{SOURCE}"]',
            "",
            *provisioners,
            "",
            '  post-processor "manifest" {',
            '    output = "manifest.json"',
            "  }",
            "}",
            "",
        ]
    )


def artifact_from_manifest(manifest: Path, region: str) -> str:
    """The image id of the last run recorded in Packer's manifest, in `region`."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildFailed(f"packer left no readable manifest: {exc}") from None
    run = data.get("last_run_uuid")
    for entry in reversed(data.get("builds", [])):
        if run is None or entry.get("packer_run_uuid") == run:
            for artifact in str(entry.get("artifact_id", "")).split(","):
                where, _, image_id = artifact.partition(":")
                if where == region and image_id:
                    return image_id
    raise BuildFailed(f"packer's manifest names no image in {region}")


class PackerBackend:
    def __init__(self, aws: BakeryAws, settings: BakerySettings) -> None:
        self.aws = aws
        self.settings = settings

    async def build(self, ctx: BuildContext) -> str:
        recipe = ctx.recipe
        workdir = (self.settings.work_dir / f"{ctx.build_id}-{ctx.attempt}").resolve()
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        try:
            scripts = [(s.name, s.script, s.timeout_seconds) for s in recipe.steps]
            installer = first_boot_installer(recipe)
            if installer is not None:
                scripts.append(self._write(workdir, "bake-first-boot", installer, recipe.platform))
            scripts.append(
                self._write(
                    workdir, "generalize", generalize_script(recipe.platform), recipe.platform
                )
            )
            template = workdir / "bakery.pkr.hcl"
            template.write_text(
                render_template(
                    ctx,
                    scripts,
                    communicator=self.settings.packer_communicator,
                    endpoint_url=self.aws.endpoint_url,
                    rehearsal_root=workdir / "root",
                ),
                encoding="utf-8",
            )
            budget = (
                sum(timeout for _, _, timeout in scripts)
                + self.settings.boot_timeout_seconds
                + self.settings.image_timeout_seconds
            )
            await self._run(ctx, workdir, template, scripts, budget)
            image_id = artifact_from_manifest(workdir / "manifest.json", recipe.home_region)
            await ctx.progress.note(image_id=image_id)
            return image_id
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def _write(workdir: Path, name: str, script: str, platform: str) -> tuple[str, Path, int]:
        path = workdir / f"{name}{'.ps1' if platform == 'windows' else '.sh'}"
        header = "" if platform == "windows" else "#!/bin/bash\n"
        path.write_text(header + script + "\n", encoding="utf-8")
        path.chmod(0o755)
        return (name, path, 600)

    async def _environment(self, workdir: Path) -> dict[str, str]:
        """Only what Packer needs; the credentials of the bakery's role, not the process's."""
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "PACKER_CONFIG_DIR": str(workdir),
            "CHECKPOINT_DISABLE": "1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        credentials = await self.aws.session.get_credentials()
        if credentials is None:
            raise BuildFailed("no AWS credentials to hand to packer")
        frozen = await credentials.get_frozen_credentials()
        environment["AWS_ACCESS_KEY_ID"] = frozen.access_key
        environment["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
        if frozen.token:
            environment["AWS_SESSION_TOKEN"] = frozen.token
        return environment

    async def _run(
        self,
        ctx: BuildContext,
        workdir: Path,
        template: Path,
        scripts: Sequence[tuple[str, Path, int]],
        budget: float,
    ) -> None:
        progress = ctx.progress
        process = await asyncio.create_subprocess_exec(
            self.settings.packer,
            "build",
            "-color=false",
            "-on-error=cleanup",
            template.name,
            cwd=workdir,
            env=await self._environment(workdir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        await progress.log(f"packer build started (pid {process.pid})")
        phases = PhaseTracker(progress, {str(path): name for name, path, _ in scripts})
        lines: list[str] = []
        try:
            async with asyncio.timeout(budget):
                assert process.stdout is not None
                async for raw in process.stdout:
                    line = raw.decode("utf-8", "replace").rstrip()
                    if not line:
                        continue
                    lines.append(line)
                    await progress.log(line)
                    await phases.saw(line)
                code = await process.wait()
        except BaseException as exc:
            await _interrupt(process)
            await phases.close("failed")
            if isinstance(exc, TimeoutError):
                raise BuildFailed(f"packer build timed out after {budget:.0f} s") from None
            raise
        if code != 0:
            await phases.close("failed")
            raise BuildFailed(f"packer build failed (exit {code}): {_packer_error(lines)}")
        await phases.close("succeeded")


class PhaseTracker:
    """Turns Packer's output into the build's steps, so its progress shows step by step.

    Once Packer reports an error the step under way is marked failed, and what Packer does next
    (its clean-up) is left to the log rather than shown as steps of the build.
    """

    def __init__(self, progress: Progress, scripts: Mapping[str, str]) -> None:
        self.progress = progress
        self.scripts = scripts
        self.current: int | None = None
        self.broken = False

    async def saw(self, line: str) -> None:
        if self.broken:
            return
        if any(marker in line for marker in _ERROR_MARKERS):
            self.broken = True
            await self.close("failed")
            return
        name = next((step for marker, step in _PHASES if marker in line), None)
        if name is None and "shell script" in line:
            name = next((s for path, s in self.scripts.items() if line.endswith(path)), None)
        if name is not None:
            await self.close("succeeded")
            self.current = await self.progress.start_step(name)

    async def close(self, status: str) -> None:
        if self.current is not None:
            current, self.current = self.current, None
            await self.progress.finish_step(current, status)


def _packer_error(lines: Sequence[str]) -> str:
    """Packer's closing summary (`--> ...` lines), else its `errored` lines, else the last line."""
    summary = [line.removeprefix("--> ") for line in lines if line.startswith("--> ")]
    errored = [line for line in lines if "errored" in line]
    chosen = summary or errored[-1:] or list(lines[-1:]) or ["no output"]
    return tail(" | ".join(chosen), 500)


async def _interrupt(process: asyncio.subprocess.Process) -> None:
    """SIGINT lets Packer clean up its builder; SIGKILL the group if it takes too long."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        await asyncio.shield(asyncio.wait_for(process.wait(), _STOP_GRACE_SECONDS))
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
