"""What the framework callbacks share: one GovernedTraining per fit, its outcomes, and how it is closed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tolaria_trainer.governance import FinishStatus, Governance, GovernorRefused
from tolaria_trainer.governed import GovernedTraining, GovernorUnreachable, Outcome, RunHalted
from tolaria_trainer.loggers import GovernorLogger, GovernorLoggers
from tolaria_trainer.options import GovernedOptions

log = logging.getLogger("tolaria.integrations")


class GovernedFit:
    """The framework-independent half of a GovernorCallback: builds the GovernedTraining when a fit starts,
    keeps the outcomes that did something (``restores``: each restore in place, ``halt``: the HALT that
    stopped the run), settles and closes it when the fit ends.

    ``settle_at_end``: before closing, wait for the last validation's verdict (``GovernedTraining.settle``)
    so that a PANIC on it still restores the last-known-good weights in place: the model the framework
    leaves behind is then the LKG, not the diverged one (it cannot train those epochs again).

    ``options``: the callback's keyword arguments; those that are GovernedOptions fields become ``self.options``
    (checked here, once), the rest (``extra_state``, ``loggers``, ...) go to each fit's GovernedTraining as they are.
    """

    def __init__(
        self,
        framework: str,
        governor: str | Governance | None,
        run_id: str | None,
        token: str | None,
        num_classes: int | None,
        random_guess_loss: float | None,
        settle_at_end: bool,
        options: dict[str, Any],
    ) -> None:
        self.framework = framework
        self.governor = governor
        knobs, runtime = GovernedOptions.split(options)
        self.options = GovernedOptions(  # ValueError for a bad one when the callback is made, not at its fit
            **{"task": framework, **knobs},
            run_id=run_id,
            token=token,
            num_classes=num_classes,
            random_guess_loss=random_guess_loss,
        )
        self.settle_at_end = settle_at_end
        self.loggers = GovernorLoggers(runtime.pop("loggers", ()))  # the user's: TypeError for a bad one
        self.runtime = runtime  # GovernedTraining's other keyword arguments (extra_state, ...)
        self.governed: GovernedTraining | None = None  # of the fit in progress (or the last one, once closed)
        self.restores: list[Outcome] = []
        self.halt: Outcome | None = None
        self._open = False
        self._last_finite_norm: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """True between the fit's start and its end, while the run is not halted."""
        return self._open and self.halt is None

    def open(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler] = (),
        grad_scaler: torch.amp.GradScaler | None = None,
        device: torch.device | None = None,
        framework_logger: GovernorLogger | None = None,
    ) -> GovernedTraining:
        """Build and start the GovernedTraining of a new fit (closing one a previous fit left open). Its loggers
        are ``framework_logger`` (the framework's own: the trainer's loggers, the Trainer's log) and the
        ``loggers`` option (the user's)."""
        if self._open:
            self.close(FinishStatus.FAILED, "a new fit started before the previous one ended")
        self.restores, self.halt, self._last_finite_norm = [], None, None
        loggers = [framework_logger] if framework_logger is not None else []
        governed = GovernedTraining(
            model,
            list(optimizers),
            governor=self.governor,
            options=self.options,
            schedulers=schedulers,
            grad_scaler=grad_scaler,
            device=device,
            loggers=[*loggers, *self.loggers.loggers],
            **self.runtime,
        )
        self.governed = governed
        governed.start()
        self._open = True
        log.info("run %s governed by %s", governed.run_id, self.governor)
        return governed

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Outcome:
        """``GovernedTraining.step`` (a missing gradient norm is reported as 0).

        With a grad scaler (fp16), non-finite gradients are the scaler's business: it skips that optimizer
        step (the weights do not change) and lowers its scale. Such a step reports the last finite gradient
        norm (1 before any), so that an overflow is not a rollback; a diverged model still shows in its loss.
        """
        governed = self.governed
        assert governed is not None
        if grad_norm is not None and governed.state.scaler is not None:
            last = self._last_finite_norm if self._last_finite_norm is not None else torch.ones_like(grad_norm)
            grad_norm = torch.where(torch.isfinite(grad_norm), grad_norm, last)  # on the device: no sync
            self._last_finite_norm = grad_norm
        return self.react(governed.step(loss, grad_norm if grad_norm is not None else 0.0))

    def before_validation(self) -> Outcome:
        """``GovernedTraining.before_validation``: execute a command the run is condemned to first."""
        assert self.governed is not None
        return self.react(self.governed.before_validation())

    def validate(self, loss: float, accuracy: float | None, *, epoch: int) -> Outcome:
        """``GovernedTraining.validate``."""
        assert self.governed is not None
        return self.react(self.governed.validate(loss, accuracy, epoch=epoch))

    def react(self, outcome: Outcome) -> Outcome:
        """Keep an outcome that restored or halted, and say what the framework cannot do after it."""
        if outcome.restored:
            self.restores.append(outcome)
            log.warning(
                "%s callback: weights, optimizer, schedulers and RNG restored in place to step %s (timeline %d); "
                "the trainer's own step and epoch counters go on",
                self.framework,
                outcome.restored_step,
                outcome.timeline,
            )
            if outcome.skip_batches:
                log.warning(
                    "the next %d batches are skipped (run, but their optimizer steps not applied): %s",
                    outcome.skip_batches,
                    outcome.command.reason if outcome.command else "the recovery recipe",
                )
        if outcome.halted:
            self.halt = outcome
            log.error("the governor halted the run: %s", outcome.command.reason if outcome.command else "")
        return outcome

    def finish(self) -> None:
        """The fit ended normally: settle (if asked), then close COMPLETED, or HALTED after a halt."""
        if not self._open:
            return
        governed = self.governed
        assert governed is not None
        try:
            if self.settle_at_end and self.halt is None:
                outcome = self.react(governed.settle())
                if outcome.restored:
                    log.warning(
                        "the last validations were rolled back as the fit ended: the model holds the "
                        "last-known-good weights of step %s",
                        outcome.restored_step,
                    )
        except BaseException as exc:
            self.fail(exc)
            raise
        if self.halt is not None:
            command = self.halt.command
            self.close(FinishStatus.HALTED, f"halted by the governor: {command.reason if command else ''}")
        else:
            self.close(FinishStatus.COMPLETED)

    def fail(self, exc: BaseException) -> None:
        """The fit raised ``exc``: close with the status it means (as ``GovernedTraining.__exit__`` does)."""
        if isinstance(exc, RunHalted):
            self.close(FinishStatus.HALTED, str(exc))
        elif isinstance(exc, GovernorUnreachable | GovernorRefused):
            self.close(None, str(exc))  # the governor is not told (nor waited for)
        else:
            self.close(FinishStatus.FAILED, f"{type(exc).__name__}: {exc}")

    def abandon(self) -> None:
        """The process exits (or the callback is collected) with the fit still open: its framework never said
        how it ended (an exception inside the trainer's loop, say). Tell the governor it failed."""
        self.close(FinishStatus.FAILED, "training ended without its end hook (an exception in the trainer?)", 5.0)

    def close(self, status: FinishStatus | None, message: str = "", flush_timeout_s: float | None = None) -> None:
        """Close the fit's GovernedTraining (once)."""
        if not self._open:
            return
        self._open = False
        assert self.governed is not None
        self.governed.close(status, message, flush_timeout_s)


def loss_of(output: Any) -> torch.Tensor | None:
    """The loss in a model's or a training step's output: a tensor, ``output["loss"]`` or ``output.loss``."""
    if isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def total_grad_norm(optimizers: Sequence[torch.optim.Optimizer]) -> torch.Tensor | None:
    """The total 2-norm of the gradients the optimizers hold (a device tensor: no host sync), or None."""
    grads = [p.grad for opt in optimizers for group in opt.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None
