"""The operator's commands: `hpcfleet status`, `nodes`, `images`, `bake`, `pool set-size`,
`decisions`, `cost`, `policy show` / `policy set`. They talk to the REST API (`--url`,
HPCFLEET_URL) with the token that `hpcfleet login` saved; tables for people, `--json` for
scripts."""

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
policy_app = typer.Typer(
    help="See or change autogrow's power policy of each pool.", no_args_is_help=True
)


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
            answer = response.json()
            detail = answer.get("detail", response.text)
            problems = answer.get("problems") or []  # an invalid request: which field, why
            if problems:
                detail = f"{detail}: " + "; ".join(
                    f"{p['where']}: {p['problem']}" for p in problems
                )
        except (ValueError, AttributeError, KeyError, TypeError):
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


_UNSET = {"max_running": "none", "partitions": "all", "billing": "image"}


def _knob(view: dict[str, Any], knob: str) -> str:
    """One knob of a pool's policy as shown: * marks the pool's own setting."""
    value = view["policy"].get(knob)
    if isinstance(value, list):
        value = ",".join(sorted(str(v) for v in value))
    shown = _UNSET.get(knob, "-") if value is None else str(value)
    return f"{shown}*" if knob in view["overrides"] else shown


@policy_app.command("show")
def policy_show(
    pool: str | None = typer.Argument(None, help="One pool; default: every pool."),
    url: str = URL,
    token_file: Path | None = TOKEN_FILE,
    as_json: bool = AS_JSON,
) -> None:
    """Each pool's power policy, a column per pool; * marks the pool's own settings, the others
    are the service's default."""
    if pool is None:
        data = _call(url, token_file, "GET", "/autogrow/policies")
        views = data
    else:
        data = _call(url, token_file, "GET", f"/autogrow/policies/{pool}")
        views = [data]
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    knobs = list(dict.fromkeys(k for v in views for k in v["policy"]))
    table = Table("setting", *(v["pool"] for v in views))
    for knob in knobs:
        table.add_row(knob, *(_knob(v, knob) for v in views))
    table.add_row("updated", *(f"{v['updated_at'] or '-'} {v['updated_by'] or ''}" for v in views))
    if any(v.get("problem") for v in views):
        table.add_row("problem", *(v.get("problem") or "-" for v in views))
    Console().print(table)


def _json_value(text: str) -> Any:
    """A --set value: JSON if it parses (2, 1.5, null, true, ["a"]), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@policy_app.command("set")
def policy_set(
    pool: str = typer.Argument(help="The pool."),
    min_running: int | None = typer.Option(None, "--min", min=0, help="Nodes kept running."),
    max_running: str | None = typer.Option(
        None, "--max", help="Most nodes running or starting at once; 'none' for no cap."
    ),
    idle_seconds: float | None = typer.Option(
        None, min=0, help="Per-second billing: idle this long before a node goes down."
    ),
    hourly_window_seconds: float | None = typer.Option(
        None, help="Hourly billing: go down only in the last this many seconds of the hour."
    ),
    boot_timeout_seconds: float | None = typer.Option(
        None, help="A node not registered by then is powered off."
    ),
    cores_per_node: int | None = typer.Option(None, min=1, help="Cores of a node."),
    partitions: str | None = typer.Option(
        None, help="Partitions the pool serves, comma-separated; 'all' for every one."
    ),
    billing: str | None = typer.Option(
        None, help="per-second or hourly to override the images' billing; 'image' to follow it."
    ),
    assign: list[str] | None = typer.Option(
        None, "--set", help="Any other setting, KNOB=VALUE (VALUE as JSON); repeatable."
    ),
    unset: list[str] | None = typer.Option(
        None, "--unset", help="Make this setting follow the default again; repeatable."
    ),
    reset: bool = typer.Option(False, "--reset", help="Drop all of the pool's own settings first."),
    url: str = URL,
    token_file: Path | None = TOKEN_FILE,
) -> None:
    """Change a pool's own policy settings; the others keep following the default. autogrow
    checks them and decides with them at once."""
    given: dict[str, Any] = {}
    for item in assign or []:
        knob, sep, value = item.partition("=")
        if not sep or not knob:
            typer.echo(f"hpcfleet: --set takes KNOB=VALUE, not {item!r}", err=True)
            raise typer.Exit(2)
        given[knob.strip()] = _json_value(value)
    if min_running is not None:
        given["min_running"] = min_running
    if max_running is not None:
        if max_running.lower() == "none":
            given["max_running"] = None
        elif max_running.isdigit():
            given["max_running"] = int(max_running)
        else:
            typer.echo(f"hpcfleet: --max takes a number or 'none', not {max_running!r}", err=True)
            raise typer.Exit(2)
    for knob, number in (
        ("idle_seconds", idle_seconds),
        ("hourly_window_seconds", hourly_window_seconds),
        ("boot_timeout_seconds", boot_timeout_seconds),
        ("cores_per_node", cores_per_node),
    ):
        if number is not None:
            given[knob] = number
    if partitions is not None:
        names = [p.strip() for p in partitions.split(",") if p.strip()]
        given["partitions"] = None if names == ["all"] else names
    if billing is not None:
        given["billing"] = None if billing == "image" else billing
    if not given and not unset and not reset:
        typer.echo("hpcfleet: nothing to change; see hpcfleet policy set --help", err=True)
        raise typer.Exit(2)
    current = _call(url, token_file, "GET", f"/autogrow/policies/{pool}")
    own = {} if reset else dict(current["overrides"])
    for knob in unset or []:
        own.pop(knob, None)
    own.update(given)
    changed = _call(url, token_file, "PUT", f"/autogrow/policies/{pool}", own)
    shown = ", ".join(f"{knob} {_knob(changed, knob)}" for knob in changed["policy"])
    typer.echo(f"pool {pool}: {shown} (* its own)")


def register(app: typer.Typer) -> None:
    for command in (status, nodes, images, bake, decisions, cost):
        app.command()(command)
    app.add_typer(pool_app, name="pool")
    app.add_typer(policy_app, name="policy")
