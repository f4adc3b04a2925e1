"""No long-term AWS key anywhere: not in a file of the repository, not in its history, not in a
setting. AWS access exists only as temporary STS credentials that auth obtains with SAML.

Long-term access key ids start with AKIA (temporary ones with ASIA, which are never stored either
but expire on their own). A secret access key is 40 base64 characters; it is caught where it sits
next to its name (`aws_secret_access_key = ...`, `"SecretAccessKey": "..."`), which is how every
credentials file, environment file and SDK call spells it. moto's placeholder "testing" is no key.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])")
SECRET_KEY = re.compile(
    r"(?i)(?:aws_?secret_?access_?key|secret_?access_?key|aws_?secret_?key)"
    r"[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)
MAX_BYTES = 5 * 1024 * 1024


def findings(text: str) -> list[str]:
    """What looks like a long-term key in `text`, shortened so the report leaks nothing itself."""
    found = [m.group(0)[:8] + "…" for m in ACCESS_KEY_ID.finditer(text)]
    found += [m.group(0)[:24] + "…" for m in SECRET_KEY.finditer(text)]
    return found


def git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, errors="replace", check=True
    )
    return result.stdout


def repository_files() -> list[Path]:
    """Tracked files plus new ones not ignored: what a commit could carry."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    return [ROOT / name for name in names if name]


def test_the_detector_finds_keys_in_every_usual_spelling() -> None:
    key_id = "AKIA" + "QX7Z" * 4  # built here, so this file holds no key
    secret = "wJalrXUtnFEMI/K7MDENG+" + "b" * 18
    for text in (
        f"aws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n",
        f'{{"AccessKeyId": "{key_id}", "SecretAccessKey": "{secret}"}}',
        f"AWS_ACCESS_KEY_ID={key_id} AWS_SECRET_ACCESS_KEY='{secret}'",
        f'boto3.client("ec2", aws_access_key_id="{key_id}", aws_secret_access_key="{secret}")',
    ):
        assert len(findings(text)) == 2, text
    for harmless in (
        'aws_secret_access_key="testing"',
        "aws_secret_access_key=credentials.secret_access_key",
        'SecretAccessKey": raw["SecretAccessKey"]',
        "ASIA" + "QX7Z" * 4,  # temporary credentials: not long-term
        "XAKIA" + "QX7Z" * 4,
    ):
        assert findings(harmless) == [], harmless


def test_no_file_in_the_repository_holds_a_long_term_key() -> None:
    files = repository_files()
    assert any(f.name == "pyproject.toml" for f in files)
    problems: dict[str, list[str]] = {}
    for path in files:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (the gzipped traces)
            continue
        found = findings(data.decode("utf-8", "replace"))
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert problems == {}


def test_no_commit_ever_added_a_long_term_key() -> None:
    try:
        history = git("log", "--all", "-p", "--no-color", "--no-ext-diff", "--format=%H")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot read the git history: {exc}")
    added = "\n".join(line for line in history.splitlines() if line.startswith("+"))
    assert findings(added) == []


def test_no_setting_takes_an_access_key() -> None:
    """Configuration names references to secrets, and none of them is an AWS key."""
    from services.auth.settings import AuthSettings
    from shared.settings import Settings

    for settings in (Settings, AuthSettings):
        names = [name for name in settings.model_fields if "access_key" in name]
        assert names == [], f"{settings.__name__} takes {names}"
