"""One snapshot's storage: the preallocated buffers a TrainingState is copied into, and who makes them.

A ``BufferSet`` holds one snapshot: the model's snapshot tensors and every snapshotted optimizer's tensor
state in preallocated buffers, the rest (RNG states, schedulers, scaler, the user's extra state, optimizer
hyper-parameters) by value. ``BufferAllocator`` makes its buffers, in named shared memory when it has a
``ShmStore`` (host and pinned locations), else in this process's memory. Locations: ``device`` (same
device as the model), ``pinned`` (page-locked host memory, needs CUDA) and ``host``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tolaria_trainer.errors import SnapshotError
from tolaria_trainer.shm import ShmStore, ShmUnavailable
from tolaria_trainer.training.state import TrainingState

if TYPE_CHECKING:  # defined there: a snapshot in shared memory pickles it under that name
    from tolaria_trainer.snapshot import SnapshotInfo

log = logging.getLogger("tolaria.snapshot")

Copy = Callable[[torch.Tensor, torch.Tensor, bool], None]  # (dst, src, non_blocking): one tensor copy


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's snapshot tensors, key and bytes in ``snapshot_keys`` order."""
    digest = hashlib.sha256()
    model_sd = model.state_dict()
    for key in snapshot_keys(model):
        digest.update(key.encode())
        digest.update(model_sd[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def snapshot_keys(model: nn.Module) -> list[str]:
    """The state-dict keys a snapshot holds: the model's ``snapshot_keys()`` when it has one (a
    morphogenetic host leaves its live seeds out), else all of them."""
    method = getattr(model, "snapshot_keys", None)
    return list(method()) if callable(method) else list(model.state_dict())


def optimizer_signature(sd: dict[str, Any]) -> tuple[Any, ...]:
    """Shapes, dtypes and devices of an optimizer state dict's tensors, and its param-group sizes."""
    entries = tuple(
        (pid, key, tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else (pid, key)
        for pid in sorted(sd["state"])
        for key, v in sorted(sd["state"][pid].items())
    )
    return (*entries, len(sd["param_groups"]), tuple(len(g["params"]) for g in sd["param_groups"]))


def buffer_signature(
    location: str, model_sd: dict[str, torch.Tensor], keys: list[str], optim_sds: list[dict[str, Any]]
) -> tuple[Any, ...]:
    """The structure a buffer set is allocated for: its location, the model's snapshot tensors' shapes and
    dtypes, and every optimizer's ``optimizer_signature``."""
    return (
        location,
        tuple((k, tuple(model_sd[k].shape), model_sd[k].dtype) for k in keys),
        tuple(optimizer_signature(sd) for sd in optim_sds),
    )


@dataclass
class OptimizerBuffers:
    """One optimizer's state: its tensors in preallocated buffers, the rest by value."""

    signature: tuple[Any, ...] = ()  # of the state it was allocated for, without the param-group sizes
    tensors: list[torch.Tensor] = field(default_factory=list)
    layout: dict[int, dict[str, Any]] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)

    def copy_in(self, optim_sd: dict[str, Any], non_blocking: bool, copy_tensor: Copy) -> None:
        """Copy an optimizer state dict of the structure these buffers were allocated for into them."""
        index = 0
        for pid in sorted(optim_sd["state"]):
            for key, value in sorted(optim_sd["state"][pid].items()):
                if isinstance(value, torch.Tensor):
                    copy_tensor(self.tensors[index], value, non_blocking)
                    index += 1
                else:
                    self.layout[pid][key] = ("value", copy.deepcopy(value))
        self.param_groups = [{k: copy.deepcopy(v) for k, v in g.items()} for g in optim_sd["param_groups"]]


@dataclass
class BufferSet:
    """One snapshot's buffers and by-value state.

    Invariant: ``signature`` names the structure its buffers were allocated for (``()`` while none are), and
    ``info`` is set only while it holds a complete snapshot (a copy that failed halfway leaves it None)."""

    signature: tuple[Any, ...] = ()
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizers: list[OptimizerBuffers] = field(default_factory=list)
    cpu_rng: torch.Tensor | None = None
    generator: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    scaler: dict[str, Any] | None = None
    extra: Any = None
    python_rng: Any = None
    numpy_rng: Any = None
    info: SnapshotInfo | None = None
    digest: str = ""  # of the published snapshot in shared memory ("" when not in shared memory)
    manifest: dict[str, Any] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer: the model's in key order, then each optimizer's."""
        return [*self.model.values(), *(t for o in self.optimizers for t in o.tensors)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clear(self) -> None:
        """Forget the snapshot held (the buffers stay, to be written again)."""
        self.info = None
        self.digest, self.manifest = "", None

    def plan(
        self, model_sd: dict[str, torch.Tensor], keys: list[str], optim_sds: list[dict[str, Any]]
    ) -> list[torch.Tensor]:
        """Lay the optimizers' state out for a new allocation; returns the tensors to allocate buffers like
        (the model's in ``keys`` order, then each optimizer's), to be handed to ``hold``."""
        self.signature = ()
        sources = [model_sd[k] for k in keys]
        self.optimizers = []
        for optim_sd in optim_sds:
            buffers = OptimizerBuffers(signature=optimizer_signature(optim_sd)[:-2])
            for pid in sorted(optim_sd["state"]):
                layout: dict[str, Any] = {}
                for key, value in sorted(optim_sd["state"][pid].items()):
                    if isinstance(value, torch.Tensor):
                        layout[key] = ("tensor", len(buffers.tensors))
                        buffers.tensors.append(value)  # the source for now; its buffer in hold
                        sources.append(value)
                    else:
                        layout[key] = ("value", None)
                buffers.layout[pid] = layout
            self.optimizers.append(buffers)
        return sources

    def hold(self, keys: list[str], made: list[torch.Tensor], signature: tuple[Any, ...]) -> None:
        """Take the buffers made for ``plan``'s sources: the set is allocated for ``signature``."""
        self.model = dict(zip(keys, made[: len(keys)], strict=True))
        rest = iter(made[len(keys) :])
        for buffers in self.optimizers:
            buffers.tensors = [next(rest) for _ in buffers.tensors]
        self.cpu_rng = torch.empty_like(torch.get_rng_state())
        self.signature = signature

    def copy_in(
        self,
        state: TrainingState,
        model_sd: dict[str, torch.Tensor],
        keys: list[str],
        optim_sds: list[dict[str, Any]],
        non_blocking: bool,
        copy_tensor: Copy,
    ) -> None:
        """Copy ``state`` into the buffers (allocated for its structure) and keep the rest by value."""
        with torch.no_grad():
            for key in keys:
                copy_tensor(self.model[key], model_sd[key], non_blocking)
            for buffers, optim_sd in zip(self.optimizers, optim_sds, strict=True):
                buffers.copy_in(optim_sd, non_blocking, copy_tensor)
        assert self.cpu_rng is not None
        self.cpu_rng.copy_(torch.get_rng_state())
        self.generator = state.generator.get_state() if state.generator is not None else None
        if state.device.type == "cuda":
            self.cuda_rng = torch.cuda.get_rng_state(state.device)
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()
        self.schedulers = [copy.deepcopy(s.state_dict()) for s in state.schedulers]
        self.scaler = copy.deepcopy(state.scaler.state_dict()) if state.scaler else None
        self.extra = _extra_state_of(state.extra_state)


def _extra_state_of(extra: Any) -> Any:
    """A deep copy of the user's extra state (a dict, or an object's ``state_dict()``)."""
    if extra is None:
        return None
    return copy.deepcopy(extra if isinstance(extra, dict) else extra.state_dict())


class BufferAllocator:
    """Makes buffer sets' buffers where the snapshot location says.

    Invariant: host and pinned buffers live in the ``ShmStore`` while there is one; the first time it has no
    room it is removed and ``store`` is None from then on (snapshots stay in this process's memory).
    ``num_allocations`` counts every buffer made."""

    def __init__(self, requested: str, store: ShmStore | None) -> None:
        self.requested = requested
        self.store = store  # shared memory for the host and pinned buffer sets (None: this process's memory)
        self.num_allocations = 0

    def location(self, device: torch.device) -> str:
        """The location snapshots of a model on ``device`` go to."""
        if self.requested == "auto":
            return "pinned" if device.type == "cuda" else "host"
        if self.requested == "pinned" and not torch.cuda.is_available():
            raise SnapshotError(
                "snapshot location 'pinned' needs CUDA (page-locked memory); use --snapshot-location host"
            )
        return self.requested

    def allocate(
        self,
        slot: int,
        target: BufferSet,
        signature: tuple[Any, ...],
        model_sd: dict[str, torch.Tensor],
        keys: list[str],
        optim_sds: list[dict[str, Any]],
        location: str,
    ) -> None:
        """(Re)allocate buffer set ``slot`` (``target``) at ``location`` for the structure ``signature`` names."""
        sources = target.plan(model_sd, keys, optim_sds)
        made: list[torch.Tensor] = []
        if self.store is not None and location in ("host", "pinned"):
            specs = [(tuple(t.shape), t.dtype) for t in sources]
            try:
                made = self.store.allocate(slot, specs, pinned=location == "pinned")
                self.num_allocations += len(made)
            except ShmUnavailable as exc:
                log.warning("%s; snapshots stay in this process's memory from now on (a crash loses them)", exc)
                self.store.remove()
                self.store = None
        if not made:
            model_count = len(keys)
            made = [self._empty_like(t, location) for t in sources[:model_count]]
            made += [
                self._empty_like(t, "host" if t.device.type == "cpu" and location == "device" else location)
                for t in sources[model_count:]
            ]
        target.hold(keys, made, signature)

    def _empty_like(self, t: torch.Tensor, location: str) -> torch.Tensor:
        self.num_allocations += 1
        if location == "device":
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=location == "pinned")
