"""TaskSpec: what a task gives the trainer (data, model, loss, random-guess loss)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from tolaria_trainer.model.host import MorphogeneticModel

Loader = DataLoader[tuple[torch.Tensor, ...]]
"""Batches of (inputs, targets)."""


@dataclass(frozen=True)
class TaskData:
    """Loaders and the output size (classes or vocabulary)."""

    train: Loader
    val: Loader
    num_outputs: int
    description: str


@dataclass(frozen=True)
class TaskSpec:
    """A named task. ``load`` reads or makes the data; ``build_model`` makes the host network."""

    name: str
    description: str
    num_outputs: int
    is_language_model: bool
    load: Callable[[Path | None, int, torch.Generator], TaskData]
    build_encoder: Callable[[int], tuple[nn.Module, int]]
    hidden_dim: int = 128
    num_blocks: int = 2

    def build_model(self, num_outputs: int, checkpoint_seeds: bool = False) -> MorphogeneticModel:
        """A fresh host network for ``num_outputs`` outputs."""
        encoder, encoded_dim = self.build_encoder(num_outputs)
        return MorphogeneticModel(encoder, encoded_dim, self.hidden_dim, num_outputs, self.num_blocks, checkpoint_seeds)

    @staticmethod
    def random_guess_loss(num_outputs: int) -> float:
        """Cross-entropy of a uniform guess over ``num_outputs`` outcomes: ln(num_outputs)."""
        return math.log(num_outputs)

    @staticmethod
    def loss_fn() -> nn.Module:
        """Mean cross-entropy over the batch."""
        return nn.CrossEntropyLoss()


def make_loaders(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[Loader, Loader]:
    """Shuffled train loader (driven by ``generator``, so its state can be snapshotted) and a val loader."""
    from torch.utils.data import TensorDataset

    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True, generator=generator)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=max(batch_size, 256), shuffle=False)
    return train, val
