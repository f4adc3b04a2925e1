"""Recipe validation: every bad recipe is refused at load time with a message that names the field;
the bundled examples load; the first-boot template fills only `${name}` placeholders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bakery_kit import write_recipe_tree

from services.bakery.recipes import Placeholders, load_recipes
from services.bakery.settings import EXAMPLE_RECIPES
from shared.settings import ConfigurationError


def with_changes(path: Path, change: dict[str, Any]) -> Path:
    document = json.loads(path.read_text())
    recipe = document["recipes"]["linux"]
    for key, value in change.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"schedule": "0 4 32 * *"},
            "recipes.linux.schedule: '0 4 32 * *' is not a cron expression (minute hour "
            "day-of-month month day-of-week, e.g. '0 4 9-15 * WED')",
        ),
        ({"schedule": "every tuesday"}, "recipes.linux.schedule: 'every tuesday' is not a cron"),
        ({"base": {}}, "recipes.linux.base: give exactly one of image_id or filter"),
        ({"base": {"image_id": "ami-xyz"}}, "recipes.linux.base.image_id: String should match"),
        ({"steps": []}, "recipes.linux.steps: Tuple should have at least 1 item"),
        (
            {"steps": [{"name": "x", "script": "missing.sh"}]},
            "recipes.linux.steps.0.script: missing.sh is not a readable file",
        ),
        ({"regions": ["mars-north-1"]}, "recipes.linux.regions: not AWS regions: mars-north-1"),
        ({"regions": ["us-east-1", "us-east-1"]}, "a region is listed twice"),
        ({"tags": {"hpcfleet:role": "x"}}, "tags hpcfleet:role use a reserved prefix"),
        ({"billing": "monthly"}, "recipes.linux.billing: Input should be 'per-second' or 'hourly'"),
        ({"backend": "imagebuilder"}, "recipes.linux.backend: Input should be 'ec2' or 'packer'"),
        ({"validation": None}, "recipes.linux.validation: Field required"),
        ({"instance_type": "huge"}, "recipes.linux.instance_type: String should match"),
        (
            {"retention": {"deprecate_after_days": 30, "deregister_after_days": 7}},
            "deregister_after_days must not be less than deprecate_after_days",
        ),
        (
            {"retention": {"keep_last": 0}},
            "recipes.linux.retention.keep_last: Input should be greater than or equal to 1",
        ),
        (
            {"first_boot": {"kind": "cloud-init", "template": "join-domain.sh"}},
            "template join-domain.sh uses ${ou} but variables lack it",
        ),
        (
            {
                "first_boot": {
                    "kind": "ec2launch",
                    "template": "join-domain.sh",
                    "variables": {"ou": "x", "domain": "y"},
                }
            },
            "a linux image takes first_boot kind 'cloud-init'",
        ),
        ({"colour": "blue"}, "recipes.linux.colour: Extra inputs are not permitted"),
    ],
)
def test_bad_recipes_are_refused_with_a_clear_message(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = with_changes(write_recipe_tree(tmp_path), change)
    with pytest.raises(ConfigurationError) as refused:
        load_recipes(path)
    assert str(refused.value).startswith(f"invalid configuration: HPCFLEET_BAKERY_RECIPES: {path}")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "Expecting property name"),
        ('{"recipes": []}', "a recipes file holds a 'recipes' table keyed by recipe name"),
    ],
)
def test_unreadable_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "recipes.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        load_recipes(path)
    with pytest.raises(ConfigurationError, match="No such file"):
        load_recipes(tmp_path / "absent.json")


def test_toml_recipes_and_defaults(tmp_path: Path) -> None:
    write_recipe_tree(tmp_path)
    (tmp_path / "recipes.toml").write_text(
        """
[recipes.node]
base = { image_id = "ami-0123456789abcdef0" }
regions = ["eu-west-1", "eu-central-1"]
schedule = ""
validation = { smoke_check = "smoke.sh" }

[[recipes.node.steps]]
name = "updates"
script = "os-updates.sh"
"""
    )
    recipe = load_recipes(tmp_path / "recipes.toml").recipes["node"]
    assert recipe.schedule is None  # on demand only
    assert (recipe.home_region, recipe.backend, recipe.billing) == (
        "eu-west-1",
        "ec2",
        "per-second",
    )
    assert recipe.steps[0].script == (tmp_path / "os-updates.sh").resolve()
    assert (recipe.retention.keep_last, recipe.retention.deregister_after_days) == (3, 90)


def test_the_bundled_examples_load() -> None:
    recipes = load_recipes(EXAMPLE_RECIPES)
    assert recipes.names() == ["linux", "sles", "windows"]
    assert recipes.recipes["sles"].billing == "hourly"
    assert recipes.recipes["linux"].schedule == "0 4 9-15 * WED"
    windows = recipes.recipes["windows"].first_boot
    assert windows is not None and "$ErrorActionPreference = 'Stop'" in windows.render()


def test_the_example_nodes_take_no_jobs_on_their_provisioning_boot() -> None:
    """Found by the chaos run (seed 15): the first boot started slurmd, so Slurm put a job on a
    node the pool was provisioning, and the pool's stop at the end of that boot killed the job.
    slurmd now waits for the mark the first-boot script leaves, i.e. for the next boot."""
    recipes = load_recipes(EXAMPLE_RECIPES)
    for name in ("linux", "sles"):
        recipe = recipes.recipes[name]
        assert recipe.first_boot is not None
        first_boot = recipe.first_boot.render()
        commands = [line for line in first_boot.splitlines() if not line.startswith("#")]
        assert not [line for line in commands if "slurmd" in line]
        assert "touch /var/lib/hpcfleet/provisioned" in first_boot
        steps = "".join(step.script.read_text() for step in recipe.steps)
        assert "ConditionPathExists=/var/lib/hpcfleet/provisioned" in steps
        assert "systemctl enable munge slurmd" in steps


@pytest.mark.parametrize(
    ("template", "rendered"),
    [
        ("join ${domain}", "join corp"),
        ("$HOME $1 $$ ${HOME:-x}", "$HOME $1 $$ ${HOME:-x}"),
        ("literal $${domain}", "literal ${domain}"),
    ],
)
def test_only_braced_names_are_placeholders(template: str, rendered: str) -> None:
    assert Placeholders(template).substitute({"domain": "corp"}) == rendered
