"""The Lightning GovernorCallback against a real daemon: a tiny LightningModule whose weights turn NaN
once mid-fit is rolled back once, in place, and the fit goes on to a finite loss."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")
pytest.importorskip("tensorboard")

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from governor_daemon.testing import InProcessDaemon
from tolaria.controller import ControllerClient, RunFinished, RunState
from tolaria_trainer.governed import Outcome
from tolaria_trainer.integrations.lightning import GovernorCallback

# Lightning 2.6's own use of a torch pytree API that torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")

NAN_AT_STEP = 44  # validations every 10 batches; each snapshot vouched for by the 23 train steps after it


class TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PoisonOnce(pl.Callback):
    """Fills the weights with NaN after optimizer step NAN_AT_STEP, once; until the restore, each step
    waits a little so that the rollback lands mid-fit even on a slow machine."""

    def __init__(self, governor: GovernorCallback) -> None:
        self.governor = governor
        self.poisoned_at: int | None = None
        self.steps_after_restore = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.poisoned_at is None and trainer.global_step == NAN_AT_STEP:
            self.poisoned_at = trainer.global_step
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))
        elif self.poisoned_at is not None and not self.governor.fit.restores:
            time.sleep(0.02)
        elif self.governor.fit.restores:
            self.steps_after_restore += 1


def loaders() -> tuple[torch.utils.data.DataLoader[Any], torch.utils.data.DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(480, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()  # learnable: the loss falls
    train = torch.utils.data.TensorDataset(x[:320], y[:320])
    val = torch.utils.data.TensorDataset(x[320:], y[320:])
    return (
        torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, generator=g),
        torch.utils.data.DataLoader(val, batch_size=80),
    )


def test_nan_mid_fit_is_rolled_back_once_and_training_goes_on(tmp_path: Path) -> None:
    """One rollback, in place; the fit goes on to a finite loss, and the rollback is in the trainer's loggers
    (CSVLogger's metrics.csv, TensorBoardLogger's event file with the reason) at the global step it happened."""
    torch.manual_seed(0)
    run_id = "lightning-nan"
    with InProcessDaemon(tmp_path / "data") as daemon:
        governor = GovernorCallback(
            governor=daemon.address, run_id=run_id, num_classes=2, accuracy_key="val_acc", agree_every_steps=5
        )
        poison = PoisonOnce(governor)
        model = TinyClassifier()
        train_loader, val_loader = loaders()
        trainer = pl.Trainer(
            max_epochs=4,  # 20 batches an epoch: 80 optimizer steps
            val_check_interval=10,
            num_sanity_val_steps=1,  # not reported to the governor
            accelerator="cpu",
            devices=1,
            logger=[CSVLogger(tmp_path / "csv", name="", version=""), TensorBoardLogger(tmp_path / "tb", name="")],
            log_every_n_steps=10,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[governor, poison],
        )
        trainer.fit(model, train_loader, val_loader)

        assert poison.poisoned_at == NAN_AT_STEP
        assert len(governor.fit.restores) == 1
        restore = governor.fit.restores[0]
        assert restore.restored_step in (10, 20)  # the LKG: a validation's snapshot allowed and vouched for
        assert poison.steps_after_restore >= 20  # the fit went on well past the rollback
        assert trainer.global_step == 80  # Lightning's counters are not rewound: the budget counts every step
        assert all(torch.isfinite(p).all() for p in model.parameters())
        x, y = next(iter(val_loader))
        with torch.no_grad():
            final_loss = nn.functional.cross_entropy(model(x), y).item()
        assert math.isfinite(final_loss)
        assert final_loss < math.log(2)  # it learned after the rollback
        gov = governor.governed
        assert gov is not None
        assert gov.num_rollbacks == 1
        assert gov.state.timeline == 1
        with ControllerClient(daemon.address) as control:
            status = control.panic_state(run_id)
            finish = next(e for e in control.events(runs=[run_id], kinds=["finish"], deadline_s=10))
        assert status.num_rollbacks == 1
        assert status.state is RunState.FINISHED
        assert status.task == "lightning"
        assert isinstance(finish, RunFinished)
        assert (finish.status, finish.num_rollbacks) == ("COMPLETED", 1)

    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("governor/rollbacks")]
    (row,) = rows
    at_step = int(row["step"])
    assert NAN_AT_STEP < at_step < 80, "logged at the global step the rollback was executed"
    assert float(row["governor/rollbacks"]) == 1.0
    assert float(row["governor/timeline"]) == 1.0
    assert float(row["governor/restored_step"]) == restore.restored_step
    assert float(row["governor/punishment"]) == pytest.approx(restore.punishment_reward)
    accumulator = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("governor/rollbacks")] == [(at_step, 1.0)]
    (text,) = accumulator.Tensors("governor/decision/text_summary")
    assert text.step == at_step
    assert "non-finite" in tensor_util.make_ndarray(text.tensor_proto).item().decode()


class HaltAt(pl.Callback):
    """A controller halts the run after optimizer step ``step`` (once)."""

    def __init__(self, address: str, run_id: str, step: int) -> None:
        self.address, self.run_id, self.step = address, run_id, step
        self.done = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.done:
            self.done = True
            with ControllerClient(self.address) as control:
                control.halt(self.run_id, "an operator stops it")


def test_a_halt_stops_the_fit_and_closes_the_run_halted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    run_id = "lightning-halt"
    with InProcessDaemon(tmp_path / "data") as daemon:
        governor = GovernorCallback(governor=daemon.address, run_id=run_id, agree_every_steps=2, halt_wait_s=0)
        grad_norms: list[float] = []  # what each step() reported (read on the host here: tests only)
        original_step = governor.fit.step

        def step(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Outcome:
            assert grad_norm is not None
            grad_norms.append(float(grad_norm))
            return original_step(loss, grad_norm)

        governor.fit.step = step  # type: ignore[method-assign]
        train_loader, val_loader = loaders()
        trainer = pl.Trainer(
            max_epochs=10,
            accumulate_grad_batches=2,  # 10 optimizer steps an epoch: a step() per optimizer step, not per batch
            gradient_clip_val=1e-3,  # the governor sees the norms before clipping
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[governor, HaltAt(daemon.address, run_id, step=4)],
        )
        trainer.fit(TinyClassifier(), train_loader, val_loader)

        assert governor.fit.halt is not None
        assert trainer.global_step < 30  # stopped at an agreement point soon after the halt, not after 100 steps
        gov = governor.governed
        assert gov is not None
        assert gov.state.step == trainer.global_step == len(grad_norms)
        assert min(grad_norms) > 1e-2
        with ControllerClient(daemon.address) as control:
            finish = next(e for e in control.events(runs=[run_id], kinds=["finish"], deadline_s=10))
        assert isinstance(finish, RunFinished)
        assert finish.status == "HALTED"
