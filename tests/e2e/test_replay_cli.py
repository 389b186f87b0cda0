"""`governor replay` as a user runs it: the real CLI in a subprocess, on files in tmp_path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import governor_cli


def healthy_losses(n: int = 12) -> list[float]:
    return [2.3 * 0.8**i + 0.1 for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(losses: list[object], **extra: object) -> list[dict[str, object]]:
    return [{"epoch": i + 1, "step": (i + 1) * 100, "loss": loss, **extra} for i, loss in enumerate(losses)]


def decisions(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_jsonl_nan_rolls_back_and_continues_on_new_timeline(tmp_path: Path) -> None:
    """A NaN is a rollback with -10; the next record is judged on timeline 1."""
    trace = write_jsonl(tmp_path / "t.jsonl", records([*healthy_losses(), "nan", 0.3], num_classes=10))
    result = governor_cli(["replay", str(trace), "--json"])
    assert result.returncode == 0, result.stderr
    out = decisions(result.stdout)
    assert len(out) == 14
    assert set(out[0]) >= {
        "run_id",
        "epoch",
        "step",
        "ranks",
        "verdict",
        "action",
        "reason",
        "punishment_reward",
    }
    nan = out[12]
    assert (nan["verdict"], nan["action"], nan["punishment_reward"], nan["timeline"]) == (
        "panic",
        "rollback",
        -10.0,
        0,
    )
    assert nan["reason"] == "non-finite: validation loss nan"
    assert (out[13]["timeline"], out[13]["verdict"], out[13]["punishment_reward"]) == (1, "healthy", None)
    assert out[0]["ranks"] == [0]
    assert out[0]["run_id"] == "run"


def test_csv_with_blank_cells_and_spike(tmp_path: Path) -> None:
    """CSV with a header of the same names; blank cells are absent; two spikes roll back."""
    rows = ["run_id,kind,epoch,step,loss,grad_norm,num_classes"]
    for i, loss in enumerate([*healthy_losses(), 40.0, 45.0], start=1):
        rows.append(f"csvrun,validation,{i},{i * 10},{loss},,10")
    rows.append("csvrun,train,15,150,0.5,inf,")
    trace = tmp_path / "export.csv"
    trace.write_text("\n".join(rows) + "\n")
    result = governor_cli(["replay", str(trace), "--json"])
    assert result.returncode == 0, result.stderr
    out = decisions(result.stdout)
    assert [d["verdict"] for d in out[12:]] == ["anomaly", "panic", "panic"]
    assert out[13]["action"] == "rollback"
    assert "2/2 consecutive" in str(out[13]["reason"])
    assert out[14]["kind"] == "train"
    assert "grad_norm inf" in str(out[14]["reason"])


def test_table_output_and_summary(tmp_path: Path) -> None:
    """Without --json: a table with the panic and a per-run summary line."""
    trace = write_jsonl(tmp_path / "t.jsonl", records([*healthy_losses(), math.inf], run_id="r1"))
    result = governor_cli(["replay", str(trace)])
    assert result.returncode == 0, result.stderr
    assert "verdict" in result.stdout.splitlines()[0]
    assert "non-finite: validation loss inf" in result.stdout
    assert "run r1: 13 validation and 0 train records" in result.stdout
    assert "actions: rollback 1" in result.stdout


def test_policy_overrides_change_decisions(tmp_path: Path) -> None:
    """--policy min_panics_before_rollback=3 turns the second spike into an anomaly."""
    trace = write_jsonl(tmp_path / "t.jsonl", records([*healthy_losses(), 40.0, 45.0]))
    default = decisions(governor_cli(["replay", str(trace), "--json"]).stdout)
    patient = governor_cli(
        [
            "replay",
            str(trace),
            "--json",
            "--policy",
            "min_panics_before_rollback=3",
            "--policy",
            "death_penalty=2",
        ]
    )
    assert patient.returncode == 0, patient.stderr
    assert default[-1]["verdict"] == "panic"
    assert decisions(patient.stdout)[-1]["verdict"] == "anomaly"


def test_halt_then_resume_semantics(tmp_path: Path) -> None:
    """The 4th rollback in the window is a HALT; replay then resumes at once on a new timeline."""
    trace = write_jsonl(tmp_path / "t.jsonl", records([*healthy_losses(), "nan", "nan", "nan", "nan", "nan"]))
    out = decisions(governor_cli(["replay", str(trace), "--json"]).stdout)
    assert [d["action"] for d in out[12:]] == ["rollback", "rollback", "rollback", "halt", "rollback"]
    assert out[15]["punishment_reward"] == -10.0
    # HALT restores nothing; the RESUME that follows restores the LKG and moves 3 -> 4.
    assert [d["timeline"] for d in out[12:]] == [0, 1, 2, 3, 4]


def test_multi_rank_trace(tmp_path: Path) -> None:
    """Two ranks per step give one decision naming both ranks."""
    rows = []
    for i, loss in enumerate([*healthy_losses(), "nan"]):
        for rank in (0, 1):
            value = loss if rank == 1 else 0.5
            rows.append({"epoch": i + 1, "step": i * 10, "loss": value, "rank": rank, "world_size": 2})
    out = decisions(governor_cli(["replay", str(write_jsonl(tmp_path / "t.jsonl", rows)), "--json"]).stdout)
    assert len(out) == 13
    assert all(d["ranks"] == [0, 1] for d in out)
    assert (out[-1]["verdict"], out[-1]["action"]) == ("panic", "rollback")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ('{"epoch": 1, "step": 2}', "line 2: missing required field 'loss'"),
        ('{"epoch": 1, "step": "ten", "loss": 1.0}', "line 2: step must be a number"),
        ('{"epoch": 1, "step": 2, "loss": "high"}', "line 2: loss must be a number"),
        (
            '{"epoch": 1, "step": 2, "loss": 1.0, "kind": "test"}',
            "line 2: kind must be 'validation', 'train' or 'policy'",
        ),
        ("{not json", "line 2: not valid JSON"),
        ('{"kind": "policy", "policy": {"colour": "red"}}', "line 2: policy: unknown policy field(s) colour"),
        ('{"kind": "policy", "policy": [1]}', "line 2: policy must be an object of policy fields, got list"),
        (
            '{"kind": "policy", "policy": {"min_history": 0}}',
            "line 2: policy: invalid policy: min_history must be >= 1",
        ),
        ('{"epoch": 1, "step": 2, "loss": 1.0, "kind": "train", "batch": 1.5}', "line 2: batch must be a whole"),
    ],
)
def test_malformed_jsonl_exits_2_before_any_decision(tmp_path: Path, line: str, message: str) -> None:
    """A malformed line is named with its number; exit 2; no decision printed."""
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"epoch": 1, "step": 1, "loss": 1.0}\n' + line + "\n" + '{"epoch": 3, "step": 3, "loss": 1.0}\n')
    result = governor_cli(["replay", str(trace), "--json"])
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_policy_records_set_the_runs_policy_and_overrides_win(tmp_path: Path) -> None:
    """A "policy" record (what `governor audit export` writes) sets the run's policy from there on; --policy
    still overrides it; a change mid-trace judges the train records before it under the old policy."""
    rows: list[dict[str, object]] = [{"kind": "policy", "policy": {"min_history": 2}}]
    rows += records([1.0, 1.01, 50.0])
    trace = write_jsonl(tmp_path / "t.jsonl", rows)
    out = decisions(governor_cli(["replay", str(trace), "--json"]).stdout)
    assert [d["verdict"] for d in out] == ["healthy", "healthy", "anomaly"], out
    assert out[0]["reason"] == "warm-up: 1/2 losses in history"
    overridden = decisions(governor_cli(["replay", str(trace), "--json", "--policy", "min_history=10"]).stdout)
    assert [d["verdict"] for d in overridden] == ["healthy"] * 3
    assert overridden[2]["reason"].startswith("warm-up: 3/10")
    later = write_jsonl(tmp_path / "later.jsonl", [*records([1.0, 1.01]), rows[0], *records([50.0])])
    changed = decisions(governor_cli(["replay", str(later), "--json"]).stdout)
    assert [d["reason"].split(":")[0] for d in changed] == ["warm-up", "warm-up", "divergence"], changed


def test_train_records_are_judged_in_the_batches_the_trace_names(tmp_path: Path) -> None:
    """Records with a ``batch`` are judged in exactly those batches, as the daemon judged them. A batch is
    judged against the statistics from before it, so the split decides when a rising loss fires: against
    the flat level of the first 40 steps it fires at step 52; in replay's own batches of 64 the statistics
    took in most of the rise first, and it fires at step 69."""
    losses = [1.0 + 0.01 * (i % 3) for i in range(40)] + [1.1**i for i in range(1, 30)]
    rows = [
        {"kind": "train", "epoch": 0, "step": i + 1, "loss": loss, "batch": 1 if i < 40 else 2}
        for i, loss in enumerate(losses)
    ]
    named = decisions(governor_cli(["replay", str(write_jsonl(tmp_path / "a.jsonl", rows)), "--json"]).stdout)
    unnamed = [{k: v for k, v in r.items() if k != "batch"} for r in rows]
    own = decisions(governor_cli(["replay", str(write_jsonl(tmp_path / "b.jsonl", unnamed)), "--json"]).stdout)
    assert [(d["step"], d["verdict"]) for d in named if d["verdict"] != "healthy"] == [(52, "panic")]
    assert [(d["step"], d["verdict"]) for d in own if d["verdict"] != "healthy"] == [(69, "panic")]


def test_malformed_csv_names_line(tmp_path: Path) -> None:
    """A CSV row with a non-numeric epoch is reported with its line number."""
    trace = tmp_path / "bad.csv"
    trace.write_text("epoch,step,loss\n1,10,2.0\nx,20,1.0\n")
    result = governor_cli(["replay", str(trace)])
    assert result.returncode == 2
    assert "line 3: epoch must be a number" in result.stderr
    assert result.stdout == ""


def test_unknown_keys_named_once(tmp_path: Path) -> None:
    """Unknown keys are ignored and named once on stderr."""
    rows = [{**r, "wandb_id": "x", "comment": "hi"} for r in records(healthy_losses(3))]
    result = governor_cli(["replay", str(write_jsonl(tmp_path / "t.jsonl", rows)), "--json"])
    assert result.returncode == 0
    assert result.stderr.count("ignoring unknown key(s): comment, wandb_id") == 1
    assert len(decisions(result.stdout)) == 3


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("colour=red", "unknown policy field 'colour'; valid fields: profile, history_window"),
        ("sensitivity=lots", "sensitivity expects a float"),
        ("history_window=5", "history_window (5) must be >= min_history (10)"),
    ],
)
def test_bad_policy_exits_2_listing_keys(tmp_path: Path, pair: str, message: str) -> None:
    """An unknown key or bad value is an error naming the valid keys or the problem."""
    trace = write_jsonl(tmp_path / "t.jsonl", records(healthy_losses(3)))
    result = governor_cli(["replay", str(trace), "--policy", pair])
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_missing_file_exits_2(tmp_path: Path) -> None:
    """A trace that does not exist is a usage error, not a traceback."""
    result = governor_cli(["replay", str(tmp_path / "absent.jsonl")])
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_gzipped_trace(tmp_path: Path) -> None:
    """A gzipped JSONL trace is read transparently."""
    import gzip

    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records(healthy_losses(4))).encode()))
    result = governor_cli(["replay", str(path), "--json"])
    assert result.returncode == 0, result.stderr
    assert len(decisions(result.stdout)) == 4


def test_replay_works_without_torch(tmp_path: Path, no_torch_env: dict[str, str]) -> None:
    """`governor replay` runs with torch unimportable (the daemon never imports torch)."""
    trace = write_jsonl(tmp_path / "t.jsonl", records([*healthy_losses(), "nan"]))
    probe = governor_cli(["replay", str(trace), "--json"], env=no_torch_env)
    assert probe.returncode == 0, probe.stderr
    assert decisions(probe.stdout)[-1]["action"] == "rollback"
    import subprocess
    import sys

    check = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={**no_torch_env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode != 0
    assert "unimportable" in check.stderr
