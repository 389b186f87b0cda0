"""Exit codes and final summaries of the real CLIs as processes: each outcome has its own code, a refused
trainer is never "governed", an --address typo stops before training, the summary is strict JSON with the
metrics of the current timeline, and `tolaria-train` without torch names the extra to install."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from governor_daemon.daemon_process import DaemonProcess, free_port
from tests.conftest import REPO, governor_cli

DISTRIBUTION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses the bare NaN and Infinity Python's json would otherwise accept."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def train(tmp_path: Path, *args: str, timeout_s: float = 120) -> tuple[subprocess.CompletedProcess[str], Any]:
    """`tolaria-train --task synthetic ARGS` to the end; returns the process and its summary file, both parsed
    as strict JSON (the summary file and the summary line on stdout must agree)."""
    summary = tmp_path / "summary.json"
    summary.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tolaria_trainer", "--task", "synthetic", "--log-format", "json"]
    cmd += ["--summary-json", str(summary), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    report = strict_json(summary.read_text()) if summary.exists() else None
    if report is not None:
        assert strict_json(result.stdout.splitlines()[-1]) == report
    return result, report


def test_epoch_cap_has_its_own_code_and_a_nan_summary_is_strict_json(tmp_path: Path) -> None:
    """--max-epochs-total before --epochs of progress is exit 6 (it was 1, the internal-error code); the last
    validation diverged (NaN, ungoverned) and the summary says "nan" instead of a bare NaN."""
    result, summary = train(tmp_path, "--epochs", "3", "--max-epochs-total", "2", "--inject", "nan@epoch=2")
    assert result.returncode == 6, result.stderr[-3000:]
    assert (summary["status"], summary["exit_code"], summary["epochs_run"]) == ("failed", 6, 2)
    assert "--max-epochs-total 2 reached with 2/3 epochs of progress" in summary["message"]
    assert summary["final_validation_loss"] == "nan"
    assert summary["governed"] is False


def test_a_rollback_leaves_no_stale_final_metrics(secured: tuple[DaemonProcess, Path], tmp_path: Path) -> None:
    """Epoch 2 diverges (NaN) and the governor rolls it back; the cap then ends the run before another
    validation: the summary's final metrics are null, not those of the weights the restore replaced."""
    daemon, folder = secured
    args = ["--address", daemon.address, "--token-file", str(folder / "trainer.token"), "--run-id", "stale"]
    args += ["--epochs", "2", "--max-epochs-total", "2", "--inject", "nan@epoch=2", "--agree-every-steps", "5"]
    result, summary = train(tmp_path, *args)
    assert result.returncode == 6, result.stderr[-3000:]
    assert (summary["rollbacks"], summary["timeline"], summary["governed"]) == (1, 1, True)
    assert (summary["final_validation_loss"], summary["final_validation_accuracy"]) == (None, None)


def test_refused_trainer_fail_closed_exits_2_before_training(
    secured: tuple[DaemonProcess, Path], tmp_path: Path
) -> None:
    """The controller's token has the wrong role for Attach (PERMISSION_DENIED): with --fail-closed the trainer
    stops with exit 2 without training a step (it used to train on, ungoverned)."""
    daemon, folder = secured
    args = ["--address", daemon.address, "--token-file", str(folder / "controller.token"), "--fail-closed", "30"]
    result, summary = train(tmp_path, *args, "--epochs", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert (summary["status"], summary["epochs_run"], summary["governed"]) == ("refused", 0, False)
    assert "PERMISSION_DENIED" in summary["message"]


def test_refused_trainer_fail_open_trains_ungoverned_and_says_so(
    secured: tuple[DaemonProcess, Path], tmp_path: Path
) -> None:
    """A wrong token (UNAUTHENTICATED) without --fail-closed: training completes, a loud warning says it is
    ungoverned, and the summary never claims "governed": true."""
    daemon, _ = secured
    args = ["--address", daemon.address, "--token", "wrong-token-0123456789", "--epochs", "2"]
    result, summary = train(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (summary["status"], summary["epochs_completed"], summary["governed"]) == ("completed", 2, False)
    assert summary["message"].startswith("ungoverned: the governor refused the stream (UNAUTHENTICATED)")
    assert "training continues UNGOVERNED" in result.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:5oo51", "localhost", "no-such-host.invalid:50051"])
def test_governor_typo_is_a_usage_error_before_training(tmp_path: Path, address: str) -> None:
    """A typo in --address is exit 2 naming the flag, at once (it used to train ungoverned after 40 s of
    connection attempts); the error is a JSON line like the rest of the log."""
    result, summary = train(tmp_path, "--address", address, "--epochs", "1", timeout_s=60)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.splitlines()
    assert strict_json(line)["event"].startswith(f"--address {address!r}: ")
    assert summary is None, "nothing trained"
    assert "Traceback" not in result.stderr


def test_tolaria_train_without_torch_names_the_extra() -> None:
    """torch made unimportable: exit 2 naming the trainer extra, no traceback."""
    code = "import sys; sys.modules['torch'] = None; from tolaria_trainer.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "--task", "synthetic"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert f"pip install '{DISTRIBUTION}[trainer]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_of_an_unreachable_governor_exits_4() -> None:
    """`governor health` against nothing is exit 4 (unreachable), as the control commands say it, not 1."""
    result = governor_cli(["health", "--address", f"127.0.0.1:{free_port()}", "--timeout-s", "2"])
    assert result.returncode == 4, result.stderr
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
