"""GPU paths: pinned snapshots on CUDA and a training step with no host sync. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tolaria_trainer.snapshot import LastKnownGood
from tolaria_trainer.tasks import create_model, get_task
from tolaria_trainer.training import TrainingState, VitalsBuffer, adam, step_recorder, train_epoch_normal

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_state() -> tuple[TrainingState, object]:
    task = get_task("synthetic")
    model = create_model(task, "cuda")
    state = TrainingState(model, [torch.optim.Adam(model.parameters(), 1e-2)], torch.device("cuda"), adam(1e-2))
    return state, task


def test_pinned_snapshot_and_restore_on_cuda() -> None:
    """A pinned snapshot restores the CUDA model bit for bit."""
    state, task = cuda_state()
    data = task.load(None, 64, state.generator)  # type: ignore[attr-defined]
    train_epoch_normal(state, data.train, task.loss_fn(), step_recorder(state, VitalsBuffer(state.device)))  # type: ignore[attr-defined]
    lkg = LastKnownGood("pinned")
    lkg.take(state)
    expected = {k: v.clone() for k, v in state.model.state_dict().items()}
    train_epoch_normal(state, data.train, task.loss_fn(), step_recorder(state, VitalsBuffer(state.device)))  # type: ignore[attr-defined]
    lkg.restore(state)
    torch.cuda.synchronize()
    for key, value in expected.items():
        assert torch.equal(state.model.state_dict()[key], value), key


def test_training_step_has_no_host_sync() -> None:
    """Under sync debug mode 'error', a training epoch (data already on the GPU) raises nothing."""
    state, task = cuda_state()
    x = torch.randn(256, 16, device="cuda")
    y = torch.randint(0, 4, (256,), device="cuda")
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    vitals = VitalsBuffer(state.device, capacity=1000)
    train_epoch_normal(state, batches, task.loss_fn(), step_recorder(state, vitals))  # type: ignore[attr-defined]  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_epoch_normal(state, batches, task.loss_fn(), step_recorder(state, vitals))  # type: ignore[attr-defined]
    finally:
        torch.cuda.set_sync_debug_mode(0)
