"""Small builders for trainer unit tests: a real model on the synthetic task."""

from __future__ import annotations

import torch

from tolaria_trainer.model import create_model
from tolaria_trainer.tasks import get_task
from tolaria_trainer.training import TrainingState, VitalsBuffer, adam, train_epoch_normal


def make_state(optimizer: str = "adam", scheduler: bool = True, seed: int = 0) -> TrainingState:
    """A TrainingState on the synthetic task with the chosen optimizer and a StepLR scheduler."""
    torch.manual_seed(seed)
    task = get_task("synthetic")
    model = create_model(task, "cpu")
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if scheduler else None
    return TrainingState(
        model, opt, torch.device("cpu"), adam(1e-2), scheduler=sched, generator=torch.Generator().manual_seed(seed)
    )


def train_one_epoch(state: TrainingState) -> None:
    """One real epoch of the synthetic task (and a scheduler step)."""
    task = get_task("synthetic")
    data = task.load(None, 64, state.generator)
    train_epoch_normal(state, data.train, task.loss_fn(), VitalsBuffer(state.device, 32))
    if state.scheduler is not None:
        state.scheduler.step()
    state.epoch += 1


def snapshot_of(state: TrainingState) -> dict[str, object]:
    """Everything a restore must bring back, copied."""
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "optim": {
            pid: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for pid, s in state.host_optimizer.state_dict()["state"].items()
        },
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in state.host_optimizer.param_groups],
        "scheduler": dict(state.scheduler.state_dict()) if state.scheduler else None,
        "rng": torch.get_rng_state().clone(),
        "generator": state.generator.get_state().clone(),
        "step": state.step,
        "epoch": state.epoch,
    }


def assert_bitwise_equal(a: dict[str, object], b: dict[str, object]) -> None:
    """Every tensor equal bit for bit, every other value equal."""
    assert a.keys() == b.keys()
    for key in a:
        _equal(a[key], b[key], key)


def _equal(x: object, y: object, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor), where
        assert x.dtype == y.dtype, where
        assert torch.equal(x, y), f"{where} differs"
    elif isinstance(x, dict):
        assert isinstance(y, dict), where
        assert x.keys() == y.keys(), where
        for k in x:
            _equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list):
        assert isinstance(y, list), where
        assert len(x) == len(y), where
        for i, (p, q) in enumerate(zip(x, y, strict=True)):
            _equal(p, q, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"
