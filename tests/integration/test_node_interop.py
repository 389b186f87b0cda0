"""An external controller in Node.js (@grpc/grpc-js, @grpc/proto-loader loading the .proto at run time)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.conftest import REPO
from tests.integration.conftest import warm_up

NODE_DIR = REPO / "tests" / "interop" / "node"


def node_ready() -> str | None:
    """Why the Node test cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        return "run `npm ci --prefix tests/interop/node` (make test does)"
    return None


def test_node_controller_sees_panic_state_and_rollback(tmp_path: Path) -> None:
    """GetPanicState and a rollback event over WatchEvents, from Node.js."""
    reason = node_ready()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Node.js interop test must run in CI: {reason}")
        pytest.skip(reason)
    with InProcessDaemon(tmp_path / "data") as daemon:
        client = AttachClient(daemon.address, "node-run")
        client.connect()
        step = warm_up(client)
        client.validation(step + 10, math.nan)
        command = client.next("command").command
        result = subprocess.run(
            ["node", str(NODE_DIR / "controller.js"), daemon.address, "node-run", str(REPO / "proto")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        client.close()
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["state"] == "RUN_STATE_ROLLING_BACK"
    assert seen["kind"] == "decision"
    assert seen["punishment_reward"] == -10
    assert seen["reason"] == "non-finite: validation loss nan"
    assert command.punishment_reward == -10
