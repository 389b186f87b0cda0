"""Putting a snapshot's buffer set back into a TrainingState, in place: model, optimizers, RNG states,
schedulers, grad scaler, the user's extra state, and the step and epoch counters."""

from __future__ import annotations

import copy
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tolaria_trainer.errors import RestoreError
from tolaria_trainer.snapshot.buffers import (
    BufferSet,
    OptimizerBuffers,
    optimizer_signature,
    snapshot_keys,
)
from tolaria_trainer.training.state import TrainingState

if TYPE_CHECKING:
    from tolaria_trainer.snapshot import SnapshotInfo


def restore_into(state: TrainingState, source: BufferSet) -> SnapshotInfo:
    """Restore ``source`` into ``state`` (live seeds must already be culled); returns its info.

    Raises RestoreError when the model's snapshot keys or shapes, or the optimizers, do not match the
    snapshot. Does not touch ``state.timeline`` or ``state.lr_scale``."""
    info = source.info
    assert info is not None
    model_sd = state.model.state_dict()
    keys = snapshot_keys(state.model)
    _check_keys(keys, source, info)
    non_blocking = state.device.type == "cuda"
    with torch.no_grad():
        for key in keys:
            if model_sd[key].shape != source.model[key].shape:
                raise RestoreError(
                    f"shape of {key} changed: {tuple(model_sd[key].shape)} vs {tuple(source.model[key].shape)}"
                )
            model_sd[key].copy_(source.model[key], non_blocking=non_blocking)
        if len(state.optimizers) != len(source.optimizers):
            raise RestoreError(
                f"{len(state.optimizers)} optimizers now, {len(source.optimizers)} in the snapshot of step {info.step}"
            )
        for optimizer, buffers in zip(state.optimizers, source.optimizers, strict=True):
            restore_optimizer(optimizer, buffers, non_blocking)
    _restore_rng(state, source)
    for scheduler, saved in zip(state.schedulers, source.schedulers, strict=True):
        scheduler.load_state_dict(copy.deepcopy(saved))
    if state.scaler is not None and source.scaler is not None:
        state.scaler.load_state_dict(copy.deepcopy(source.scaler))
    _restore_extra_state(state.extra_state, source.extra)
    state.step, state.epoch = info.step, info.epoch
    return info


def _check_keys(keys: list[str], source: BufferSet, info: SnapshotInfo) -> None:
    missing = sorted(set(source.model) - set(keys))
    unexpected = sorted(set(keys) - set(source.model))
    if missing or unexpected:
        raise RestoreError(
            f"model keys do not match the snapshot of step {info.step}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def _restore_rng(state: TrainingState, source: BufferSet) -> None:
    torch.set_rng_state(source.cpu_rng if source.cpu_rng is not None else torch.get_rng_state())
    if source.generator is not None and state.generator is not None:
        state.generator.set_state(source.generator.clone())
    if source.cuda_rng is not None:
        torch.cuda.set_rng_state(source.cuda_rng, state.device)
    if source.python_rng is not None:
        random.setstate(source.python_rng)
    if source.numpy_rng is not None:
        np.random.set_state(source.numpy_rng)


def restore_optimizer(optimizer: torch.optim.Optimizer, source: OptimizerBuffers, non_blocking: bool) -> None:
    """Put an optimizer's snapshotted state and hyper-parameters back: copied into its state tensors when
    their layout is the snapshot's, else loaded as a new state dict."""
    current = optimizer.state_dict()
    if len(current["param_groups"]) != len(source.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(current["param_groups"], source.param_groups, strict=True)
    ):
        raise RestoreError("the optimizer's parameter groups changed since the snapshot")
    same_layout = optimizer_signature(current)[:-2] == source.signature
    if same_layout:
        for pid, layout in source.layout.items():
            for key, (kind, value) in layout.items():
                if kind == "tensor":
                    current["state"][pid][key].copy_(source.tensors[value], non_blocking=non_blocking)
                else:
                    optimizer.state[_param_of(optimizer, pid)][key] = copy.deepcopy(value)
    else:  # e.g. back to step 0, before the optimizer had any state
        state: dict[int, dict[str, Any]] = {}
        for pid, layout in source.layout.items():
            state[pid] = {
                key: source.tensors[value].clone() if kind == "tensor" else copy.deepcopy(value)
                for key, (kind, value) in layout.items()
            }
        optimizer.load_state_dict({"state": state, "param_groups": copy.deepcopy(source.param_groups)})
        return
    for group, saved in zip(optimizer.param_groups, source.param_groups, strict=True):
        for key, value in saved.items():
            if key != "params":
                group[key] = copy.deepcopy(value)


def _param_of(optimizer: torch.optim.Optimizer, pid: int) -> torch.nn.Parameter:
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if index == pid:
                return param  # type: ignore[no-any-return]
            index += 1
    raise RestoreError(f"optimizer has no parameter {pid}")


def _restore_extra_state(extra: Any, saved: Any) -> None:
    """Put a saved extra state back in place (the user's dict object stays the same object)."""
    if extra is None or saved is None:
        return
    if isinstance(extra, dict):
        extra.clear()
        extra.update(copy.deepcopy(saved))
    else:
        extra.load_state_dict(copy.deepcopy(saved))
