"""Epoch functions: normal, womb mode, blended; and validation with one host sync.

Each train function runs one pass over the loader (minus ``state.skip_batches`` after a restore),
stepping the optimizers its stage trains, and hands each step's loss and gradient norm (device
tensors) to a step hook: ``GovernedTraining.step`` under the governor, ``step_recorder`` in tests.
Inputs move with non_blocking and gradients are zeroed with set_to_none: the loop never calls
``.item()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import nn

from tolaria_trainer.model.seeds import SeedStage
from tolaria_trainer.training.state import TrainingState

StepHook = Callable[[torch.Tensor, torch.Tensor], object]
"""Called after each optimizer step with its loss and gradient norm; it counts the step. A true result ends
the epoch there (a restore happened: the loop starts again from the restored epoch)."""
Batches = Iterable[tuple[torch.Tensor, ...]]


@dataclass
class EpochStats:
    """What a train epoch did."""

    num_steps: int = 0
    num_skipped: int = 0


def _total_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _run_epoch(
    state: TrainingState,
    loader: Batches,
    loss_fn: nn.Module,
    on_step: StepHook,
    optimizers: list[torch.optim.Optimizer],
) -> EpochStats:
    stats = EpochStats()
    state.model.train()
    batches = iter(loader)
    if state.skip_batches:  # a restore's skip, in the data: these batches are not even computed
        stats.num_skipped = sum(1 for _ in islice(batches, state.skip_batches))
        state.skip_batches = 0
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    device = state.device
    for batch in batches:
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(state(x), y)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            if state.grad_sync is not None:
                state.grad_sync(params)
            for opt in optimizers:
                state.scaler.unscale_(opt)
            grad_norm = _total_norm(params)
            for opt in optimizers:
                state.scaler.step(opt)
            state.scaler.update()
        else:
            loss.backward()
            if state.grad_sync is not None:
                state.grad_sync(params)
            grad_norm = _total_norm(params)
            for opt in optimizers:
                opt.step()
        stats.num_steps += 1
        if on_step(loss, grad_norm) is True:
            break
    return stats


def train_epoch_normal(state: TrainingState, loader: Batches, loss_fn: nn.Module, on_step: StepHook) -> EpochStats:
    """One epoch training the host (and fossilized seeds) only."""
    return _run_epoch(state, loader, loss_fn, on_step, [state.host_optimizer])


def train_epoch_womb_mode(state: TrainingState, loader: Batches, loss_fn: nn.Module, on_step: StepHook) -> EpochStats:
    """One epoch in which the host and every TRAINING seed step (the seeds learn on detached features)."""
    optimizers = state.trainable_optimizers(frozenset({SeedStage.TRAINING}))
    return _run_epoch(state, loader, loss_fn, on_step, optimizers)


def train_epoch_blended(state: TrainingState, loader: Batches, loss_fn: nn.Module, on_step: StepHook) -> EpochStats:
    """One epoch in which the host and every BLENDING or PROBATIONARY seed step at the slot's alpha."""
    optimizers = state.trainable_optimizers(frozenset({SeedStage.BLENDING, SeedStage.PROBATIONARY}))
    return _run_epoch(state, loader, loss_fn, on_step, optimizers)


@dataclass
class ValidationMetrics:
    """Validation (and optional train) metrics of one pass."""

    loss: float
    accuracy: float
    per_class_accuracy: list[float] = field(default_factory=list)
    perplexity: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None


def _accumulate(
    model: Callable[[torch.Tensor], torch.Tensor],
    batches: Batches,
    loss_fn: nn.Module,
    num_outputs: int,
    device: torch.device,
    per_class: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    hits = torch.zeros(num_outputs if per_class else 1, device=device, dtype=torch.float64)
    seen = torch.zeros_like(hits)
    for batch in batches:
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        correct = logits.argmax(dim=1) == y
        n = torch.full((), y.numel(), device=device, dtype=torch.float64)  # a fill kernel, not a host copy
        totals += torch.stack((loss.double() * n, correct.sum().double(), n))
        if per_class:
            hits += torch.bincount(y[correct], minlength=num_outputs).double()
            seen += torch.bincount(y, minlength=num_outputs).double()
    return totals, hits, seen


@torch.no_grad()
def validate_and_get_metrics(
    state: TrainingState,
    val_loader: Batches,
    loss_fn: nn.Module,
    num_outputs: int,
    is_language_model: bool = False,
    train_loader: Batches | None = None,
    train_batches: int = 0,
) -> ValidationMetrics:
    """Validation loss, accuracy, per-class accuracy (classification) or perplexity (LM).

    Accumulates on the device and reads the host once at the end. Train metrics are taken from the
    first ``train_batches`` batches of ``train_loader`` when given.
    """
    model = state.model
    model.eval()
    device = state.device
    totals, hits, seen = _accumulate(state, val_loader, loss_fn, num_outputs, device, not is_language_model)
    parts = [totals, hits, seen]
    if train_loader is not None and train_batches > 0:
        train_totals, _, _ = _accumulate(
            state, islice(train_loader, train_batches), loss_fn, num_outputs, device, False
        )
        parts.append(train_totals)
    host = torch.cat(parts).cpu().tolist()  # the one sync of the pass
    model.train()
    count = host[2] or 1.0
    loss = host[0] / count
    metrics = ValidationMetrics(loss=loss, accuracy=host[1] / count)
    if not is_language_model:
        k = len(hits)
        hit_counts, seen_counts = host[3 : 3 + k], host[3 + k : 3 + 2 * k]
        metrics.per_class_accuracy = [h / s if s else 0.0 for h, s in zip(hit_counts, seen_counts, strict=True)]
    else:
        metrics.perplexity = math.exp(loss) if loss < 700 else math.inf
    if len(parts) == 4:
        t = host[-3:]
        metrics.train_loss = t[0] / (t[2] or 1.0)
        metrics.train_accuracy = t[1] / (t[2] or 1.0)
    return metrics
