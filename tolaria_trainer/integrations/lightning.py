"""Lightning 2.x: a ``Callback`` that puts ``Trainer.fit`` under the governor.

::

    from tolaria_trainer.integrations.lightning import GovernorCallback

    trainer = Trainer(callbacks=[GovernorCallback(governor="127.0.0.1:50051", num_classes=10)])

At fit start it builds a ``GovernedTraining`` from the LightningModule, ``trainer.optimizers``, the
torch LR schedulers of ``trainer.lr_scheduler_configs`` and the precision plugin's grad scaler (16-mixed).
Each batch in which an optimizer stepped is one ``step()`` (``on_train_batch_end``, after Lightning
stepped the schedulers: the loss is ``outputs["loss"]``, summed over the accumulated batches, a device
tensor; the gradient norm is the total norm of the gradients in ``on_before_optimizer_step``: unscaled,
before Lightning clips them). Each validation of the fit is
one ``validate()`` (``on_validation_end``, so metrics logged in the module's own
``on_validation_epoch_end`` are there too; the sanity check is not one): the loss is
``trainer.callback_metrics[val_loss_key]``, the accuracy ``[accuracy_key]`` if given. The end of
training (``on_train_end``) settles the last verdict and closes the run (COMPLETED); an exception
closes it as FAILED (HALTED for RunHalted; an unreachable or refusing governor is not told).

After a restore the model, optimizers, schedulers, grad scaler and RNG states are those of the
last-known-good (LKG) and training goes on from them with the next batch. Lightning's own counters are
not rewound: ``global_step`` and ``current_epoch`` go on counting, so ``max_steps``/``max_epochs``
budget the steps run, rolled-back ones included, and the data loader goes on where it was (the batches
trained since the LKG are not seen again). Batches a restore asks to skip (a recurring fault's data window
on the recovery ladder, ``recovery_skip_batches``) are run but not applied: the step guard skips their
optimizer steps. Before each validation of the fit (``on_validation_start``) a rank that saw a non-finite
step waits for the governor's command and executes it, so a validation never runs on condemned weights.
Loggers and checkpoints keep the global step. Each restore, HALT and rise in unjudged records is
logged through ``trainer.loggers`` at the global step it happened: the ``governor/*`` scalars
(``tolaria_trainer.loggers``), and the decision's reason as text on a TensorBoardLogger; ``loggers=[...]``
adds loggers of your own. A HALT stops the fit (``trainer.should_stop``) unless a
RESUME came within ``halt_wait_s``.

Tested single-process on CPU. ``pytorch_lightning`` (the old package name) is not supported: its
``Callback`` is another class.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT

from tolaria_trainer.governance import Governance
from tolaria_trainer.governed import GovernedTraining, Outcome
from tolaria_trainer.integrations._common import GovernedFit, loss_of, total_grad_norm
from tolaria_trainer.loggers import DECISION_TAG, GovernorEvent

log = logging.getLogger("tolaria.integrations.lightning")


class GovernorCallback(pl.Callback):
    """Governs ``Trainer.fit``; ``**options`` are GovernedTraining's (``agree_every_steps``, ``fail_closed``,
    ``policy``, ``snapshot_location``, ``extra_state``, ...): the GovernedOptions fields among them are checked
    here, when the callback is made (``fit.options``). ``fit.governed`` is the fit's
    GovernedTraining, ``fit.restores`` the outcomes of its restores."""

    def __init__(
        self,
        governor: str | Governance | None,
        run_id: str | None = None,
        token: str | None = None,
        num_classes: int | None = None,
        random_guess_loss: float | None = None,
        *,
        val_loss_key: str = "val_loss",
        accuracy_key: str | None = None,
        settle_at_end: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        self.fit = GovernedFit(
            "lightning", governor, run_id, token, num_classes, random_guess_loss, settle_at_end, options
        )
        self.val_loss_key = val_loss_key
        self.accuracy_key = accuracy_key
        self._last_global_step = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_batches = 0
        self._grad_sq: torch.Tensor | None = None  # squared gradient norms of the batch's optimizer steps
        self._warned_missing_key = False

    @property
    def governed(self) -> GovernedTraining | None:
        """The GovernedTraining of the fit in progress (or of the last fit)."""
        return self.fit.governed

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedulers = []
        for config in trainer.lr_scheduler_configs:
            scheduler: object = config.scheduler  # typed as torch's, but Lightning accepts duck-typed ones
            if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
                schedulers.append(scheduler)
            else:
                log.warning("LR scheduler %s is not a torch LRScheduler: not snapshotted", type(scheduler))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.fit.open(
            pl_module,
            trainer.optimizers,
            schedulers=schedulers,
            grad_scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            device=pl_module.device,
            framework_logger=TrainerLoggers(trainer),
        )
        self._last_global_step = trainer.global_step
        self._loss_sum, self._loss_batches, self._grad_sq = None, 0, None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.fit.active:
            return
        norm = total_grad_norm([optimizer])  # unscaled (16-mixed), before Lightning clips them
        if norm is not None:
            self._grad_sq = norm.square() if self._grad_sq is None else self._grad_sq + norm.square()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        if not self.fit.active:
            return
        loss = loss_of(outputs)
        if loss is not None:
            loss = loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_batches += 1
        if trainer.global_step == self._last_global_step:
            return  # accumulating gradients: no optimizer step in this batch
        self._last_global_step = trainer.global_step
        if self._loss_sum is None:
            raise ValueError(
                "GovernorCallback needs the training loss: return it from training_step "
                "(a tensor, or a dict with a 'loss' key)"
            )
        # Automatic optimization divides each batch's loss by accumulate_grad_batches: their sum is the
        # step's mean loss. Manual optimization hands the losses as returned.
        step_loss = self._loss_sum if pl_module.automatic_optimization else self._loss_sum / self._loss_batches
        grad_norm = self._grad_sq.sqrt() if self._grad_sq is not None else None
        self._loss_sum, self._loss_batches, self._grad_sq = None, 0, None
        self._react(trainer, self.fit.step(step_loss, grad_norm))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.fit.active or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._react(trainer, self.fit.before_validation())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.fit.active or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # the sanity check, or trainer.validate() outside a fit
        metrics = trainer.callback_metrics
        if self.val_loss_key not in metrics:
            if not self._warned_missing_key:
                self._warned_missing_key = True
                log.warning(
                    "no %r in trainer.callback_metrics (%s): validations are not reported; log it with "
                    "self.log(%r, ...) or pass val_loss_key",
                    self.val_loss_key,
                    ", ".join(sorted(metrics)) or "empty",
                    self.val_loss_key,
                )
            return
        accuracy = None
        if self.accuracy_key is not None and self.accuracy_key in metrics:
            accuracy = float(metrics[self.accuracy_key])
        loss = float(metrics[self.val_loss_key])
        self._react(trainer, self.fit.validate(loss, accuracy, epoch=trainer.current_epoch))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit.finish()  # here, not on_fit_end: the strategy's teardown (moving the model off the GPU) is between

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit.finish()  # a fit whose training loop was skipped (a no-op once closed)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.fit.fail(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.fit.fail(RuntimeError("the fit ended without on_fit_end"))  # a no-op once closed

    def _react(self, trainer: pl.Trainer, outcome: Outcome) -> None:
        if outcome.halted:
            trainer.should_stop = True


class TrainerLoggers:
    """Governor events through the trainer's loggers (``trainer.loggers``), at its ``global_step`` (not rewound
    by a restore: the step of the loss charts): the ``governor/*`` scalars with ``log_metrics``, then ``save()``
    (a CSVLogger writes its metrics.csv there); the decision as text where the logger's experiment has
    ``add_text`` (TensorBoardLogger). Lightning's loggers write on rank 0 only."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def log_event(self, event: GovernorEvent) -> None:
        step = self.trainer.global_step
        for logger in self.trainer.loggers:
            logger.log_metrics(event.scalars(), step=step)
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text(DECISION_TAG, event.text(), step)
            logger.save()


__all__ = ["GovernorCallback", "TrainerLoggers"]
