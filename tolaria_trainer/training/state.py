"""TrainingState: everything one rank trains with, and the seed-lifecycle operations on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tolaria_trainer.model.host import MorphogeneticModel
from tolaria_trainer.model.seeds import SeedStage, seed_slots

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def adam(lr: float) -> OptimizerFactory:
    """Adam with learning rate ``lr`` (the default optimizer of hosts and seeds)."""
    return lambda params: torch.optim.Adam(params, lr=lr)


@dataclass
class TrainingState:
    """Model, optimizers, schedulers, RNG and counters of one rank: what a last-known-good snapshot holds.

    ``optimizers`` are the ones snapshotted and restored (for the morphogenetic host, its one host
    optimizer, which also covers fossilized seeds); each live seed has its own optimizer in
    ``seed_optimizers``, excluded from snapshots with the seed. ``extra_state`` is the user's own state
    (an object with ``state_dict``/``load_state_dict``, or a dict), restored with the rest. ``lr_scale``
    is the cumulative recovery_lr_scale of all rollbacks so far (never restored: it compounds).
    """

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    device: torch.device
    seed_optimizer_factory: OptimizerFactory | None = None
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None
    generator: torch.Generator | None = None
    extra_state: Any = None
    seed_optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    grad_sync: Callable[[list[nn.Parameter]], None] | None = None
    step: int = 0
    epoch: int = 0
    epochs_run: int = 0
    timeline: int = 0
    lr_scale: float = 1.0
    skip_batches: int = 0

    def __post_init__(self) -> None:
        if not self.optimizers:
            raise ValueError("a training state needs at least one optimizer")
        extra = self.extra_state
        stateful = hasattr(extra, "state_dict") and hasattr(extra, "load_state_dict")
        if extra is not None and not isinstance(extra, dict) and not stateful:
            raise TypeError(
                f"extra_state must be a dict or have state_dict() and load_state_dict(), got {type(extra).__name__}"
            )

    @property
    def host_optimizer(self) -> torch.optim.Optimizer:
        """The first snapshotted optimizer (the morphogenetic host's)."""
        return self.optimizers[0]

    @property
    def host(self) -> MorphogeneticModel:
        """The model as a morphogenetic host (seed lifecycle operations need one)."""
        if not isinstance(self.model, MorphogeneticModel):
            raise TypeError(f"seed lifecycle operations need a MorphogeneticModel, not {type(self.model).__name__}")
        return self.model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward (compiled when torch.compile is on)."""
        forward = self.forward if self.forward is not None else self.model
        return forward(x)

    def germinate(self, slot_name: str, blueprint: str) -> None:
        """Grow a seed in a slot and start womb-mode training (GERMINATED -> TRAINING)."""
        if self.seed_optimizer_factory is None:
            raise ValueError("germinating a seed needs a seed_optimizer_factory")
        slot = self.host.slot(slot_name)
        seed = slot.germinate(blueprint)
        self.seed_optimizers[slot_name] = self.seed_optimizer_factory(list(seed.parameters()))
        slot.advance(SeedStage.TRAINING)

    def fossilize(self, slot_name: str) -> None:
        """Make a seed permanent: its parameters join the host optimizer as a new param group."""
        slot = self.host.slot(slot_name)
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
        for slot in seed_slots(self.model):
            if slot.stage in stages and slot.name in self.seed_optimizers:
                chosen.append(self.seed_optimizers[slot.name])
        return chosen

    def learning_rate(self) -> float:
        """Learning rate of the host optimizer's first group (a Python float: no device sync)."""
        return float(self.optimizers[0].param_groups[0]["lr"])  # not through the property: once per step


def enable_compile(state: TrainingState, backend: str = "inductor") -> None:
    """Run the model's forward (and so the train step's graph) through torch.compile.

    Stage changes of a seed slot retrace the graph once; the eager module stays ``state.model`` for
    snapshots and restores, which share its parameters with the compiled forward.
    """
    state.forward = torch.compile(state.model, backend=backend, dynamic=False)
