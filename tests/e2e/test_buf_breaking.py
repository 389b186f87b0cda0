"""`make lint`'s `buf breaking` (tools/buf-breaking.sh) in a fresh clone: main against its previous commit,
a branch against main."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

BUF = REPO / "tools" / "buf" / "node_modules" / ".bin" / "buf"
SCRIPT = REPO / "tools" / "buf-breaking.sh"
COMMON = Path("proto/tolaria/governor/v1/common.proto")

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is not installed (make lint installs it with npm)")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT)], cwd=repo, env={**os.environ, "BUF": str(BUF)}, capture_output=True, text=True, timeout=120
    )


def commit_change(repo: Path, old: str, new: str, message: str) -> None:
    path = repo / COMMON
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", message)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh clone with main checked out, as CI has it."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", "--branch", "main", str(REPO), str(repo)], check=True, timeout=120)
    return repo


RENUMBER = ("optional uint32 min_history = 3;", "optional uint32 min_history = 99;")


def test_main_is_compared_with_its_previous_commit(clone: Path) -> None:
    assert check(clone).returncode == 0
    commit_change(clone, *RENUMBER, "renumber a field")
    result = check(clone)
    assert result.returncode != 0, result.stdout
    assert "min_history" in result.stdout + result.stderr
    # An additive change on top is compatible with its previous commit.
    commit_change(clone, RENUMBER[1], RENUMBER[1] + "\n  optional uint32 extra_field = 98;", "add a field")
    result = check(clone)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HEAD~1" in result.stdout


def test_a_branch_is_compared_with_main(clone: Path) -> None:
    git(clone, "checkout", "-q", "-b", "feature")
    commit_change(clone, *RENUMBER, "renumber a field")
    commit_change(clone, "// Detector profile", "// The detector profile", "a comment")
    result = check(clone)  # HEAD~1 would pass; main does not
    assert result.returncode != 0, result.stdout
    assert "min_history" in result.stdout + result.stderr
