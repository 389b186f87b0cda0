"""`governor audit export`: a run's journal as a trace `governor replay` reads, and what it could not keep."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.testing import AttachClient
from tests.conftest import governor_cli

HEALTHY = [2.3 * 0.8**i + 0.1 for i in range(12)]


def _train_losses(first: int, n: int) -> list[float]:
    """Noisy, slowly falling train losses (values with full float64 precision, to check exactness)."""
    return [1.0 / math.sqrt(s) + 0.013 * math.sin(s * 1.7) for s in range(first, first + n)]


def _journal(data: Path, *daemon_args: str) -> dict[str, Any]:
    """A run through a real daemon: 4 epochs of 48 train records (steps 1..192), each with a healthy
    validation; a NaN train record at step 194 (a ROLLBACK); the restore, 10 more train records and a
    validation on timeline 1. Returns what was sent before the NaN."""
    daemon = DaemonProcess(data, *daemon_args)
    client = AttachClient(daemon.address, "exp-run")
    client.connect()
    sent: dict[str, Any] = {"steps": [], "losses": [], "grads": []}
    step = 0
    for epoch, loss in enumerate(HEALTHY[:4], start=1):
        steps = list(range(step + 1, step + 49))
        losses, grads = _train_losses(step + 1, 48), [0.5 + 0.001 * s for s in steps]
        client.vitals(steps, losses, grads)
        sent["steps"] += steps
        sent["losses"] += losses
        sent["grads"] += grads
        step = steps[-1]
        client.validation(step, loss, epoch=epoch)
        client.next("verdict")
    client.vitals([step + 1, step + 2], [0.4, math.nan], [0.5, 0.5])
    command = client.next("command").command
    client.result(command)
    client.vitals(list(range(command.step + 1, command.step + 11)), _train_losses(command.step + 1, 10), [0.5] * 10)
    client.validation(command.step + 10, HEALTHY[4], epoch=5)
    client.next("verdict")
    client.wait_ack(client.seq)
    client.close()
    assert daemon.terminate() == 0
    return {**sent, "command_step": command.step}


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    data = tmp_path_factory.mktemp("kept") / "data"
    return data, _journal(data)


def _export(data: Path, out: Path, *extra: str, run: str = "exp-run") -> dict[str, Any]:
    result = governor_cli(["audit", "export", "--data-dir", str(data), "--run", run, "--out", str(out), *extra])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in extra else {"text": result.stdout}


def _replay(trace: Path) -> list[dict[str, Any]]:
    result = governor_cli(["replay", str(trace), "--json"])
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _live_decisions(data: Path, run: str, while_open: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The decisions the daemon journaled for the run (validation steps, and train records that fired), but
    those on a timeline a command was leaving (judged while it was open, they commit nothing; a trainer may
    validate before it reaches the agreement point that executes the command): into ``while_open``."""
    shown = governor_cli(["audit", "show", "--data-dir", str(data), "--run", run, "--json"])
    assert shown.returncode == 0, shown.stderr
    out, left = [], -1
    for e in (json.loads(line) for line in shown.stdout.splitlines()):
        decision = e["payload"].get("decision")
        if e["kind"] == "command":
            left = max(left, e["payload"]["command"]["timeline"])
        elif decision and decision["timeline"] <= left:
            assert "not committed" in decision["reason"], decision
            if while_open is not None:
                while_open.append(decision)
        elif decision:
            out.append(decision)
    return out


def _key(d: dict[str, Any]) -> tuple[Any, ...]:
    command = d.get("command") or {}
    return (d["kind"], d["step"], d["timeline"], d["verdict"], d["action"], d["reason"], command.get("step"))


