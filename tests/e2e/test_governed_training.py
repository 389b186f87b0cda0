"""Governed training end to end: a real `governor serve` process and `tolaria-train` subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from tests.conftest import governor_cli
from tolaria.controller import CommandIssued, CommandType, ControllerClient

pytestmark = pytest.mark.slow


def trainer_cmd(address: str | None, summary: Path, *args: str, run_id: str) -> list[str]:
    """The tolaria-train command line of these tests (digits, JSON logs, a summary file)."""
    cmd = [
        sys.executable,
        "-m",
        "tolaria_trainer",
        "--task",
        "digits",
        "--run-id",
        run_id,
        "--summary-json",
        str(summary),
        "--log-format",
        "json",
        *args,
    ]
    return [*cmd, "--address", address] if address else cmd


def train(
    address: str | None,
    tmp_path: Path,
    *args: str,
    run_id: str = "run",
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run tolaria-train to the end; returns the process and its summary."""
    summary = tmp_path / f"{run_id}-summary.json"
    cmd = trainer_cmd(address, summary, *args, run_id=run_id)
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    data = json.loads(summary.read_text()) if summary.exists() else {}
    return result, data


def entries(data_dir: Path, run: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    """Journal entries (as dicts) of a run and kind."""
    out = []
    for path in list_segments(data_dir):
        for item in read_segment(path):
            if isinstance(item, LocatedEntry):
                e = item.entry
                if (run is None or e.run == run) and (kind is None or e.kind == kind):
                    out.append({"seq": e.seq, "kind": e.kind, "run": e.run, **e.payload})
    return out


def rollback_decisions(data_dir: Path, run: str) -> list[dict[str, Any]]:
    """Decisions (validation or train-step) that sent a ROLLBACK or HALT."""
    found = []
    for e in entries(data_dir, run):
        decision = e.get("decision")
        if decision and decision.get("command"):
            found.append(decision)
    return found


@pytest.fixture
def daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path / "data")
    yield d
    if d.proc.poll() is None:
        d.terminate()


