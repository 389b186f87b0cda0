"""Shared fixtures: paths and a runner for the real `governor` CLI as a subprocess."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import structlog

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


@pytest.fixture(autouse=True)
def _process_logging_restored() -> Iterator[None]:
    """A CLI's ``main()`` run in process configures logging for the whole process (structlog, the root
    logger's handlers and level, captured warnings) onto the stderr that pytest captured for that one test and
    closes after it: every later test that logs then fails with "I/O operation on closed file" (running
    tests/unit/trainer before tests/integration did). Each test hands back the logging it started with;
    pytest's own capture handlers are pytest's to add and remove."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capturing_warnings = logging._warnings_showwarning is not None  # type: ignore[attr-defined]
    yield
    structlog.configure(**structlog_config)
    for handler in list(root.handlers):
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers and not type(handler).__module__.startswith("_pytest"):
            root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(capturing_warnings)


@pytest.fixture(autouse=True, scope="session")
def _shared_memory_of_this_session() -> Iterator[None]:
    """Trainers started by the tests (in process or as subprocesses) keep their snapshot segments in a
    directory of this session under /dev/shm (TOLARIA_SHM_DIR), never next to a real run's, and a run killed
    by a test leaves nothing behind."""
    base = Path("/dev/shm")
    if not base.is_dir() or "TOLARIA_SHM_DIR" in os.environ:
        yield
        return
    folder = Path(tempfile.mkdtemp(prefix="tolaria-tests-", dir=base))
    os.environ["TOLARIA_SHM_DIR"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("TOLARIA_SHM_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)
