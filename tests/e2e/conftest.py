"""Fixtures of the end-to-end tests that more than one file uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from governor_daemon.daemon_process import DaemonProcess

TOKENS = {"trainer": "trainer-token-0123456789", "controller": "ctl-token-0123456789ab"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    """A daemon that wants tokens, and the folder holding one token file per role (``<role>.token``)."""
    folder = tmp_path_factory.mktemp("secured")
    tokens = folder / "tokens"
    tokens.write_text("".join(f"{role}-bot {role} {token}\n" for role, token in TOKENS.items()))
    tokens.chmod(0o600)
    for role, token in TOKENS.items():
        (folder / f"{role}.token").write_text(token + "\n")
    with DaemonProcess(folder / "data", "--tokens-file", str(tokens)) as daemon:
        yield daemon, folder