def test_nan_rolls_back_once_and_completes(daemon: DaemonProcess, tmp_path: Path) -> None:
    """nan@epoch=12: PANIC, ROLLBACK and its CommandResult in the journal; timeline 1; >= 90 %; COMPLETED."""
    result, summary = train(daemon.address, tmp_path, "--inject", "nan@epoch=12", run_id="nan12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["status"] == "completed"
    assert (summary["rollbacks"], summary["timeline"]) == (1, 1)
    assert summary["final_validation_accuracy"] >= 0.90
    daemon.terminate()
    decisions = rollback_decisions(tmp_path / "data", "nan12")
    assert len(decisions) == 1
    assert decisions[0]["verdict"] == "panic"
    assert decisions[0]["command"]["kind"] == "rollback"
    assert decisions[0]["command"]["punishment_reward"] == -10.0
    results = entries(tmp_path / "data", "nan12", "command_result")
    assert [(r["succeeded"], r["new_timeline"]) for r in results] == [(True, 1)]
    assert 0 < results[0]["lr_after_restore"] <= 1e-3  # the trainer reports the LR it continues with
    (finish,) = entries(tmp_path / "data", "nan12", "finish")
    assert finish["status"] == "FINISH_STATUS_COMPLETED"


def test_no_injection_no_rollback(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A healthy run gets no rollback, and its LKG advances with the epochs up to the one before the last
    (a snapshot is published once its verdict and the train stream vouch for it: the last epoch's has no
    train steps after it to vouch for it).

    A snapshot waits for its verdict while the next epochs train; at most two wait at once, so when
    verdicts lag by more than two epochs (a digits epoch here is about 60 ms, and the trainer's torch
    threads share the 2 cores with the daemon) an older staged snapshot gives way to a newer one. So the
    count is not exactly one per epoch; the order, the end and every verdict are."""
    result, summary = train(daemon.address, tmp_path, run_id="clean")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (summary["rollbacks"], summary["timeline"]) == (0, 0)
    daemon.terminate()
    assert rollback_decisions(tmp_path / "data", "clean") == []
    snapshots = [s["step"] for s in entries(tmp_path / "data", "clean", "snapshot")]
    decisions = entries(tmp_path / "data", "clean", "decision")
    assert len(decisions) == 15
    assert all(d["decision"]["verdict"] == "healthy" for d in decisions)
    assert snapshots == sorted(set(snapshots)), "the LKG only moves forward"
    assert snapshots[0] == 0, "the initial LKG"
    assert snapshots[-1] == decisions[-2]["decision"]["step"], "the last epoch but one's snapshot is published"
    assert len(snapshots) >= 1 + 15 // 2


def test_lobotomy_is_caught(daemon: DaemonProcess, tmp_path: Path) -> None:
    """lobotomy@epoch=14 (outputs collapse to uniform): the train stream catches it within steps (the loss
    jumps from about 0.05 to the random-guess 2.3: a spike, then a collapse), one ROLLBACK with its onset."""
    result, summary = train(daemon.address, tmp_path, "--inject", "lobotomy@epoch=14", run_id="lobo")
    assert result.returncode == 0, result.stderr[-3000:]
    daemon.terminate()
    decisions = rollback_decisions(tmp_path / "data", "lobo")
    assert [d["rule"] for d in decisions] in (["step_loss_spike"], ["step_collapse"]), decisions
    (decision,) = decisions
    assert decision["onset_step"] is not None
    assert 0 <= decision["step"] - decision["onset_step"] <= 10, "caught within steps of the onset"
    assert summary["final_validation_accuracy"] >= 0.90


def test_spike_is_caught_with_lower_absolute_gate(daemon: DaemonProcess, tmp_path: Path) -> None:
    """spike@epoch=13:x50:epochs=2 is two divergences: a ROLLBACK (digits' loss x50 stays below the seed
    profile's absolute gate of 10, so this run asks for absolute_threshold=1)."""
    result, _ = train(
        daemon.address,
        tmp_path,
        "--inject",
        "spike@epoch=13:x50:epochs=2",
        "--policy",
        "absolute_threshold=1",
        run_id="spike",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    daemon.terminate()
    decisions = rollback_decisions(tmp_path / "data", "spike")
    assert [(d["rule"], d["command"]["kind"]) for d in decisions] == [("divergence", "rollback")]
    assert "2/2 consecutive" in decisions[0]["reason"]


def test_nan_in_first_epoch_rolls_back_to_initial_lkg(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A NaN from the first epoch restores the initial LKG (step 0)."""
    result, summary = train(daemon.address, tmp_path, "--inject", "nan@epoch=1", "--epochs", "5", run_id="first")
    assert result.returncode == 0, result.stderr[-3000:]
    daemon.terminate()
    results = entries(tmp_path / "data", "first", "command_result")
    assert [(r["succeeded"], r["restored_step"]) for r in results] == [(True, 0)]
    assert summary["epochs_completed"] == 5


def test_repeated_nan_halts_then_resume_continues(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Four NaNs in the window: the fourth is a HALT; `governor resume` lets the run finish.

    Each fault waits for the previous rollback (``:timeline=T``): a fault on a timeline that an open rollback
    is already leaving is undone by that rollback and is rightly not a rollback of its own, so faults at
    fixed epochs made the count depend on the governor's latency (it failed 1 in 6 under load)."""
    summary_path = tmp_path / "halt-summary.json"
    faults = ((6, 0), (9, 1), (12, 2), (15, 3))
    injections = [arg for epoch, tl in faults for arg in ("--inject", f"nan@epoch={epoch}:timeline={tl}")]
    policy = ["--policy", "rollback_window=20"]
    cmd = trainer_cmd(
        daemon.address, summary_path, "--halt-wait-s", "120", "--epochs", "18", *policy, *injections, run_id="halty"
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait for the HALT as an event (it failed under load against a 180 s wall-clock deadline): the journal's
    # HALT command, or the trainer's end, which closes the stream.
    with ControllerClient(daemon.address) as client, client.events(runs=["halty"], kinds=["command"]) as stream:
        threading.Thread(target=lambda: (proc.wait(), stream.close()), daemon=True).start()
        halt = next((e for e in stream if isinstance(e, CommandIssued) and e.command.type is CommandType.HALT), None)
    assert halt is not None, f"the trainer ended before its HALT: {proc.communicate()[1][-3000:]}"
    resumed = governor_cli(["resume", "halty", "--address", daemon.address, "--reason", "checked"])
    assert resumed.returncode == 0, resumed.stderr
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed"
    assert (summary["rollbacks"], summary["timeline"]) == (3, 4)  # the RESUME restores too, but is no rollback
    daemon.terminate()
    kinds = [d["command"]["kind"] for d in rollback_decisions(tmp_path / "data", "halty")]
    assert kinds == ["rollback", "rollback", "rollback", "halt"]


def test_halt_wait_zero_exits_3(daemon: DaemonProcess, tmp_path: Path) -> None:
    """With --halt-wait-s 0 a HALT ends the trainer with exit 3 and Finish(HALTED)."""
    args = ["--halt-wait-s", "0", "--policy", "max_rollbacks=0", "--inject", "nan@epoch=3", "--epochs", "6"]
    result, summary = train(daemon.address, tmp_path, *args, run_id="halt0")
    assert result.returncode == 3, result.stderr[-3000:]
    assert summary["status"] == "halted"
    daemon.terminate()
    (finish,) = entries(tmp_path / "data", "halt0", "finish")
    assert finish["status"] == "FINISH_STATUS_HALTED"


def test_daemon_killed_mid_run_training_continues(tmp_path: Path) -> None:
    """SIGKILL the daemon mid-run: training goes on (fail-open); after a restart the trainer reattaches,
    resends, and nothing is counted twice."""
    daemon = DaemonProcess(tmp_path / "data")
    port = daemon.port
    summary_path = tmp_path / "killed-summary.json"
    proc = subprocess.Popen(
        trainer_cmd(daemon.address, summary_path, "--epochs", "30", run_id="killed"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until training is under way
        if '"epoch": 3' in line:
            break
    daemon.kill()
    time.sleep(1.5)
    restarted = DaemonProcess(tmp_path / "data", "--listen", f"127.0.0.1:{port}")
    output = proc.communicate()[0]  # no deadline: 30 epochs took 373 s on a loaded machine
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["epochs_completed"] == 30
    # governed, every record judged once the daemon was back, and the gap said (hardening 2, defect 4)
    assert (summary["governed"], summary["never_judged_records"]) == (True, 0)
    assert summary["seconds_without_governor"] >= 1.5
    assert summary["message"].startswith(
        f"partly governed: 0 record(s) never judged by the governor at {daemon.address}"
    )
    assert summary["message"].endswith("its stream lost 1 time(s)")
    status = json.loads(governor_cli(["status", "killed", "--address", restarted.address, "--json"]).stdout)
    rank = status["ranks"][0]
    steps_per_epoch = 45
    assert int(rank["num_records"]) == 30 * steps_per_epoch + 30, "every train and validation record exactly once"
    assert int(rank.get("num_record_gaps", 0)) == 0
    assert int(rank["generation"]) >= 2
    restarted.terminate()
    assert "attached to governor" in output


def test_fail_closed_exits_4(tmp_path: Path) -> None:
    """--fail-closed with a short deadline exits 4 when no governor answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, summary = train(f"127.0.0.1:{port}", tmp_path, "--fail-closed", "1", "--epochs", "3", run_id="closed")
    assert result.returncode == 4, result.stderr[-3000:]
    assert summary["status"] == "unreachable"


def test_two_ranks_roll_back_together(daemon: DaemonProcess, tmp_path: Path) -> None:
    """torchrun with two ranks (gloo), NaN on rank 1 only: both roll back at the same step, same weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={master_port}",
        "-m",
        "tolaria_trainer",
        "--task",
        "digits",
        "--epochs",
        "8",
        "--run-id",
        "duo",
        "--address",
        daemon.address,
        "--inject",
        "nan@epoch=5:rank=1",
        "--summary-json",
        str(tmp_path / "duo-{rank}.json"),
        "--log-format",
        "json",
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    s0 = json.loads((tmp_path / "duo-0.json").read_text())
    s1 = json.loads((tmp_path / "duo-1.json").read_text())
    assert (s0["rollbacks"], s0["timeline"]) == (s1["rollbacks"], s1["timeline"]) == (1, 1)
    assert s0["weights_sha256"] == s1["weights_sha256"]
    daemon.terminate()
    results = entries(tmp_path / "data", "duo", "command_result")
    assert len(results) == 2
    assert {r["rank"] for r in results} == {0, 1}
    assert len({r["command_id"] for r in results}) == 1
    assert len({r["restored_step"] for r in results}) == 1


def test_an_lr_blowup_is_rolled_back_to_its_pre_fault_lr_and_the_run_completes(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """Review finding (lr-blowup@step=300:x1000, fired once): the train loss fell towards 0 as the weights
    went chaotic, no train rule fired, the next validation looked healthy and published a snapshot holding
    lr = 1, and three ROLLBACKs restored it, replaying the fault until the loop breaker halted the run (exit
    3). Now the learning-rate jump is caught at its step, no snapshot after it is published, and every
    restore comes back with the learning rate the run had before the fault."""
    result, summary = train(
        daemon.address, tmp_path, "--epochs", "12", "--inject", "lr-blowup@step=300:x1000", run_id="lr1000"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["status"] == "completed"
    assert summary["rollbacks"] >= 1
    assert summary["final_validation_accuracy"] >= 0.90
    daemon.terminate()
    decisions = rollback_decisions(tmp_path / "data", "lr1000")
    assert decisions[0]["rule"] == "step_lr_jump", decisions[0]["reason"]
    assert decisions[0]["onset_step"] in (300, 301), "the first step trained with the blown-up LR"
    results = entries(tmp_path / "data", "lr1000", "command_result")
    assert results, "the rollback was executed"
    assert all(r["lr_after_restore"] == 1e-3 for r in results), [r["lr_after_restore"] for r in results]
    assert all(r["restored_step"] < 300 for r in results)
    snapshots = [s["step"] for s in entries(tmp_path / "data", "lr1000", "snapshot")]
    restores = [e["seq"] for e in entries(tmp_path / "data", "lr1000", "command_result")]
    published_before = [s["step"] for s in entries(tmp_path / "data", "lr1000", "snapshot") if s["seq"] < min(restores)]
    assert all(step < 300 for step in published_before), f"a snapshot after the fault was published: {snapshots}"
