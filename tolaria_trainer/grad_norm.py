"""The gradient norm a governed step reports when the loop gives none, without a host sync."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tolaria_trainer.guard import StepGuard
from tolaria_trainer.training.state import TrainingState


class GradNorm:
    """The total norm of the optimizers' gradients (after any clipping), as ``GovernedTraining.step`` reports it.

    Invariant: with a grad scaler the norm is of the unscaled gradients, divided by the scale exactly once
    (whether the scaler unscaled them already, ``scaler.unscale_`` or ``scaler.step``, or not), and a step whose
    gradients overflowed (the scaler skips it) reports the last finite norm; nothing here reads the device.
    """

    def __init__(self, state: TrainingState, guard: StepGuard | None, device: torch.device) -> None:
        self.state = state
        self.guard = guard
        self.device = device
        # Optimizers whose gradients the scaler unscaled since the last step (``_watch_unscale``).
        self._unscaled: set[int] = set()
        self._last_finite_norm: torch.Tensor | None = None
        if state.scaler is not None:
            self._watch_unscale(state.scaler)

    def take(self) -> torch.Tensor:
        """The total norm of the optimizers' gradients. With a grad scaler, of the unscaled gradients (divided
        by the scale only when the scaler has not unscaled them since the last step: hardening 2 found the
        documented order, ``scaler.step`` then ``step``, divided twice), and a step whose gradients overflowed
        (the scaler skips it; that is its normal working) reports the last finite norm: no host sync either way."""
        norm = self.guard.take_norm(self.state.optimizers) if self.guard is not None else None
        if norm is None:
            norm = _total_grad_norm(self.state.optimizers, self.device)
        scaler = self.state.scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if scale is None:
            return norm
        if not all(id(opt) in self._unscaled for opt in self.state.optimizers):
            norm = norm / scale.to(norm.device)
        if self._last_finite_norm is None:
            self._last_finite_norm = torch.ones((), device=norm.device)
        norm = torch.where(torch.isfinite(norm), norm, self._last_finite_norm)
        self._last_finite_norm = norm
        return norm

    def close(self) -> None:
        """Take the grad scaler's methods back (``_watch_unscale``)."""
        if self.state.scaler is not None:
            vars(self.state.scaler).pop("unscale_", None)
            vars(self.state.scaler).pop("scale", None)

    def _watch_unscale(self, scaler: torch.amp.GradScaler) -> None:
        """Note each optimizer whose gradients ``scaler.unscale_`` divided by the scale (called by the user
        before clipping, or by ``scaler.step``), until ``scaler.scale`` scales a loss for the next backward:
        instance attributes over the two methods, removed at ``close``."""
        unscale_original, scale_original = scaler.unscale_, scaler.scale
        unscaled = self._unscaled

        def unscale_(optimizer: torch.optim.Optimizer) -> None:
            unscale_original(optimizer)
            unscaled.add(id(optimizer))

        def scale(outputs: Any) -> Any:
            unscaled.clear()  # the gradients of the backward that follows are scaled
            return scale_original(outputs)

        scaler.unscale_ = unscale_  # type: ignore[method-assign]
        scaler.scale = scale  # type: ignore[method-assign]


def _total_grad_norm(optimizers: Sequence[torch.optim.Optimizer], device: torch.device) -> torch.Tensor:
    grads = [p.grad for opt in optimizers for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads)
