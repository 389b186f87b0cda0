"""`DaemonProcess` (its own module, a context manager) and the demo's daemon, run as users run it."""

from __future__ import annotations

import ast
import urllib.request
from pathlib import Path

import grpc
import pytest

import governor_daemon.testing
from governor_daemon.daemon_process import DaemonProcess, free_port
from tests.conftest import REPO, governor_cli


def test_context_manager_stops_the_daemon(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "data") as daemon:
        assert governor_cli(["runs", "--address", daemon.address]).returncode == 0
        assert "--tick-interval-s" in daemon.args  # the test settings by default
    assert daemon.proc.returncode == 0  # SIGTERM at the end of the block: a clean stop


def test_context_manager_stops_the_daemon_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="inside the block"), DaemonProcess(tmp_path / "data") as daemon:
        raise RuntimeError("inside the block")
    assert daemon.proc.returncode == 0


def test_user_settings_serve_metrics_with_the_default_tick(tmp_path: Path) -> None:
    """tick_interval_s=None and a metrics address: `governor serve` with its own defaults, as the demo runs it."""
    metrics = f"127.0.0.1:{free_port()}"
    with DaemonProcess(tmp_path / "data", tick_interval_s=None, metrics_listen=metrics) as daemon:
        assert "--tick-interval-s" not in daemon.args
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
            assert b"governor_verdicts_total" in response.read()
        with grpc.insecure_channel(daemon.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)


def test_daemon_process_left_the_testing_module() -> None:
    assert not hasattr(governor_daemon.testing, "DaemonProcess")


def test_demo_runs_the_daemon_with_user_settings() -> None:
    """examples/demo.py builds its DaemonProcess with the daemon's default tick and metrics served."""
    tree = ast.parse((REPO / "examples" / "demo.py").read_text())
    imports = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "governor_daemon.testing" not in imports
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "DaemonProcess"
    ]
    assert len(calls) == 1
    keywords = {k.arg: k.value for k in calls[0].keywords}
    assert isinstance(keywords["tick_interval_s"], ast.Constant)
    assert keywords["tick_interval_s"].value is None
    assert not (isinstance(keywords["metrics_listen"], ast.Constant) and keywords["metrics_listen"].value == "off")
