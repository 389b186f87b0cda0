"""Hugging Face ``transformers.Trainer``: a ``TrainerCallback`` that puts ``Trainer.train`` under the governor.

::

    from tolaria_trainer.integrations.transformers import GovernorCallback

    trainer = Trainer(..., callbacks=[GovernorCallback(governor="127.0.0.1:50051", random_guess_loss=10.8)])

``on_train_begin`` builds a ``GovernedTraining`` from the ``model``, ``optimizer`` and ``lr_scheduler`` the
Trainer hands its callbacks (accelerate's wrappers unwrapped; the grad scaler of fp16 training is the
wrapped optimizer's). Each optimizer step is one ``step()`` in ``on_step_end`` (after the LR scheduler
stepped and the gradients were zeroed), with:

* the loss: a callback never sees the loss ``Trainer.training_step`` returns, so a forward hook on the
  model keeps the ``loss`` of each training forward's output (a device tensor: no host sync), summed over
  the step's micro-batches when the model normalized it by ``num_items_in_batch`` (models that accept
  loss kwargs), else averaged. A loss the model does not compute (``compute_loss_func``, label smoothing,
  an overridden ``compute_loss``) is handed over with ``callback.record_loss(loss)`` from
  ``compute_loss``; without either, the first step raises ValueError saying so. ``on_log`` is no
  substitute: its loss is an average over ``logging_steps`` with non-finite steps filtered out.
* the gradient norm: the total norm of the optimizer's gradients in ``on_optimizer_step`` (unscaled,
  before they are zeroed). No callback sees them before the Trainer clips them: with ``max_grad_norm``
  (1.0 by default) the governor sees the clipped norm, so its gradient blow-up rule sees at most
  ``max_grad_norm`` (a non-finite norm stays non-finite; the Trainer logs the norm before clipping).

Each evaluation during training is one ``validate()`` (``on_evaluate``, ``metrics[eval_loss_key]``, the
accuracy ``metrics[accuracy_key]`` if given). ``on_train_end`` settles the last verdict and closes the run;
``Trainer`` has no exception hook, so a run whose ``train()`` raised is closed as FAILED at the next
``train()`` or when the process exits.

After a restore the model, optimizer, LR scheduler and RNG states are those of the last-known-good (LKG);
training goes on from them with the next batch. The Trainer's ``state.global_step`` and ``state.epoch``
are not rewound: ``max_steps``/``num_train_epochs`` budget the steps run, rolled-back ones included (the
LR schedule, restored with the weights, may then not reach its end), logging/evaluation/save intervals
keep counting, and the data loader goes on where it was (the batches trained since the LKG are not seen
again). Batches a restore asks to skip (a recurring fault's data window on the recovery ladder,
``recovery_skip_batches``) are run but not applied: the step guard skips their optimizer steps. One rank
executes a command at its next step (``on_step_end``), before the Trainer's evaluation of that step. A HALT
stops training (``control.should_training_stop``) unless a RESUME came within ``halt_wait_s``.

Each restore, HALT and rise in unjudged records is logged at the global step it happened: the
``governor/*`` scalars and the decision's reason (``tolaria_trainer.loggers``) as one ``state.log_history``
entry, also handed to the ``on_log`` of the callbacks after this one. The Trainer calls its reporting
integrations (``report_to``) before the callbacks you pass, so for them call ``callback.log_through(trainer)``
once the Trainer is built: the entries then go through ``trainer.log``. ``loggers=[...]`` adds loggers of your
own (a SummaryWriter, a wandb run, a callable).

Tested single-process on CPU.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tolaria_trainer.governance import Governance
from tolaria_trainer.governed import GovernedTraining
from tolaria_trainer.integrations._common import GovernedFit, loss_of, total_grad_norm
from tolaria_trainer.loggers import DECISION_TAG, GovernorEvent

log = logging.getLogger("tolaria.integrations.transformers")


class GovernorCallback(TrainerCallback):
    """Governs ``Trainer.train``; ``**options`` are GovernedTraining's (``agree_every_steps``, ``fail_closed``,
    ``policy``, ``snapshot_location``, ``extra_state``, ...): the GovernedOptions fields among them are checked
    here, when the callback is made (``fit.options``). ``fit.governed`` is the run's
    GovernedTraining, ``fit.restores`` the outcomes of its restores."""

    def __init__(
        self,
        governor: str | Governance | None,
        run_id: str | None = None,
        token: str | None = None,
        num_classes: int | None = None,
        random_guess_loss: float | None = None,
        *,
        eval_loss_key: str = "eval_loss",
        accuracy_key: str | None = None,
        settle_at_end: bool = True,
        **options: Any,
    ) -> None:
        self.fit = GovernedFit(
            "transformers", governor, run_id, token, num_classes, random_guess_loss, settle_at_end, options
        )
        self.eval_loss_key = eval_loss_key
        self.accuracy_key = accuracy_key
        self._optimizer: torch.optim.Optimizer | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._forward_losses: list[tuple[torch.Tensor, bool]] = []  # (loss, normalized over the whole step)
        self._recorded: list[torch.Tensor] = []
        self._grad_norm: torch.Tensor | None = None
        self._warned_missing_key = False
        self._log: TrainerLog | None = None
        self._trainer: Any = None
        weakref.finalize(self, GovernedFit.abandon, self.fit)

    def log_through(self, trainer: Any) -> GovernorCallback:
        """Log governor events with ``trainer.log`` (its ``log_history`` and every callback's ``on_log``), so that
        the reporting integrations of ``report_to`` (TensorBoard, W&B, MLflow...), which the Trainer calls
        before the callbacks you pass, see them too. Returns the callback."""
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(f"log_through needs a transformers.Trainer, got {type(trainer).__name__}")
        self._trainer = trainer
        return self

    @property
    def governed(self) -> GovernedTraining | None:
        """The GovernedTraining of the run in progress (or of the last one)."""
        return self.fit.governed

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Hand over the training loss of the current step (or of one of its micro-batches: the step reports
        their mean) when the model's forward does not compute it; call it from ``compute_loss``. It takes
        precedence over the losses the forward hook saw."""
        if not self.fit.active:
            return
        assert self.fit.governed is not None
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), device=self.fit.governed.device)
        self._recorded.append(loss.detach())

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, optimizer, scheduler = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if not isinstance(model, nn.Module) or not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("GovernorCallback needs the Trainer's model and optimizer in on_train_begin")
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        inner_scheduler = getattr(scheduler, "scheduler", None)  # accelerate's AcceleratedScheduler
        if isinstance(inner_scheduler, torch.optim.lr_scheduler.LRScheduler):
            scheduler = inner_scheduler
        schedulers = [scheduler] if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) else []
        if scheduler is not None and not schedulers:
            log.warning("LR scheduler %s is not a torch LRScheduler: not snapshotted", type(scheduler))
        self._remove_hook()
        self.fit.open(
            model,
            [optimizer],
            schedulers=schedulers,
            grad_scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            device=next((p.device for p in model.parameters()), None),
            framework_logger=self._make_log(state),
        )
        self._optimizer = optimizer
        self._forward_losses, self._recorded, self._grad_norm = [], [], None
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._forward_losses, self._recorded = [], []  # a training forward outside the Trainer's steps is not one

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.fit.active and self._optimizer is not None:
            self._grad_norm = total_grad_norm([self._optimizer])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.fit.active:
            return
        loss = self._step_loss()
        grad_norm, self._grad_norm = self._grad_norm, None
        outcome = self.fit.step(loss, grad_norm)
        if outcome.halted:
            control.should_training_stop = True

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.fit.active:
            return  # trainer.evaluate() outside train()
        metrics: Mapping[str, Any] = kwargs.get("metrics") or {}
        if self.eval_loss_key not in metrics:
            if not self._warned_missing_key:
                self._warned_missing_key = True
                log.warning(
                    "no %r in the evaluation metrics (%s): evaluations are not reported; pass eval_loss_key",
                    self.eval_loss_key,
                    ", ".join(sorted(metrics)) or "empty",
                )
            return
        accuracy = None
        if self.accuracy_key is not None and self.accuracy_key in metrics:
            accuracy = float(metrics[self.accuracy_key])
        outcome = self.fit.validate(float(metrics[self.eval_loss_key]), accuracy, epoch=int(state.epoch or 0))
        if outcome.halted:
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hook()
        self.fit.finish()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._log is not None and logs is not None:
            self._log.deliver(logs)

    def _make_log(self, state: TrainerState) -> TrainerLog:
        self._log = TrainerLog(state, self._trainer)
        return self._log

    # ----------------------------------------------------------------- the loss

    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not self.fit.active:
            return  # evaluation, prediction
        loss = loss_of(output)
        if loss is not None and loss.dim() == 0:
            self._forward_losses.append((loss.detach(), kwargs.get("num_items_in_batch") is not None))

    def _step_loss(self) -> torch.Tensor:
        recorded, forward = self._recorded, self._forward_losses
        self._recorded, self._forward_losses = [], []
        if recorded:
            return torch.stack([loss.float() for loss in recorded]).mean()
        if not forward:
            error = ValueError(
                "GovernorCallback saw no training loss: the model's forward returned none (a compute_loss_func, "
                "label smoothing or an overridden compute_loss computes it outside the model); call "
                "callback.record_loss(loss) from compute_loss"
            )
            self._remove_hook()
            self.fit.fail(error)  # the Trainer has no exception hook
            raise error
        losses = torch.stack([loss.float() for loss, _ in forward])
        # Normalized by num_items_in_batch, each micro-batch's loss is its share of the step's mean.
        return losses.sum() if all(normalized for _, normalized in forward) else losses.mean()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class TrainerLog:
    """Governor events into the Trainer's log at ``state.global_step``: the ``governor/*`` scalars and the
    decision's text (``governor/decision``) as one entry. With the trainer (``GovernorCallback.log_through``),
    through ``trainer.log``: ``state.log_history`` and every callback's ``on_log``, reporting integrations
    included. Without it, appended to ``state.log_history`` at once and added to the ``logs`` of the next
    ``on_log`` for the callbacks after the GovernorCallback (the Trainer's printer and progress bar, yours)."""

    def __init__(self, state: TrainerState, trainer: Any = None) -> None:
        self.state = state
        self.trainer = trainer
        self.pending: dict[str, Any] = {}

    def log_event(self, event: GovernorEvent) -> None:
        entry: dict[str, Any] = {**event.scalars(), DECISION_TAG: event.text()}
        if self.trainer is not None:
            self.trainer.log(entry)
            return
        self.state.log_history.append({**entry, "step": self.state.global_step})
        self.pending.update(entry)

    def deliver(self, logs: dict[str, Any]) -> None:
        """Add the entries not yet seen by ``on_log`` to ``logs`` (of a log the Trainer is dispatching)."""
        if self.pending:
            logs.update(self.pending)
            self.pending.clear()


__all__ = ["GovernorCallback", "TrainerLog"]
