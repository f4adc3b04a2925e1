"""Recipes: what image to bake, from what, how, when, and how long to keep it.

Recipes are configuration (a TOML or JSON file named by HPCFLEET_BAKERY_RECIPES), validated as a
whole when the service starts, so a typo in a cron expression or a missing script stops the process
with one line instead of failing a build a month later. Script and template paths are relative to
the recipes file and must exist; the first-boot template is rendered at load time so a variable it
needs and the recipe lacks is also caught then.
"""

from __future__ import annotations

import json
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.bakery.schedule import DEFAULT_SCHEDULE, check_cron
from shared.events import BillingModel
from shared.settings import ConfigurationError

RESERVED_TAG_PREFIXES = ("hpcfleet:", "aws:")
_REGION = r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _script(value: Path, info: ValidationInfo) -> Path:
    """Resolve against the recipes file's folder and insist the file exists."""
    base = (info.context or {}).get("base_dir")
    path = value if value.is_absolute() or base is None else Path(base) / value
    if not path.is_file():
        raise ValueError(f"{value} is not a readable file (looked at {path})")
    return path.resolve()


class BaseFilter(_Model):
    """The newest image whose name matches `name` among those `owners` publish."""

    owners: tuple[str, ...] = Field(
        min_length=1, description="Account ids or aliases (amazon, aws-marketplace, self)."
    )
    name: str = Field(min_length=1, max_length=128, description="EC2 name pattern, * and ?.")


class BaseImage(_Model):
    """A fixed AMI id, or a filter resolved at each build to the most recent match."""

    image_id: str | None = Field(default=None, pattern=r"^ami-[0-9a-f]{8,17}$")
    filter: BaseFilter | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.image_id is None) == (self.filter is None):
            raise ValueError("give exactly one of image_id or filter")
        return self


