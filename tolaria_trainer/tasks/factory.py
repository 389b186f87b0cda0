"""create_model: the task's host network on a validated device."""

from __future__ import annotations

import torch

from tolaria_trainer.device import parse_device
from tolaria_trainer.model.host import MorphogeneticModel
from tolaria_trainer.tasks.spec import TaskSpec


def create_model(
    task: TaskSpec, device: str | torch.device = "cpu", num_outputs: int | None = None, checkpoint_seeds: bool = False
) -> MorphogeneticModel:
    """Build ``task``'s model and move it to ``device`` (validated: raises DeviceError with the fix)."""
    target = device if isinstance(device, torch.device) else parse_device(device)
    model = task.build_model(num_outputs or task.num_outputs, checkpoint_seeds)
    return model.to(target)
