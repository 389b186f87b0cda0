"""A snapshot's description in shared memory: the manifest and digest a published buffer set is sealed with,
and the checks a restarted process of the same (run, rank) makes before adopting the one it finds there.

The digest covers the manifest's header (identity, tensor table, pickled small state) and the segment's
bytes (``tolaria_trainer/shm.py``); adoption checks it before anything of the snapshot is unpickled.
"""

from __future__ import annotations

import io
import pickle
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tolaria_trainer.errors import SnapshotError
from tolaria_trainer.shm import (
    AdoptionRefused,
    Segment,
    ShmStore,
    decode_objects,
    digest_segment,
    dtype_name,
    dtype_of,
    encode_objects,
    manifest_header,
    tensor_views,
)
from tolaria_trainer.snapshot.buffers import BufferSet, OptimizerBuffers, snapshot_keys
from tolaria_trainer.training.state import TrainingState

if TYPE_CHECKING:
    from tolaria_trainer.snapshot import SnapshotInfo

_SMALL_FIELDS = ("cpu_rng", "generator", "cuda_rng", "python_rng", "numpy_rng", "schedulers", "scaler", "extra")


@dataclass
class Adoption:
    """A snapshot in shared memory checked for adoption (``LastKnownGood.prepare_adoption``)."""

    info: SnapshotInfo
    digest: str
    manifest: dict[str, Any]
    segment: Segment
    small: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer_tensors: list[torch.Tensor]
    started: float

    @property
    def step(self) -> int:
        return self.info.step

    def fill(self, target: BufferSet) -> None:
        """Make ``target`` hold this snapshot, its buffers viewing the adopted segment."""
        small = self.small
        rest = iter(self.optimizer_tensors)
        target.signature = small["signature"]
        target.model = self.model
        target.optimizers = [
            OptimizerBuffers(o["signature"], [next(rest) for _ in range(o["n"])], o["layout"], o["param_groups"])
            for o in small["optimizers"]
        ]
        for name in _SMALL_FIELDS:
            setattr(target, name, small[name])
        target.info, target.digest, target.manifest = self.info, self.digest, dict(self.manifest)


def seal(store: ShmStore, index: int, target: BufferSet) -> None:
    """Describe buffer set ``index`` (just published, in ``store``'s segment ``index``) by the manifest it
    would get and digest it, once its copies have completed (a pinned set's copies were queued on the CUDA
    stream); sets ``target.digest`` and ``target.manifest``."""
    info = target.info
    assert info is not None
    if info.location == "pinned" and torch.cuda.is_available():
        torch.cuda.synchronize()
    segment = store.segments[index]
    buffer = io.BytesIO()
    try:
        torch.save(_small_state(target, info), buffer)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"the snapshot's small state cannot be written to shared memory: {exc}") from exc
    manifest = {
        "run_id": store.run_id,
        "rank": store.rank,
        "timeline": info.timeline,
        "step": info.step,
        "epoch": info.epoch,
        "kind": info.kind,
        "location": info.location,
        "tensors": _tensor_table(target, segment),
        "objects": encode_objects(buffer.getvalue()),
        "segment_bytes": segment.size,
    }
    target.digest = digest_segment(manifest_header(manifest), segment.view())
    target.manifest = {**manifest, "digest": target.digest}


