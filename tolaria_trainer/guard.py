"""StepGuard: no optimizer step on a known-bad batch, decided on the trainer at once.

The governor's ROLLBACK for a non-finite loss takes a round trip; until it is executed, an optimizer step on
non-finite gradients would write NaN into the weights and the optimizer state (and everything trained from
there). As ``torch.amp.GradScaler`` does for overflowed fp16 gradients, the guard skips such a step:
``GovernedTraining`` wraps each governed optimizer's ``step`` (an instance attribute; ``uninstall`` puts the
original back). It also skips the updates of the batches a restore asked to skip (``state.skip_batches``)
when the loop did not skip them in its data (``GovernedTraining.take_skip``).

How it decides, per device:

- CPU: it computes the gradients' total norm and reads it (no device to sync with) and does not call the
  optimizer's ``step`` when it is not finite (``num_non_finite_skipped`` counts them; on CUDA nothing is
  counted, since counting would read the device);
- CUDA, an optimizer that takes a ``found_inf`` tensor (the fused Adam, AdamW, SGD): the step runs with
  ``found_inf`` set on the device, and the optimizer skips its own update there, with no host sync;
- CUDA, any other optimizer: without a host sync it cannot skip, so it zeroes the gradients of a
  non-finite step on the device instead: the weights and the optimizer's moments stay finite, and the
  governor's ROLLBACK follows at the next step (a single rank) or agreement point. Use ``fused=True`` for
  a true skip.

The norm it computes is the one ``GovernedTraining.step`` reports by default (computed once per step).
With a GradScaler the guard is not installed: the scaler already skips non-finite steps.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tolaria_trainer.training.state import TrainingState

log = logging.getLogger("tolaria.guard")

Step = Callable[..., Any]


class StepGuard:
    """Guards the optimizers of one TrainingState. Training thread only."""

    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self._originals: dict[int, tuple[torch.optim.Optimizer, Step]] = {}
        self.norms: dict[int, torch.Tensor] = {}  # optimizer id -> its gradients' norm at its last step
        self.num_non_finite_skipped = 0  # steps not applied (or applied with zeroed gradients) for a bad norm
        self.num_skipped_updates = 0  # steps not applied because a restore asked to skip their batches
        self._warned_zeroing = False

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``optimizer.step`` (once)."""
        if id(optimizer) in self._originals:
            return
        original: Step = optimizer.step
        self._originals[id(optimizer)] = (optimizer, original)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            return self._step(optimizer, original, args, kwargs)

        # Keeps what wrappers set on it (an LR scheduler marks the step it counts calls of).
        functools.update_wrapper(guarded, original)
        optimizer.step = guarded  # type: ignore[method-assign]

    def uninstall(self) -> None:
        """Put every original ``step`` back."""
        for optimizer, original in self._originals.values():
            if "step" in vars(optimizer):
                optimizer.step = original  # type: ignore[method-assign]
        self._originals.clear()

    def take_norm(self, optimizers: list[torch.optim.Optimizer]) -> torch.Tensor | None:
        """The total gradient norm of ``optimizers`` as their guarded steps measured it this step, or None if
        one of them did not step through the guard since the last call."""
        found = [self.norms.get(id(opt)) for opt in optimizers]
        self.norms.clear()
        norms = [n for n in found if n is not None]
        if len(norms) != len(found):
            return None
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

    # ----------------------------------------------------------------- the guarded step

    def _step(
        self, optimizer: torch.optim.Optimizer, original: Step, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        closure = kwargs.pop("closure", args[0] if args else None)
        loss = None
        if closure is not None:  # Lightning and other callers hand the forward and backward in as a closure
            with torch.enable_grad():
                loss = closure()

        def apply() -> Any:
            return original(**kwargs) if closure is None else original(closure=lambda: loss, **kwargs)

        if self.state.skip_batches > 0:
            self.num_skipped_updates += 1
            self.norms.pop(id(optimizer), None)
            return loss
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return apply()
        norm = torch.nn.utils.get_total_norm(grads)
        self.norms[id(optimizer)] = norm
        if norm.device.type != "cuda":
            if not bool(torch.isfinite(norm)):  # a host value already: no device to wait for
                self.num_non_finite_skipped += 1
                return loss
            return apply()
        bad = ~torch.isfinite(norm)
        if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
            optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
            try:
                return apply()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
        if not self._warned_zeroing:
            self._warned_zeroing = True
            log.info(
                "%s on CUDA cannot skip a step without a host sync: a non-finite step's gradients are zeroed on "
                "the device instead (fused=True skips it)",
                type(optimizer).__name__,
            )
        torch._foreach_mul_(grads, (~bad).to(grads[0].dtype))
        for grad in grads:  # 0 x NaN is NaN
            grad.nan_to_num_(0.0, 0.0, 0.0)
        return apply()


def install_step_guard(state: TrainingState) -> StepGuard:
    """A StepGuard on every optimizer of ``state``, and on each one its seed optimizer factory makes later."""
    guard = StepGuard(state)
    for optimizer in state.optimizers:
        guard.install(optimizer)
    factory = state.seed_optimizer_factory
    if factory is not None:

        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            optimizer = factory(params)
            guard.install(optimizer)
            return optimizer

        state.seed_optimizer_factory = make
    return guard
