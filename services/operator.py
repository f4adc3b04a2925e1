"""The operator's commands: `hpcfleet status`, `nodes`, `images`, `bake`, `pool set-size`,
`decisions`, `cost`. They talk to the REST API (`--url`, HPCFLEET_URL) with the token that
`hpcfleet login` saved; tables for people, `--json` for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from services.auth.login import LoginError, default_token_path, read_token

URL = typer.Option("http://127.0.0.1:8000", envvar="HPCFLEET_URL", help="hpcfleet's API.")
TOKEN_FILE = typer.Option(None, envvar="HPCFLEET_TOKEN_FILE", help="Token from hpcfleet login.")
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
POOL = typer.Option("default", help="Pool name.")

pool_app = typer.Typer(help="Change a pool.", no_args_is_help=True)


def _call(url: str, token_file: Path | None, method: str, path: str, body: Any = None) -> Any:
    """One API call; any failure becomes one line on stderr and exit status 1."""
    try:
        token = read_token(token_file or default_token_path())
    except LoginError as exc:
        typer.echo(f"hpcfleet: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        response = httpx.request(
            method,
            f"{url.rstrip('/')}{path}",
            json=body,
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        typer.echo(f"hpcfleet: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        typer.echo(f"hpcfleet: {method} {path}: {response.status_code} {detail}", err=True)
        raise typer.Exit(1)
    return response.json()


def _show(data: Any, as_json: bool, columns: list[str], rows: list[dict[str, Any]]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(row.get(column, "")) for column in columns))
    Console().print(table)


def status(url: str = URL, token_file: Path | None = TOKEN_FILE, as_json: bool = AS_JSON) -> None:
    """The pools, their images and nodes by state, and the cost so far."""
    pools = _call(url, token_file, "GET", "/pool/pools")
    cost = _call(url, token_file, "GET", "/autogrow/cost")
    if as_json:
        typer.echo(json.dumps({"pools": pools, "cost": cost}, indent=2, default=str))
        return
    rows = [
        {
            "pool": p["name"],
            "image": p["spec"].get("image_id") or "-",
            "nodes": ", ".join(f"{n} {s}" for s, n in sorted(p["by_state"].items())) or "none",
            "problems": "; ".join(p["problems"]) or "-",
        }
        for p in pools
    ]
    _show(pools, False, ["pool", "image", "nodes", "problems"], rows)
    typer.echo(f"billed so far: {cost['billed_node_hours']:.1f} node-hours")


def nodes(
    pool: str = POOL, url: str = URL, token_file: Path | None = TOKEN_FILE, as_json: bool = AS_JSON
) -> None:
    """A pool's nodes."""
    page = _call(url, token_file, "GET", f"/pool/pools/{pool}/nodes?limit=1000")
    columns = ["scheduler_node_name", "state", "image_id", "instance_id", "retiring"]
    _show(page, as_json, columns, page["nodes"])


def images(url: str = URL, token_file: Path | None = TOKEN_FILE, as_json: bool = AS_JSON) -> None:
    """Images bakery published."""
    data = _call(url, token_file, "GET", "/bakery/images")
    rows = data if isinstance(data, list) else data.get("images", [])
    _show(data, as_json, ["image_id", "recipe", "version", "region", "status"], rows)


def bake(
    recipe: str = typer.Argument(help="Recipe to build."),
    reason: str = typer.Option("on demand", help="Why, for the record."),
    url: str = URL,
    token_file: Path | None = TOKEN_FILE,
) -> None:
    """Ask bakery for a build now."""
    accepted = _call(
        url, token_file, "POST", "/bakery/builds", {"recipe": recipe, "reason": reason}
    )
    typer.echo(f"build {accepted['build_id']} accepted")


@pool_app.command("set-size")
def set_size(
    size: int = typer.Argument(help="The new number of nodes.", min=0),
    pool: str = POOL,
    url: str = URL,
    token_file: Path | None = TOKEN_FILE,
) -> None:
    """Change how many nodes a pool keeps."""
    current = _call(url, token_file, "GET", f"/pool/pools/{pool}")
    spec = {**current["spec"], "size": size}
    _call(url, token_file, "PUT", f"/pool/pools/{pool}", spec)
    typer.echo(f"pool {pool}: size {size}")


def decisions(
    limit: int = typer.Option(20, min=1, max=1000),
    url: str = URL,
    token_file: Path | None = TOKEN_FILE,
    as_json: bool = AS_JSON,
) -> None:
    """autogrow's recent decisions and why."""
    data = _call(url, token_file, "GET", f"/autogrow/decisions?limit={limit}")
    _show(data, as_json, ["decided_at", "trigger", "summary"], data)


def cost(url: str = URL, token_file: Path | None = TOKEN_FILE, as_json: bool = AS_JSON) -> None:
    """Node-hours billed so far."""
    data = _call(url, token_file, "GET", "/autogrow/cost")
    _show(
        data, as_json, ["billed_node_hours", "running_node_hours", "starts", "running_now"], [data]
    )


def register(app: typer.Typer) -> None:
    for command in (status, nodes, images, bake, decisions, cost):
        app.command()(command)
    app.add_typer(pool_app, name="pool")