def _tensor_table(target: BufferSet, segment: Segment) -> list[dict[str, Any]]:
    names = [f"model/{k}" for k in target.model] + [
        f"optimizer{n}/{j}" for n, o in enumerate(target.optimizers) for j in range(len(o.tensors))
    ]
    return [
        {"name": name, "offset": offset, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        for name, offset, t in zip(names, segment.offsets, target.tensors(), strict=True)
    ]


def _small_state(target: BufferSet, info: SnapshotInfo) -> dict[str, Any]:
    """What the manifest holds by value (pickled): everything of the set but its buffers."""
    return {
        "info": info,
        "signature": target.signature,
        "model_keys": list(target.model),
        "optimizers": [
            {"signature": o.signature, "layout": o.layout, "param_groups": o.param_groups, "n": len(o.tensors)}
            for o in target.optimizers
        ],
        **{name: getattr(target, name) for name in _SMALL_FIELDS},
    }


def prepare_adoption(store: ShmStore, state: TrainingState, expected: tuple[int, int, str] | None) -> Adoption:
    """Check the snapshot an earlier process of this (run, rank) left in ``store``: its manifest must name
    exactly ``expected`` (timeline, step, digest), its bytes must still have that digest (checked before
    anything of it is unpickled), and it must fit ``state``. Raises AdoptionRefused; changes nothing."""
    manifest = store.previous
    if manifest is None:
        raise AdoptionRefused(store.previous_error or "no snapshot was left in shared memory for this run and rank")
    where = f"the snapshot of step {manifest['step']} (timeline {manifest['timeline']}) in shared memory"
    _check_named(store, manifest, expected, where)
    started = time.perf_counter()
    segment = store.open_previous()
    digest = digest_segment(manifest_header(manifest), segment.view())
    if digest != manifest["digest"]:
        raise AdoptionRefused(f"{where}: its bytes do not match its digest (changed since it was published)")
    try:
        small = torch.load(io.BytesIO(decode_objects(manifest["objects"])), weights_only=False)
        specs = [(tuple(t["shape"]), dtype_of(t["dtype"])) for t in manifest["tensors"]]
    except (ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise AdoptionRefused(f"{where}: its small state is unreadable: {exc}") from exc
    tensors = tensor_views(segment.mapping, segment.size, segment.offsets, specs)
    keys = small["model_keys"]
    model = dict(zip(keys, tensors[: len(keys)], strict=True))
    _check_fits(state, model, small, where)
    return Adoption(small["info"], digest, manifest, segment, small, model, tensors[len(keys) :], started)


def _check_named(store: ShmStore, manifest: dict[str, Any], expected: tuple[int, int, str] | None, where: str) -> None:
    """Refuse a manifest of another (run, rank), or one that is not the snapshot the governor names."""
    if (manifest["run_id"], manifest["rank"]) != (store.run_id, store.rank):
        raise AdoptionRefused(f"{where} belongs to run {manifest['run_id']} rank {manifest['rank']}")
    if expected is None:
        raise AdoptionRefused(f"{where}: the governor names no published snapshot for this rank")
    found = (int(manifest["timeline"]), int(manifest["step"]), str(manifest["digest"]))
    if found != tuple(expected):
        raise AdoptionRefused(
            f"{where} is not the one the governor journaled as published: (timeline, step, digest) "
            f"{found} here, {tuple(expected)} there"
        )


def _check_fits(state: TrainingState, model: dict[str, torch.Tensor], small: dict[str, Any], where: str) -> None:
    """Refuse (AdoptionRefused) a snapshot that would not restore into ``state`` as it is."""
    model_sd = state.model.state_dict()
    keys = snapshot_keys(state.model)
    if sorted(keys) != sorted(model):
        raise AdoptionRefused(f"{where} holds other model tensors than this model: {len(model)} vs {len(keys)}")
    for key in keys:
        mine, theirs = model_sd[key], model[key]
        if tuple(mine.shape) != tuple(theirs.shape) or mine.dtype != theirs.dtype:
            raise AdoptionRefused(
                f"{where}: {key} is {tuple(theirs.shape)} {theirs.dtype} there, {tuple(mine.shape)} {mine.dtype} here"
            )
    optimizers = small["optimizers"]
    if len(optimizers) != len(state.optimizers):
        raise AdoptionRefused(f"{where} has {len(optimizers)} optimizers, this trainer {len(state.optimizers)}")
    for optimizer, saved in zip(state.optimizers, optimizers, strict=True):
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        if sizes != [len(g["params"]) for g in saved["param_groups"]]:
            raise AdoptionRefused(f"{where}: an optimizer's parameter groups differ ({sizes} here)")
    if len(small["schedulers"]) != len(state.schedulers):
        raise AdoptionRefused(
            f"{where} has {len(small['schedulers'])} schedulers, this trainer {len(state.schedulers)}"
        )
