"""Shared fixtures: paths and a runner for the real `governor` CLI as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def governor_cli(
    args: Sequence[str], env: dict[str, str] | None = None, timeout_s: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m governor_daemon.cli.main ARGS` (the console script's code) and capture output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "governor_daemon", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout_s,
        cwd=cwd,
        check=False,
    )


def openssl(folder: Path, *args: str) -> str:
    """Run ``openssl ARGS`` in ``folder`` and return its stdout. Where openssl is missing the test is
    skipped, except in CI, where the certificate tests must run."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is needed for the TLS tests")
        pytest.skip("openssl not installed")
    return subprocess.run(["openssl", *args], check=True, capture_output=True, text=True, cwd=folder).stdout


@pytest.fixture
def governor() -> Callable[..., subprocess.CompletedProcess[str]]:
    """The CLI runner, as a fixture."""
    return governor_cli


@pytest.fixture
def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """Environment in which `import torch` fails (a shadowing package that raises ImportError)."""
    shadow = tmp_path / "no_torch"
    (shadow / "torch").mkdir(parents=True)
    (shadow / "torch" / "__init__.py").write_text("raise ImportError('torch is made unimportable by the test')\n")
    path = os.pathsep.join(p for p in [str(shadow), os.environ.get("PYTHONPATH", "")] if p)
    return {"PYTHONPATH": path}