def test_export_holds_every_record_exactly_and_replays_the_same_decisions(
    kept: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    data, sent = kept
    trace = tmp_path / "exp.jsonl"
    report = _export(data, trace, "--json")
    assert report["complete"] is True, report
    assert report["validation_records"] == 5
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    before = [r for r in train if r["step"] <= sent["steps"][-1]]
    assert [r["step"] for r in before] == sent["steps"]
    assert [r["loss"] for r in before] == sent["losses"], "float64 values come back bit for bit"
    assert [r["grad_norm"] for r in before] == sent["grads"]
    nan_row = next(r for r in train if r["loss"] == "nan")
    assert nan_row["step"] == sent["steps"][-1] + 2 == sent["command_step"]
    assert report["train"]["records"] == len(train) == len(sent["steps"]) + 2 + 10
    assert [(c["rule"], c["command"]) for c in report["live_commands"]] == [("train_non_finite", "rollback")]

    live = [_key(d) for d in _live_decisions(data, "exp-run")]
    replayed = [_key(d) for d in _replay(trace) if not (d["kind"] == "train" and d["verdict"] == "healthy")]
    assert replayed == live
    assert len(live) == 6  # 5 validations and the train-step NaN

    text = _export(data, tmp_path / "exp2.jsonl")["text"]
    assert "exactly as judged (complete)" in text
    assert f"replay it: governor replay {tmp_path / 'exp2.jsonl'}" in text
    gz = tmp_path / "exp.jsonl.gz"
    _export(data, gz)
    assert [_key(d) for d in _replay(gz)] == [_key(d) for d in _replay(trace)]


def test_past_the_budget_and_in_old_journals_the_export_says_what_it_left_out(tmp_path: Path) -> None:
    """--journal-train-records bounds what the journal keeps per run; past it (and in a journal written
    before per-step records existed, which is what --journal-train-records 0 writes) a vitals entry holds
    only its batch summary, and the export names the records it could not give back."""
    data = tmp_path / "data"
    _journal(data, "--journal-train-records", "90")
    report = _export(data, tmp_path / "t.jsonl", "--json")
    assert report["complete"] is False
    # The run had sent 0 and 49 records (48 train, 1 validation) before its first two batches, 98 before
    # the third: only the first two keep their records.
    assert report["train"]["records"] == 96
    assert (report["summarised"]["records"], report["summarised"]["first_step"]) == (48 + 48 + 2 + 10, 97)
    text = _export(data, tmp_path / "t2.jsonl")["text"]
    assert "NOT in the trace: 108 records in 4 batch(es), steps 97..204" in text, text
    assert governor_cli(["audit", "verify", "--data-dir", str(data)]).returncode == 0

    old = tmp_path / "old"
    _journal(old, "--journal-train-records", "0")
    shown = governor_cli(["audit", "show", "--data-dir", str(old), "--json"])
    assert not any("records" in json.loads(line)["payload"] for line in shown.stdout.splitlines())
    assert governor_cli(["audit", "verify", "--data-dir", str(old)]).returncode == 0
    report = _export(old, tmp_path / "old.jsonl", "--json")
    assert (report["train"]["records"], report["validation_records"]) == (0, 5)
    assert report["live_commands"][0]["rule"] == "train_non_finite"
    replayed = _replay(tmp_path / "old.jsonl")
    live_validation = [_key(d) for d in _live_decisions(old, "exp-run") if d["kind"] == "validation"]
    # Verdicts and actions agree; reasons can differ where the live daemon consulted the train stream.
    assert [k[:5] for k in map(_key, replayed)][:4] == [k[:5] for k in live_validation[:4]]
    assert replayed[4]["timeline"] == 0, "the NaN was not in the trace (as the export said): no rollback"


def test_export_refuses_bad_input_and_changes_nothing(kept: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    data, _ = kept
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    base = ["audit", "export", "--data-dir", str(data), "--out", str(out)]
    exists = governor_cli([*base, "--run", "exp-run"])
    assert exists.returncode == 2
    assert "exists; --force overwrites it" in exists.stderr
    assert out.read_text() == "mine\n"
    unknown = governor_cli([*base, "--run", "no-such-run", "--force"])
    assert unknown.returncode == 2
    assert "no run 'no-such-run' in the journal" in unknown.stderr
    assert out.read_text() == "mine\n"
    nothing = governor_cli(
        [*base[:2], "--data-dir", str(tmp_path / "none"), "--run", "r", "--out", str(out), "--force"]
    )
    assert nothing.returncode == 2
    assert "no journal in" in nothing.stderr
    assert out.read_text() == "mine\n"


@pytest.mark.slow
def test_a_real_runs_export_replays_to_the_same_rollback(tmp_path: Path) -> None:
    """tolaria-train with a learning-rate blow-up at step 300 through a real daemon: the train-stream
    detector rolls it back live; `governor replay` on the export takes the same decisions, the rollback at
    the same step with the same reason, and every validation verdict."""
    daemon = DaemonProcess(tmp_path / "data")
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "tolaria_trainer", "--task", "digits", "--run-id", "lr-run", "--epochs", "8"]
    cmd += ["--summary-json", str(summary), "--log-format", "json", "--inject", "lr-blowup@step=300:x1000"]
    result = subprocess.run(
        [*cmd, "--governor", daemon.address], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert daemon.terminate() == 0
    data, trace = tmp_path / "data", tmp_path / "lr-run.jsonl"
    exported = governor_cli(["audit", "export", "--data-dir", str(data), "--run", "lr-run", "--out", str(trace)])
    assert exported.returncode == 0, exported.stderr
    assert "exactly as judged (complete)" in exported.stdout, exported.stdout
    while_open: list[dict[str, Any]] = []
    live = _live_decisions(data, "lr-run", while_open)
    report = json.loads(
        governor_cli(
            ["audit", "export", "--data-dir", str(data), "--run", "lr-run", "--out", str(trace), "--force", "--json"]
        ).stdout
    )
    assert report["left_timeline_decisions"] == len(while_open), "the export counts what it cannot replay"
    replayed = [d for d in _replay(trace) if not (d["kind"] == "train" and d["verdict"] == "healthy")]
    live_rollbacks = [d for d in live if d.get("command")]
    assert [d["rule"] for d in live_rollbacks][:1] == ["step_lr_jump"], [d["reason"] for d in live_rollbacks]
    first = next(d for d in replayed if d.get("command"))
    assert _key(first) == _key(live_rollbacks[0])
    assert first["command"]["step"] == live_rollbacks[0]["command"]["step"]
    assert first["onset_step"] == live_rollbacks[0]["onset_step"]
    assert [_key(d) for d in replayed] == [_key(d) for d in live]


def test_a_multi_rank_runs_export_replays_its_decisions(tmp_path: Path) -> None:
    """Two ranks: each rank's validation record is its own `report` entry; the export writes them where the
    daemon received them, with each rank's train records in its own batches, and replay decides each step
    once both ranks reported, as the daemon did: the same verdicts, the same ROLLBACK."""
    daemon = DaemonProcess(tmp_path / "data")
    ranks = [AttachClient(daemon.address, "two", rank=r, world_size=2) for r in (0, 1)]
    for client in ranks:
        client.connect()
    step = 0
    for epoch, loss in enumerate([*HEALTHY[:11], math.nan], start=1):
        for client in ranks:
            client.wait_ack(client.vitals(list(range(step + 1, step + 11)), _train_losses(step + 1, 10), [0.5] * 10))
        step += 10
        for client in ranks:  # rank 1's last record is the NaN
            client.validation(step, loss if client.hello.rank == 1 else HEALTHY[epoch - 1], epoch=epoch)
        for client in ranks:
            client.next("verdict")
    commands = [client.next("command").command for client in ranks]
    for client, command in zip(ranks, commands, strict=True):
        client.result(command)
    for client in ranks:
        client.validation(step + 10, HEALTHY[11], epoch=13)
    for client in ranks:
        client.next("verdict")
        client.wait_ack(client.seq)
        client.close()
    assert daemon.terminate() == 0
    data, trace = tmp_path / "data", tmp_path / "two.jsonl"
    report = _export(data, trace, "--json", run="two")
    assert (report["world_size"], report["validation_records"], report["train"]["records"]) == (2, 26, 240)
    assert report["complete"] is True
    live = [_key(d) for d in _live_decisions(data, "two")]
    replayed = _replay(trace)
    assert [_key(d) for d in replayed if d["kind"] == "validation"] == live
    assert live[11][3:5] == ("panic", "rollback")
    assert live[12][2] == 1, "the last step was decided on timeline 1"
    assert all(d["ranks"] == [0, 1] for d in replayed if d["kind"] == "validation")
