"""No Docker engine runs here, so check the compose file against the package instead."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import typer
import yaml

from services.cli import app
from services.registry import SERVICES
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def hpcfleet_services() -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in compose()["services"].items()
        if spec.get("image") == "hpcfleet:dev"
    }


def test_every_service_has_an_api_and_a_worker() -> None:
    commands = {tuple(spec["command"]) for spec in hpcfleet_services().values()}
    for service in SERVICES:
        assert ("hpcfleet", "serve", service) in commands
        assert ("hpcfleet", "worker", service) in commands
    assert ("hpcfleet", "migrate") in commands
    assert {"postgres", "rabbitmq", "moto"} <= set(compose()["services"])


def test_every_command_is_a_real_entry_point() -> None:
    cli = typer.main.get_command(app)
    subcommands = cli.commands  # type: ignore[attr-defined]
    for name, spec in hpcfleet_services().items():
        command = spec["command"]
        if command[0] == "hpcfleet":
            assert command[1] in subcommands, f"{name}: no `hpcfleet {command[1]}`"
            if command[1] in {"serve", "worker"}:
                assert command[2] in SERVICES, f"{name}: unknown service {command[2]}"
        else:
            assert command[:2] == ["python", "-m"], f"{name}: unexpected command {command}"
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: no {command[2]}"


def test_environment_names_real_settings() -> None:
    fields = set(Settings.model_fields)
    for name, spec in hpcfleet_services().items():
        for variable in spec.get("environment", {}):
            assert variable.startswith("HPCFLEET_"), f"{name}: {variable}"
            assert variable.removeprefix("HPCFLEET_").lower() in fields, f"{name}: {variable}"


def test_the_dockerfile_installs_the_package_with_its_entry_point() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install" in dockerfile
    for folder in ("shared", "services", "deploy"):
        assert f"COPY {folder} ./{folder}" in dockerfile