class Step(_Model):
    """One build step: a script file run on the builder (bash on Linux, PowerShell on Windows)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,47}$", description="Shown in progress.")
    script: Path = Field(description="Script file, relative to the recipes file.")
    timeout_seconds: int = Field(default=3600, ge=10, le=172_800)

    _check_script = field_validator("script")(_script)


_PLACEHOLDER = r"""
\$(?:
  (?P<escaped>\$)(?=\{) |
  \{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\} |
  (?P<named>(?!x)x) |
  (?P<invalid>(?!x)x)
)
"""


class Placeholders(string.Template):
    """Only `${name}` is a placeholder (`$${` writes a literal `${`): bash and PowerShell keep their
    own `$variables` untouched."""

    pattern = _PLACEHOLDER  # type: ignore[assignment]  # string.Template compiles it


class FirstBoot(_Model):
    """What a node does on its first boot (e.g. join the AD domain), baked into the image.

    The template's `${name}` placeholders are filled from `variables`. Never put a secret here: it
    would be baked into every image; the template fetches secrets at boot (e.g. from SSM).
    """

    kind: Literal["cloud-init", "ec2launch"]
    template: Path
    variables: Mapping[str, str] = Field(default_factory=dict)

    _check_template = field_validator("template")(_script)

    @model_validator(mode="after")
    def _renders(self) -> Self:
        self.render()
        return self

    def render(self) -> str:
        text = self.template.read_text(encoding="utf-8")
        try:
            return Placeholders(text).substitute(self.variables)
        except KeyError as missing:
            raise ValueError(
                f"template {self.template.name} uses ${{{missing.args[0]}}} but variables lack it"
            ) from None
        except ValueError as exc:
            raise ValueError(f"template {self.template.name}: {exc}") from None


class Retention(_Model):
    """Keep the newest `keep_last` images; older ones are deprecated, then deregistered."""

    keep_last: int = Field(default=3, ge=1, le=100)
    deprecate_after_days: int = Field(default=30, ge=0, le=3650)
    deregister_after_days: int = Field(default=90, ge=0, le=3650)
    delete_snapshots: bool = True

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.deregister_after_days < self.deprecate_after_days:
            raise ValueError("deregister_after_days must not be less than deprecate_after_days")
        return self


class Validation(_Model):
    """How a new image proves itself before anyone uses it."""

    smoke_check: Path = Field(description="Script run on a test instance; exit 0 passes.")
    instance_type: str | None = Field(default=None, pattern=r"^[a-z0-9-]+\.[a-z0-9]+$")
    timeout_seconds: int = Field(default=900, ge=10, le=86_400)

    _check_script = field_validator("smoke_check")(_script)


class Recipe(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,39}$")
    description: str = ""
    platform: Literal["linux", "windows"] = "linux"
    backend: Literal["ec2", "packer"] = "ec2"
    base: BaseImage
    instance_type: str = Field(default="c5.large", pattern=r"^[a-z0-9-]+\.[a-z0-9]+$")
    subnet_id: str | None = Field(default=None, pattern=r"^subnet-[0-9a-f]+$")
    security_group_ids: tuple[str, ...] = ()
    iam_instance_profile: str | None = Field(
        default=None, description="Needed on AWS so the builder's SSM agent can register."
    )
    ssh_username: str = Field(default="ec2-user", description="Packer's SSH user on Linux.")
    steps: tuple[Step, ...] = Field(min_length=1)
    first_boot: FirstBoot | None = None
    tags: Mapping[str, str] = Field(default_factory=dict)
    billing: BillingModel = BillingModel.PER_SECOND
    regions: tuple[str, ...] = Field(
        min_length=1, description="Built in the first, copied to the others."
    )
    schedule: str | None = Field(
        default=DEFAULT_SCHEDULE,
        description="Cron (UTC, day-of-month AND day-of-week); null or '' for on demand only.",
    )
    retention: Retention = Retention()
    validation: Validation

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        check_cron(value)
        return value.strip()

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [r for r in value if not re.fullmatch(_REGION, r)]
        if bad:
            raise ValueError(f"not AWS regions: {', '.join(bad)}")
        if len(set(value)) != len(value):
            raise ValueError("a region is listed twice")
        return value

    @field_validator("security_group_ids")
    @classmethod
    def _groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [g for g in value if not re.fullmatch(r"sg-[0-9a-f]+", g)]
        if bad:
            raise ValueError(f"not security group ids: {', '.join(bad)}")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        reserved = [k for k in value if k.startswith(RESERVED_TAG_PREFIXES)]
        if reserved:
            raise ValueError(f"tags {', '.join(reserved)} use a reserved prefix (hpcfleet:, aws:)")
        return value

    @model_validator(mode="after")
    def _platform(self) -> Self:
        wanted = "cloud-init" if self.platform == "linux" else "ec2launch"
        if self.first_boot is not None and self.first_boot.kind != wanted:
            raise ValueError(f"a {self.platform} image takes first_boot kind {wanted!r}")
        return self

    @property
    def home_region(self) -> str:
        return self.regions[0]


class Recipes(_Model):
    recipes: Mapping[str, Recipe]

    def get(self, name: str) -> Recipe | None:
        return self.recipes.get(name)

    def names(self) -> list[str]:
        return sorted(self.recipes)


def parse_recipes(data: Any, base_dir: Path) -> Recipes:
    """Validate a decoded recipes document: ``{"recipes": {name: {...}}}``."""
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), dict):
        raise ValueError("a recipes file holds a 'recipes' table keyed by recipe name")
    named = {
        name: {**body, "name": name} if isinstance(body, dict) else body
        for name, body in data["recipes"].items()
    }
    return Recipes.model_validate({"recipes": named}, context={"base_dir": base_dir})


def load_recipes(path: Path) -> Recipes:
    """Read and validate the recipes file, or raise ConfigurationError naming each problem."""
    where = "HPCFLEET_BAKERY_RECIPES"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"invalid configuration: {where}: {path}: {exc.strerror}"
        ) from None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        return parse_recipes(data, path.parent)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {where}: {path}: {problems}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSON and TOML decode errors
        raise ConfigurationError(f"invalid configuration: {where}: {path}: {exc}") from None
