"""Governor events in the user's own tools, against a real daemon: a NaN in a plain GovernedTraining loop is
one rollback, and the TensorBoard event file it wrote (read back with TensorBoard's own reader) holds
``governor/rollbacks`` and the decision's reason at the step the rollback happened; so does an offline wandb
run (its ``.wandb`` file read back)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from governor_daemon.testing import InProcessDaemon
from tolaria_trainer import GovernedTraining, Outcome
from tolaria_trainer.loggers import GovernorEvent

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter


def nan_run(address: str, run_id: str, loggers: list[object]) -> Outcome:
    """Steps 1-12 healthy, NaN weights at step 13, the governor's ROLLBACK executed before the next validation
    (``before_validation`` waits for it), three steps more; returns the restore's outcome."""
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(gov: GovernedTraining, batches: range) -> None:
        for i in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
            loss.backward()
            optimizer.step()
            gov.step(loss)

    with GovernedTraining(
        model,
        optimizer,
        governor=address,
        run_id=run_id,
        num_classes=2,
        agree_every_steps=4,
        verdict_wait_s=60,  # the command arrives long before: this only bounds a broken daemon
        loggers=loggers,
    ) as gov:
        train(gov, range(12))
        with torch.no_grad():
            model[2].weight.fill_(math.nan)
        train(gov, range(12, 13))  # step 13: a NaN loss (its update is never applied)
        assert gov.condemned
        outcome = gov.before_validation()
        assert outcome.restored, outcome
        train(gov, range(13, 16))
        assert not gov.settle().restored
    return outcome


def test_a_rollback_lands_in_the_tensorboard_event_file(daemon: InProcessDaemon, tmp_path: Path) -> None:
    """NaN weights at step 13: the governor's ROLLBACK, executed before the next validation, is in the event
    file as governor/rollbacks 1, governor/timeline 1 and governor/restored_step at step 13, with the reason
    as text; the callable logger got the same event."""
    writer = SummaryWriter(str(tmp_path / "tb"))
    events: list[GovernorEvent] = []
    outcome = nan_run(daemon.address, "tb-nan", [writer, events.append])
    writer.close()

    (event,) = events
    assert (event.kind, event.step, event.num_rollbacks, event.timeline) == ("rollback", 13, 1, 1)
    assert "non-finite" in event.reason
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    assert scalars["governor/rollbacks"] == [(13, 1.0)]
    assert scalars["governor/timeline"] == [(13, 1.0)]
    assert scalars["governor/restored_step"] == [(13, float(outcome.restored_step))]
    assert scalars["governor/halted"] == [(13, 0.0)]
    assert scalars["governor/punishment"] == [(13, pytest.approx(outcome.punishment_reward))]
    (text,) = accumulator.Tensors("governor/decision/text_summary")
    decision = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    assert text.step == 13
    assert decision == event.text()
    assert decision.startswith(f"rollback (command 1) at step 13: restored step {outcome.restored_step} on timeline 1")


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of an offline wandb run, read from its ``.wandb`` file: a 7-byte W&B header, then
    LevelDB log records (32 KiB blocks; 7-byte record headers: CRC, length, type) of ``Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, position, pending, last = [], 7, b"", None
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            last = record.WhichOneof("record_type")
            if last == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    assert last == "exit", f"the run's file ends with its exit record, not {last!r}: it is incomplete"
    return rows


def test_a_rollback_lands_in_an_offline_wandb_run(
    daemon: InProcessDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rollback in a wandb run (offline): one row holds the governor/* values, governor/step 13 and the
    decision, added to the run's current row; the run's own steps are untouched."""
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    run = wandb.init(mode="offline", dir=str(tmp_path), project="governed", settings=wandb.Settings(silent=True))
    run.log({"loss": 1.0}, step=0)
    outcome = nan_run(daemon.address, "wandb-nan", [run])
    run.log({"loss": 0.5}, step=1)
    run_dir = Path(run.dir).parent
    run.finish()
    wandb.teardown()  # the service process writes the run's file: it is complete once the service stopped

    rows = wandb_history(run_dir)
    (row,) = [r for r in rows if "governor/rollbacks" in r]
    assert row["governor/step"] == 13
    assert row["governor/rollbacks"] == 1
    assert row["governor/restored_step"] == outcome.restored_step
    assert row["governor/decision"].startswith("rollback (command 1) at step 13")
    assert row["_step"] == 0, "added to the run's current row, not a step of its own"
    assert [r["_step"] for r in rows] == [0, 1]
