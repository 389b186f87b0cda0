"""TrainingState: everything one rank trains with, and the seed-lifecycle operations on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tolaria_trainer.model.host import MorphogeneticModel
from tolaria_trainer.model.seeds import SeedStage

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def adam(lr: float) -> OptimizerFactory:
    """Adam with learning rate ``lr`` (the default optimizer of hosts and seeds)."""
    return lambda params: torch.optim.Adam(params, lr=lr)


@dataclass
class TrainingState:
    """Model, optimizers, schedule state, RNG and counters of one rank.

    ``host_optimizer`` covers the host and fossilized seeds; each live seed has its own optimizer in
    ``seed_optimizers`` (excluded from snapshots with the seed). ``lr_scale`` is the cumulative
    recovery_lr_scale of all rollbacks so far (never restored: it compounds).
    """

    model: MorphogeneticModel
    host_optimizer: torch.optim.Optimizer
    device: torch.device
    seed_optimizer_factory: OptimizerFactory
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    seed_optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    grad_sync: Callable[[list[nn.Parameter]], None] | None = None
    step: int = 0
    epoch: int = 0
    epochs_run: int = 0
    timeline: int = 0
    lr_scale: float = 1.0
    skip_batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward (compiled when torch.compile is on)."""
        forward = self.forward if self.forward is not None else self.model
        return forward(x)

    def germinate(self, slot_name: str, blueprint: str) -> None:
        """Grow a seed in a slot and start womb-mode training (GERMINATED -> TRAINING)."""
        slot = self.model.slot(slot_name)
        seed = slot.germinate(blueprint)
        self.seed_optimizers[slot_name] = self.seed_optimizer_factory(list(seed.parameters()))
        slot.advance(SeedStage.TRAINING)

    def fossilize(self, slot_name: str) -> None:
        """Make a seed permanent: its parameters join the host optimizer as a new param group."""
        slot = self.model.slot(slot_name)
        if slot.stage is SeedStage.BLENDING:
            slot.advance(SeedStage.PROBATIONARY)
        slot.advance(SeedStage.FOSSILIZED)
        optimizer = self.seed_optimizers.pop(slot_name, None)
        if slot.seed is not None:
            group = {"params": list(slot.seed.parameters())}
            if optimizer is not None:
                group["lr"] = optimizer.param_groups[0]["lr"]
            self.host_optimizer.add_param_group(group)

    def drop_seed_optimizer(self, slot_name: str) -> None:
        """Forget the optimizer of a culled seed."""
        self.seed_optimizers.pop(slot_name, None)

    def trainable_optimizers(self, stages: frozenset[SeedStage]) -> list[torch.optim.Optimizer]:
        """The host optimizer plus the optimizers of seeds in ``stages``."""
        chosen = [self.host_optimizer]
        for slot in self.model.seed_slots():
            if slot.stage in stages and slot.name in self.seed_optimizers:
                chosen.append(self.seed_optimizers[slot.name])
        return chosen

    def learning_rate(self) -> float:
        """Learning rate of the host optimizer's first group (a Python float: no device sync)."""
        return float(self.host_optimizer.param_groups[0]["lr"])


def enable_compile(state: TrainingState, backend: str = "inductor") -> None:
    """Run the model's forward (and so the train step's graph) through torch.compile.

    Stage changes of a seed slot retrace the graph once; the eager module stays ``state.model`` for
    snapshots and restores, which share its parameters with the compiled forward.
    """
    state.forward = torch.compile(state.model, backend=backend, dynamic=False)
