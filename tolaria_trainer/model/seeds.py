"""Seeds: small modules grown in a host network's slots, and their lifecycle.

DORMANT -> GERMINATED -> TRAINING -> BLENDING -> PROBATIONARY -> FOSSILIZED, or CULLED from any live
stage. A slot's seed is a residual adapter on the slot's host features ``h``:

- TRAINING ("womb mode"): ``h + (d - d.detach())`` with ``d = seed(h.detach())``. The forward value
  equals the host's exactly; the seed still gets gradients; the host never sees the seed.
- BLENDING: ``h + alpha * seed(h)``, alpha following a schedule towards 1.
- PROBATIONARY and FOSSILIZED: ``h + seed(h)``. A fossilized seed is part of the model.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tolaria_trainer.errors import StageTransitionError


class SeedStage(enum.StrEnum):
    """Lifecycle stages of a seed slot."""

    DORMANT = "DORMANT"
    GERMINATED = "GERMINATED"
    TRAINING = "TRAINING"
    BLENDING = "BLENDING"
    PROBATIONARY = "PROBATIONARY"
    FOSSILIZED = "FOSSILIZED"
    CULLED = "CULLED"


LIVE_STAGES = frozenset({SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY})
"""Stages of an experimental seed: excluded from snapshots, culled by a rollback."""

ALLOWED: dict[SeedStage, frozenset[SeedStage]] = {
    SeedStage.DORMANT: frozenset({SeedStage.GERMINATED}),
    SeedStage.GERMINATED: frozenset({SeedStage.TRAINING, SeedStage.CULLED}),
    SeedStage.TRAINING: frozenset({SeedStage.BLENDING, SeedStage.CULLED}),
    SeedStage.BLENDING: frozenset({SeedStage.PROBATIONARY, SeedStage.CULLED}),
    SeedStage.PROBATIONARY: frozenset({SeedStage.FOSSILIZED, SeedStage.CULLED}),
    SeedStage.FOSSILIZED: frozenset(),
    SeedStage.CULLED: frozenset({SeedStage.GERMINATED}),
}


def _zero_last(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def residual_blueprint(dim: int) -> nn.Module:
    """Bottleneck MLP (dim -> dim/2 -> dim), last layer zero-initialised so it starts as identity."""
    hidden = max(4, dim // 2)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), _zero_last(nn.Linear(hidden, dim)))


def lowrank_blueprint(dim: int) -> nn.Module:
    """Rank-8 linear adapter (dim -> 8 -> dim), second factor zero-initialised."""
    return nn.Sequential(nn.Linear(dim, 8, bias=False), _zero_last(nn.Linear(8, dim)))


def gated_blueprint(dim: int) -> nn.Module:
    """A feature-wise gate: sigmoid(W h) * (V h), V zero-initialised."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(dim, dim)
            self.value = _zero_last(nn.Linear(dim, dim))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = torch.sigmoid(self.gate(h)) * self.value(h)
            return out

    return Gated()


BLUEPRINTS: dict[str, Callable[[int], nn.Module]] = {
    "residual": residual_blueprint,
    "lowrank": lowrank_blueprint,
    "gated": gated_blueprint,
}


@runtime_checkable
class SeedSlotProtocol(Protocol):
    """The seam between a host network and its seeds."""

    name: str
    stage: SeedStage
    alpha: float
    blueprint: str

    def germinate(self, blueprint: str) -> nn.Module:
        """Create a seed from a named blueprint; returns it (its parameters need an optimizer)."""
        ...

    def advance(self, stage: SeedStage) -> None:
        """Move to ``stage`` if the lifecycle allows it; raises StageTransitionError otherwise."""
        ...

    def cull(self, reason: str) -> None:
        """Remove a live seed; the slot keeps the reason."""
        ...

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Slot output for host features ``h``."""
        ...


def seed_slots(model: nn.Module) -> list[SeedSlotProtocol]:
    """The seed slots of a model that has them (a ``seed_slots()`` method returning SeedSlotProtocol
    objects, like MorphogeneticModel), else none: any model can be governed; seeds are culled on
    rollback only where they exist."""
    method = getattr(model, "seed_slots", None)
    return list(method()) if callable(method) else []


class SeedSlot(nn.Module):
    """A slot in the host network that can hold one seed. Implements SeedSlotProtocol."""

    def __init__(self, name: str, dim: int, checkpoint_seed: bool = False) -> None:
        super().__init__()
        self.name = name
        self.dim = dim
        self.stage = SeedStage.DORMANT
        self.alpha = 0.0
        self.blueprint = ""
        self.seed: nn.Module | None = None
        self.checkpoint_seed = checkpoint_seed
        self.cull_reason = ""

    @property
    def is_live(self) -> bool:
        """True for an experimental seed (excluded from snapshots)."""
        return self.stage in LIVE_STAGES

    def germinate(self, blueprint: str) -> nn.Module:
        """Create the seed; DORMANT or CULLED -> GERMINATED."""
        if blueprint not in BLUEPRINTS:
            raise StageTransitionError(
                f"slot {self.name}: unknown blueprint {blueprint!r}; known: {', '.join(sorted(BLUEPRINTS))}"
            )
        self._check(SeedStage.GERMINATED)
        reference = next(self.parameters(), None)
        seed = BLUEPRINTS[blueprint](self.dim)
        if reference is not None:
            seed = seed.to(reference.device)
        self.seed = seed
        self.blueprint = blueprint
        self.alpha = 0.0
        self.stage = SeedStage.GERMINATED
        return seed

    def advance(self, stage: SeedStage) -> None:
        """Move along the lifecycle; PROBATIONARY and FOSSILIZED set alpha to 1."""
        self._check(stage)
        self.stage = stage
        if stage in (SeedStage.PROBATIONARY, SeedStage.FOSSILIZED):
            self.alpha = 1.0

    def cull(self, reason: str) -> None:
        """Drop a live seed (no-op for a slot without one)."""
        if not self.is_live:
            return
        self.seed = None
        self.stage = SeedStage.CULLED
        self.alpha = 0.0
        self.cull_reason = reason

    def set_alpha(self, alpha: float) -> None:
        """Blend factor in [0, 1] (BLENDING only)."""
        if self.stage is not SeedStage.BLENDING:
            raise StageTransitionError(f"slot {self.name}: alpha is only set while BLENDING, not {self.stage}")
        self.alpha = min(1.0, max(0.0, float(alpha)))

    def _check(self, target: SeedStage) -> None:
        if target not in ALLOWED[self.stage]:
            allowed = ", ".join(sorted(ALLOWED[self.stage])) or "none"
            raise StageTransitionError(
                f"slot {self.name}: {self.stage} -> {target} is not allowed (from {self.stage}: {allowed})"
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Stage-dependent output; see the module docstring."""
        seed, stage = self.seed, self.stage
        if seed is None or stage in (SeedStage.DORMANT, SeedStage.GERMINATED, SeedStage.CULLED):
            return h
        if stage is SeedStage.TRAINING:
            detached = h.detach()
            if self.checkpoint_seed and torch.is_grad_enabled():
                delta = checkpoint(seed, detached, use_reentrant=False)
            else:
                delta = seed(detached)
            out: torch.Tensor = h + (delta - delta.detach())
        elif stage is SeedStage.BLENDING:
            out = h + self.alpha * seed(h)
        else:
            out = h + seed(h)
        return out

    def extra_repr(self) -> str:
        return f"name={self.name}, stage={self.stage}, blueprint={self.blueprint or '-'}, alpha={self.alpha:.3f}"
