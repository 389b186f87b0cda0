"""The morphogenetic host network: a task encoder, hidden blocks each followed by a seed slot, a head."""

from __future__ import annotations

import torch
from torch import nn

from tolaria_trainer.model.seeds import SeedSlot, SeedStage


class MorphogeneticModel(nn.Module):
    """encoder -> [Linear + ReLU -> SeedSlot] x num_blocks -> head.

    ``snapshot_keys`` excludes the parameters of live (experimental) seeds, so a snapshot never holds
    them and a rollback never resurrects them; fossilized seeds are included.
    """

    def __init__(
        self,
        encoder: nn.Module,
        encoded_dim: int,
        hidden_dim: int,
        num_outputs: int,
        num_blocks: int = 2,
        checkpoint_seeds: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(encoded_dim if i == 0 else hidden_dim, hidden_dim), nn.ReLU())
            for i in range(num_blocks)
        )
        self.slots = nn.ModuleList(SeedSlot(f"slot{i}", hidden_dim, checkpoint_seeds) for i in range(num_blocks))
        self.head = nn.Linear(hidden_dim, num_outputs)
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_outputs)."""
        h = self.encoder(x)
        for block, slot in zip(self.blocks, self.slots, strict=True):
            h = slot(block(h))
        out: torch.Tensor = self.head(h)
        return out

    def slot(self, name: str) -> SeedSlot:
        """The slot named ``name`` (slot0, slot1, ...)."""
        for slot in self.seed_slots():
            if slot.name == name:
                return slot
        raise KeyError(f"no seed slot {name!r}; slots: {', '.join(s.name for s in self.seed_slots())}")

    def seed_slots(self) -> list[SeedSlot]:
        """All slots, in order."""
        return [s for s in self.slots if isinstance(s, SeedSlot)]

    def live_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of live seeds."""
        return tuple(f"slots.{i}.seed." for i, s in enumerate(self.seed_slots()) if s.is_live)

    def snapshot_keys(self) -> list[str]:
        """State-dict keys that belong in a snapshot (host and fossilized seeds)."""
        live = self.live_prefixes()
        return [k for k in self.state_dict() if not k.startswith(live)] if live else list(self.state_dict())

    def seed_stages(self) -> dict[str, SeedStage]:
        """Stage per slot name."""
        return {s.name: s.stage for s in self.seed_slots()}

    def cull_live_seeds(self, reason: str) -> list[str]:
        """Cull every live seed; returns the slot names culled. A failing cull is reported, not raised."""
        culled = []
        for slot in self.seed_slots():
            if slot.is_live:
                slot.cull(reason)
                culled.append(slot.name)
        return culled
