"""Every template in deploy/cloudformation/ passes cfn-lint with no error, warning or note."""

from __future__ import annotations

from pathlib import Path

import pytest
from cfn_support import NAMES, TEMPLATES
from cfnlint.api import lint_file


def test_the_templates_are_the_ones_tested() -> None:
    """A new template must be added to NAMES, so that it is deployed into moto too."""
    assert sorted(p.stem for p in TEMPLATES.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.yaml")), ids=lambda p: p.stem)
def test_cfn_lint_is_clean(path: Path) -> None:
    matches = lint_file(path)
    assert not matches, "\n".join(f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches)
