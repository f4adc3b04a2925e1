"""The pure decisions: is a build due, which images to retire, what version comes next, and the
Packer template they render (checked by `packer validate`)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bakery_kit import write_recipe_tree
from hypothesis import given
from hypothesis import strategies as st

from services.bakery.packer import artifact_from_manifest, render_template
from services.bakery.pipeline import BuildContext, BuildFailed, with_environment
from services.bakery.recipes import Retention, load_recipes
from services.bakery.retention import (
    ImageRecord,
    ImageStatus,
    RetentionPlan,
    deregistration_candidates,
    plan_retention,
)
from services.bakery.runner import version_for
from services.bakery.schedule import DEFAULT_SCHEDULE, due_slot, next_slot


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (utc(2026, 1, 1), utc(2026, 1, 14, 4)),  # month starts on a Thursday: Tuesdays 6, 13
        (utc(2026, 1, 14, 4), utc(2026, 2, 11, 4)),  # starts on a Sunday: Tuesdays 3, 10
        (utc(2026, 3, 11, 4), utc(2026, 4, 15, 4)),  # starts on a Wednesday: Tuesdays 7, 14
        (utc(2026, 8, 31), utc(2026, 9, 9, 4)),  # starts on a Tuesday: Tuesdays 1, 8
    ],
)
def test_default_schedule_is_the_day_after_patch_tuesday(
    after: datetime, expected: datetime
) -> None:
    assert next_slot(DEFAULT_SCHEDULE, after) == expected


@given(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1)))
def test_every_default_slot_follows_a_second_tuesday(after: datetime) -> None:
    slot = next_slot(DEFAULT_SCHEDULE, after.replace(tzinfo=UTC))
    tuesday = slot - timedelta(days=1)
    assert tuesday.weekday() == 1 and 8 <= tuesday.day <= 14


@pytest.mark.parametrize(
    ("anchor", "now", "due"),
    [
        (utc(2026, 2, 1, 12), utc(2026, 2, 11, 3, 59), None),  # not yet
        (utc(2026, 2, 1, 12), utc(2026, 2, 11, 4), utc(2026, 2, 11, 4)),  # on the minute
        (utc(2026, 2, 11, 4), utc(2026, 2, 20), None),  # that slot was handled
        (utc(2026, 1, 1), utc(2026, 4, 1), utc(2026, 3, 11, 4)),  # down 3 months: one build
    ],
)
def test_due_slot(anchor: datetime, now: datetime, due: datetime | None) -> None:
    assert due_slot(DEFAULT_SCHEDULE, anchor, now) == due


def image(
    version: str, age_days: float, status: ImageStatus = ImageStatus.AVAILABLE
) -> ImageRecord:
    return ImageRecord(
        f"ami-{version.replace('.', '')}",
        "us-east-1",
        version,
        utc(2026, 6, 1) - timedelta(days=age_days),
        status,
    )


NOW = utc(2026, 6, 1)
POLICY = Retention(keep_last=2, deprecate_after_days=30, deregister_after_days=90)


@pytest.mark.parametrize(
    ("images", "in_use", "deprecate", "deregister", "blocked"),
    [
        ([image("1", 200), image("2", 100)], {}, [], [], {}),  # the newest 2 are kept, however old
        ([image("1", 40), image("2", 20), image("3", 1)], {}, ["1"], [], {}),
        ([image("1", 20), image("2", 10), image("3", 1)], {}, [], [], {}),  # too young
        ([image("1", 95), image("2", 20), image("3", 1)], {}, ["1"], ["1"], {}),
        (
            [image("1", 95, ImageStatus.DEPRECATED), image("2", 20), image("3", 1)],
            {"ami-1": ("i-1",)},
            [],
            [],
            {"ami-1": ("i-1",)},
        ),
        (
            [image("1", 400, ImageStatus.DEREGISTERED), image("2", 20), image("3", 1)],
            {},
            [],
            [],
            {},
        ),
    ],
)
def test_plan_retention(
    images: list[ImageRecord],
    in_use: dict[str, tuple[str, ...]],
    deprecate: list[str],
    deregister: list[str],
    blocked: dict[str, tuple[str, ...]],
) -> None:
    plan = plan_retention(images, POLICY, NOW, in_use)
    assert [i.version for i in plan.deprecate] == deprecate
    assert [i.version for i in plan.deregister] == deregister
    assert dict(plan.blocked) == blocked


@given(
    st.lists(st.tuples(st.integers(0, 400), st.sampled_from(list(ImageStatus))), max_size=12),
    st.integers(1, 4),
    st.sets(st.integers(0, 11)),
)
def test_retention_never_touches_the_newest_or_a_used_image(
    ages: list[tuple[int, ImageStatus]], keep: int, used: set[int]
) -> None:
    images = [image(f"{n}", age, status) for n, (age, status) in enumerate(ages)]
    policy = Retention(keep_last=keep, deprecate_after_days=10, deregister_after_days=60)
    in_use = {
        i.image_id: ("i-x",)
        for n, i in enumerate(images)
        if n in used and i in deregistration_candidates(images, policy, NOW)
    }
    plan: RetentionPlan = plan_retention(images, policy, NOW, in_use)
    live = sorted(
        (i for i in images if i.status is not ImageStatus.DEREGISTERED),
        key=lambda i: i.built_at,
        reverse=True,
    )
    newest = {i.version for i in live[:keep]}
    touched = [*plan.deprecate, *plan.deregister]
    assert not any(i.version in newest for i in touched)
    assert not any(i.image_id in in_use for i in plan.deregister)
    assert all(i.status is ImageStatus.AVAILABLE for i in plan.deprecate)


def test_versions_count_builds_within_the_month() -> None:
    assert version_for(utc(2026, 2, 11, 4), 0) == "2026.02.1"
    assert version_for(utc(2026, 12, 31), 9) == "2026.12.10"


def test_environment_is_quoted_for_each_shell() -> None:
    assert with_environment("linux", {"A": "it's"}, "run") == "export A='it'\"'\"'s'\nrun"
    assert with_environment("windows", {"A": "it's"}, "run") == "$env:A = 'it''s'\nrun"


class _NoProgress:
    async def start_step(self, name: str) -> int:
        return 0

    async def finish_step(self, seq: int, status: str, detail: str | None = None) -> None:
        pass

    async def log(self, text: str) -> None:
        pass

    async def note(self, **fields: object) -> None:
        pass


@pytest.mark.parametrize("communicator", ["ssh", "none"])
def test_the_rendered_template_is_valid_for_packer(tmp_path: Path, communicator: str) -> None:
    recipe = load_recipes(write_recipe_tree(tmp_path, tags={"team": 'a "quoted" ${x}'})).recipes[
        "linux"
    ]
    ctx = BuildContext(
        build_id="b-1",
        attempt=1,
        recipe=recipe,
        version="2026.02.1",
        base_image="ami-0123456789abcdef0",
        image_name="hpcfleet-linux-2026.02.1",
        image_tags={"hpcfleet:version": "2026.02.1", "team": recipe.tags["team"]},
        progress=_NoProgress(),
    )
    scripts = [(s.name, s.script, s.timeout_seconds) for s in recipe.steps]
    template = tmp_path / "bakery.pkr.hcl"
    template.write_text(
        render_template(
            ctx,
            scripts,
            communicator=communicator,
            endpoint_url=None,
            rehearsal_root=tmp_path / "root",
        )
    )
    checked = subprocess.run(
        ["packer", "validate", "-syntax-only", template.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CHECKPOINT_DISABLE": "1"},
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = template.read_text()
    assert '"team" = "a \\"quoted\\" $${x}"' in text
    assert ('provisioner "shell-local"' in text) == (communicator == "none")


def test_manifest_gives_the_last_runs_image(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        '{"builds": [{"artifact_id": "us-east-1:ami-old", "packer_run_uuid": "r1"},'
        ' {"artifact_id": "eu-west-1:ami-eu,us-east-1:ami-new", "packer_run_uuid": "r2"}],'
        ' "last_run_uuid": "r2"}'
    )
    assert artifact_from_manifest(manifest, "us-east-1") == "ami-new"
    with pytest.raises(BuildFailed, match="names no image in ap-south-1"):
        artifact_from_manifest(manifest, "ap-south-1")
    with pytest.raises(BuildFailed, match="no readable manifest"):
        artifact_from_manifest(tmp_path / "absent.json", "us-east-1")
