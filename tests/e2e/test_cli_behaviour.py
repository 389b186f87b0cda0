"""The `governor` CLI in pipes and scripts: `| head`, JSON errors, int64 as numbers, watch's deadline,
per-class accuracy and the LR after a restore in `status` and `audit show`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.testing import AttachClient
from tests.conftest import REPO, governor_cli
from tests.integration.conftest import warm_up

PER_CLASS = [0.99, 0.5, 0.875]


def piped_into_head(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`governor ARGS | head -1` through bash; PIPESTATUS gives governor's own exit code."""
    command = " ".join([sys.executable, "-m", "governor_daemon", *args])
    script = f'{command} | head -1; echo "governor-exit=${{PIPESTATUS[0]}}" >&2'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """A daemon's journal with a rollback answered with its LR, validations with per-class accuracy, and
    enough entries that `audit show` outgrows a pipe's buffer; plus what `status` said while it ran."""
    data = tmp_path_factory.mktemp("cli") / "data"
    with DaemonProcess(data) as daemon:
        client = AttachClient(daemon.address, "pipe-run", num_classes=3)
        client.connect()
        step = warm_up(client)
        client.validation(step + 10, math.nan, epoch=99)
        client.result(client.next("command").command, lr_after_restore=0.00025)
        for i in range(400):
            step += 10
            client.validation(step, 0.5, epoch=100 + i, accuracy=0.788, per_class_accuracy=PER_CLASS)
        client.wait_ack(client.seq)
        address = ["--address", daemon.address]
        seen = {
            "text": governor_cli(["status", "pipe-run", *address]),
            "json": governor_cli(["status", "pipe-run", *address, "--json"]),
            "missing": governor_cli(["status", "no-such-run", *address, "--json"]),
            "watch": _timed(["watch", *address, "--from", "999999", "--timeout-s", "1", "--limit", "0"]),
        }
        client.close()
    return data, seen


def _timed(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = governor_cli(args, timeout_s=30)
    return result, time.monotonic() - started


def test_audit_show_into_head_exits_cleanly(journal: tuple[Path, dict[str, object]]) -> None:
    data, _ = journal
    for extra in ([], ["--json"]):
        result = piped_into_head(["audit", "show", "--data-dir", str(data), *extra])
        assert "governor-exit=0" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert "BrokenPipe" not in result.stderr
        assert len(result.stdout.splitlines()) == 1


def test_replay_into_head_exits_cleanly(tmp_path: Path) -> None:
    trace = tmp_path / "long.jsonl"
    trace.write_text("".join(json.dumps({"epoch": i, "step": i, "loss": 1.0}) + "\n" for i in range(1, 20001)))
    for extra in ([], ["--json"]):
        result = piped_into_head(["replay", str(trace), *extra])
        assert "governor-exit=0" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert "BrokenPipe" not in result.stderr


def test_status_shows_per_class_accuracy_and_the_lr_after_restore(journal: tuple[Path, dict[str, object]]) -> None:
    _, seen = journal
    text = seen["text"]
    assert isinstance(text, subprocess.CompletedProcess)
    assert text.returncode == 0, text.stderr
    assert "acc 0.788, per-class 0:0.99 1:0.5 2:0.875" in text.stdout
    assert "last command result, rank 0: command 1 (rollback) succeeded" in text.stdout
    assert "lr now 0.00025" in text.stdout


def test_json_int64_fields_are_numbers(journal: tuple[Path, dict[str, object]]) -> None:
    _, seen = journal
    result = seen["json"]
    assert isinstance(result, subprocess.CompletedProcess)
    status = json.loads(result.stdout)
    assert status["timeline"] == 1  # uint64: MessageToDict alone writes "1"
    assert isinstance(status["latest_validation_step"], int)
    assert isinstance(status["last_cursor"], int)
    assert all(isinstance(r["latest_step"], int) for r in status["ranks"])
    assert status["latest_validation"]["per_class_accuracy"] == PER_CLASS
    assert status["latest_command_result"]["lr_after_restore"] == 0.00025


def test_json_errors_are_json(journal: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    _, seen = journal
    missing = seen["missing"]
    assert isinstance(missing, subprocess.CompletedProcess)
    assert (missing.returncode, missing.stdout) == (2, "")
    error = json.loads(missing.stderr)
    assert (error["code"], error["exit_code"]) == ("NOT_FOUND", 2)
    assert "no-such-run" in error["error"]
    for args, code, exit_code in (
        (["runs", "--address", "127.0.0.1:1", "--timeout-s", "2"], "UNAVAILABLE", 4),
        (["replay", str(tmp_path / "missing.jsonl")], "USAGE", 2),
        (["replay", str(REPO / "examples/traces/spike-and-nan.jsonl"), "--policy", "colour=red"], "USAGE", 2),
        (["audit", "show", "--data-dir", str(tmp_path / "none")], "USAGE", 2),
        (["audit", "verify", "--data-dir", str(tmp_path / "none")], None, None),
    ):
        result = governor_cli([*args, "--json"])
        if code is None:  # verify reports its verdict as data on stdout
            assert json.loads(result.stdout)["ok"] is False
            continue
        assert result.returncode == exit_code, result.stderr
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        obj = json.loads(line)
        assert (obj["code"], obj["exit_code"]) == (code, exit_code)
        assert obj["error"]


def test_watch_honours_timeout(journal: tuple[Path, dict[str, object]]) -> None:
    """--timeout-s 1 --limit 0 on an idle daemon ends after about a second with exit 0."""
    _, seen = journal
    result, elapsed = seen["watch"]  # type: ignore[misc]
    assert result.returncode == 0, result.stderr
    assert elapsed < 15
    assert "--timeout-s 1 reached after 0 event(s)" in result.stderr


def test_audit_show_shows_per_class_accuracy_and_lr(journal: tuple[Path, dict[str, object]]) -> None:
    data, _ = journal
    shown = governor_cli(["audit", "show", "--data-dir", str(data), "--kind", "decision", "--kind", "command_result"])
    assert shown.returncode == 0, shown.stderr
    assert "[acc 0.788, per-class 0:0.99 1:0.5 2:0.875]" in shown.stdout
    assert "restored step" in shown.stdout
    assert "; lr now 0.00025" in shown.stdout
