"""LastKnownGood: the in-memory snapshot a ROLLBACK restores.

Contents: model state (for a model with seed slots, the host and fossilized seeds: live experimental
seeds are excluded, so a restore never resurrects them), every snapshotted optimizer's state, the LR
schedulers, the grad scaler, the user's extra state, RNG states (torch CPU and CUDA, the data
generator, Python's and NumPy's), and the step and epoch counters.

Buffers are preallocated and reused: one buffer set for the LKG and up to ``MAX_STAGED`` for staged
snapshots awaiting their verdicts, each reallocated only when the state's structure changes (a seed
fossilized) and allocated only when first used (a second staged set only when a verdict is slower
than a validation interval). ``stage`` copies the current state into a spare set (non_blocking on
CUDA, so the copies are ordered on the stream before the next optimizer step without a host sync);
``publish`` makes a staged set the LKG by swapping an index, so a staging that fails halfway leaves
the previous LKG intact; ``discard`` drops staged sets. Keeping an older staged snapshot while a
newer one is staged is what lets a slow daemon delay the LKG instead of preventing it. Locations:
``device`` (same device as the model), ``pinned`` (page-locked host memory, needs CUDA) and ``host``.

With a ``ShmStore`` (``tolaria_trainer/shm.py``) the host and pinned buffer sets live in named shared
memory: each published snapshot gets a digest, the newest one a manifest, and a restarted process of the
same (run, rank) can ``adopt`` it when the governor vouches for that digest.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import pickle
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tolaria_trainer.errors import RestoreError, SnapshotError
from tolaria_trainer.options import SNAPSHOT_LOCATIONS
from tolaria_trainer.shm import (
    AdoptionRefused,
    Segment,
    ShmStore,
    ShmUnavailable,
    decode_objects,
    digest_segment,
    dtype_name,
    dtype_of,
    encode_objects,
    manifest_header,
    tensor_views,
)
from tolaria_trainer.training.state import TrainingState

log = logging.getLogger("tolaria.snapshot")

LOCATIONS = SNAPSHOT_LOCATIONS
MAX_STAGED = 2  # staged validation snapshots held at once; staging another replaces the newest
KEEP_VALIDATED = 2  # published validated snapshots kept: the newest, and an older one for a recurrence


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot holds: its (timeline, step), size, and the LR scale in force when taken."""

    timeline: int
    step: int
    epoch: int
    lr_scale: float
    snapshot_bytes: int
    duration_ms: float
    location: str
    kind: str = "validation"  # "validation": published by a verdict (or taken at once); "step": by the train stream


@dataclass
class _OptimizerBuffers:
    """One optimizer's state: its tensors in preallocated buffers, the rest by value."""

    signature: tuple[Any, ...] = ()  # of the state it was allocated for, without the param-group sizes
    tensors: list[torch.Tensor] = field(default_factory=list)
    layout: dict[int, dict[str, Any]] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _BufferSet:
    signature: tuple[Any, ...] = ()
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizers: list[_OptimizerBuffers] = field(default_factory=list)
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

    def nbytes(self) -> int:
        tensors = [*self.model.values(), *(t for o in self.optimizers for t in o.tensors)]
        return sum(t.numel() * t.element_size() for t in tensors)


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


def _optimizer_signature(sd: dict[str, Any]) -> tuple[Any, ...]:
    """Shapes, dtypes and devices of an optimizer state dict's tensors, and its param-group sizes."""
    entries = tuple(
        (pid, key, tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else (pid, key)
        for pid in sorted(sd["state"])
        for key, v in sorted(sd["state"][pid].items())
    )
    return (*entries, len(sd["param_groups"]), tuple(len(g["params"]) for g in sd["param_groups"]))


class LastKnownGood:
    """Snapshots of a TrainingState: the published ones a restore can go back to, and staged ones awaiting
    their verdicts. Called from the training thread only.

    Published (each rests on a verdict and on the train stream vouching for it, except the base):

    - the **base**: the snapshot ``take`` published without a verdict (the initial state, or the state
      right after a seed fossilized, when older snapshots no longer fit the model); kept until the next
      ``take``, so a restore always has a snapshot older than any anomaly;
    - the newest ``KEEP_VALIDATED`` validated snapshots (a validation verdict published them): a ROLLBACK
      without an onset restores the newest, a recurrence an older one;
    - up to ``step_snapshots`` step snapshots newer than the newest validated one (kind "step").

    ``restore`` goes back to the newest validated one, or with ``before_step`` to the newest published
    one older than that step (a train-stream alarm's onset; a recurrence's earlier restore point), never
    to one taken at or after it; the base always qualifies. Staged: up to ``MAX_STAGED`` validation
    snapshots and one step snapshot.
    """

    def __init__(self, location: str = "auto", step_snapshots: int = 0, store: ShmStore | None = None) -> None:
        if location not in LOCATIONS:
            raise SnapshotError(f"snapshot location must be one of {', '.join(LOCATIONS)}, got {location!r}")
        if step_snapshots < 0:
            raise SnapshotError(f"step_snapshots must be >= 0, got {step_snapshots}")
        self.requested = location
        self.step_snapshots = step_snapshots
        staged_step = 1 if step_snapshots else 0
        self._sets = [_BufferSet() for _ in range(1 + KEEP_VALIDATED + step_snapshots + MAX_STAGED + staged_step)]
        self._published: list[int] = []  # oldest first
        self._staged: list[int] = []  # oldest first
        self._base: int | None = None
        self.num_allocations = 0
        self.store = store  # shared memory for the host and pinned buffer sets (None: this process's memory)
        self._manifest_of: tuple[int, SnapshotInfo] | None = None  # the (set, snapshot) the manifest names
        self.digest_ms = 0.0  # time spent on the last digest

    # ----------------------------------------------------------------- locations

    def _location(self, device: torch.device) -> str:
        if self.requested == "auto":
            return "pinned" if device.type == "cuda" else "host"
        if self.requested == "pinned" and not torch.cuda.is_available():
            raise SnapshotError(
                "snapshot location 'pinned' needs CUDA (page-locked memory); use --snapshot-location host"
            )
        return self.requested

    def _empty_like(self, t: torch.Tensor, location: str) -> torch.Tensor:
        self.num_allocations += 1
        if location == "device":
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=location == "pinned")

    # ----------------------------------------------------------------- views

    @property
    def info(self) -> SnapshotInfo | None:
        """The newest published snapshot's info, or None."""
        return self._sets[self._published[-1]].info if self._published else None

    @property
    def published(self) -> list[SnapshotInfo]:
        """Every published snapshot's info, oldest first."""
        return [info for i in self._published if (info := self._sets[i].info) is not None]

    @property
    def staged_info(self) -> SnapshotInfo | None:
        """The newest staged (unpublished) snapshot's info, or None."""
        return self._sets[self._staged[-1]].info if self._staged else None

    # ----------------------------------------------------------------- taking

    def stage(self, state: TrainingState, kind: str = "validation") -> SnapshotInfo:
        """Copy the current state into a spare buffer set, keeping older staged snapshots; with
        ``MAX_STAGED`` validation snapshots (or one step snapshot) already staged, the newest of that kind
        is replaced.

        Raises SnapshotError; the published snapshots and the other staged ones are untouched either way.
        """
        started = time.perf_counter()
        if kind == "step" and not self.step_snapshots:
            raise SnapshotError("step snapshots are off (step_snapshots=0)")
        same_kind = [i for i in self._staged if (info := self._sets[i].info) is not None and info.kind == kind]
        if len(same_kind) == (MAX_STAGED if kind == "validation" else 1):
            self._sets[same_kind[-1]].info = None
            self._staged.remove(same_kind[-1])
        spare = next(i for i in range(len(self._sets)) if i not in self._published and i not in self._staged)
        target = self._sets[spare]
        target.info = None
        target.digest, target.manifest = "", None
        location = self._location(state.device)
        non_blocking = location in ("pinned", "device") and state.device.type == "cuda"
        model_sd = state.model.state_dict()
        keys = snapshot_keys(state.model)
        optim_sds = [optimizer.state_dict() for optimizer in state.optimizers]
        signature = (
            location,
            tuple((k, tuple(model_sd[k].shape), model_sd[k].dtype) for k in keys),
            tuple(_optimizer_signature(sd) for sd in optim_sds),
        )
        try:
            if target.signature != signature:
                self._allocate(spare, signature, model_sd, keys, optim_sds, location)
            with torch.no_grad():
                for key in keys:
                    self._copy(target.model[key], model_sd[key], non_blocking)
                for buffers, optim_sd in zip(target.optimizers, optim_sds, strict=True):
                    self._stage_optimizer(buffers, optim_sd, non_blocking)
            assert target.cpu_rng is not None
            target.cpu_rng.copy_(torch.get_rng_state())
            target.generator = state.generator.get_state() if state.generator is not None else None
            if state.device.type == "cuda":
                target.cuda_rng = torch.cuda.get_rng_state(state.device)
            target.python_rng = random.getstate()
            target.numpy_rng = np.random.get_state()
            target.schedulers = [copy.deepcopy(s.state_dict()) for s in state.schedulers]
            target.scaler = copy.deepcopy(state.scaler.state_dict()) if state.scaler else None
            target.extra = _extra_state_of(state.extra_state)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise SnapshotError(f"snapshot at step {state.step} failed: {exc}") from exc
        target.info = SnapshotInfo(
            timeline=state.timeline,
            step=state.step,
            epoch=state.epoch,
            lr_scale=state.lr_scale,
            snapshot_bytes=target.nbytes(),
            duration_ms=(time.perf_counter() - started) * 1000.0,
            location=location,
            kind=kind,
        )
        self._staged.append(spare)
        return target.info

    def _stage_optimizer(self, buffers: _OptimizerBuffers, optim_sd: dict[str, Any], non_blocking: bool) -> None:
        index = 0
        for pid in sorted(optim_sd["state"]):
            for key, value in sorted(optim_sd["state"][pid].items()):
                if isinstance(value, torch.Tensor):
                    self._copy(buffers.tensors[index], value, non_blocking)
                    index += 1
                else:
                    buffers.layout[pid][key] = ("value", copy.deepcopy(value))
        buffers.param_groups = [{k: copy.deepcopy(v) for k, v in g.items()} for g in optim_sd["param_groups"]]

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        """One tensor copy (a seam for tests that make a copy fail halfway)."""
        dst.copy_(src, non_blocking=non_blocking)

    def _allocate(
        self,
        slot: int,
        signature: tuple[Any, ...],
        model_sd: dict[str, torch.Tensor],
        keys: list[str],
        optim_sds: list[dict[str, Any]],
        location: str,
    ) -> None:
        target = self._sets[slot]
        target.signature = ()
        sources = [model_sd[k] for k in keys]
        target.optimizers = []
        for optim_sd in optim_sds:
            buffers = _OptimizerBuffers(signature=_optimizer_signature(optim_sd)[:-2])
            for pid in sorted(optim_sd["state"]):
                layout: dict[str, Any] = {}
                for key, value in sorted(optim_sd["state"][pid].items()):
                    if isinstance(value, torch.Tensor):
                        layout[key] = ("tensor", len(buffers.tensors))
                        buffers.tensors.append(value)  # the source for now; its buffer below
                        sources.append(value)
                    else:
                        layout[key] = ("value", None)
                buffers.layout[pid] = layout
            target.optimizers.append(buffers)
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
        target.model = dict(zip(keys, made[: len(keys)], strict=True))
        rest = iter(made[len(keys) :])
        for buffers in target.optimizers:
            buffers.tensors = [next(rest) for _ in buffers.tensors]
        target.cpu_rng = torch.empty_like(torch.get_rng_state())
        target.signature = signature

    def publish(self, timeline: int, step: int, kind: str = "validation") -> bool:
        """Publish the staged snapshot of exactly (timeline, step, kind), dropping the older staged snapshots
        of its kind; without one, leave everything and return False (a validation and a step snapshot of
        the same step are two snapshots: each is published only by what vouches for it). Then only the
        base, the newest ``KEEP_VALIDATED`` validated and the ``step_snapshots`` newest step snapshots
        newer than them stay published. Returns whether the snapshot is published now: False too for a step
        snapshot that a validated one of a step at least as new supersedes as it is published (nothing new is
        held, so nothing is to be reported)."""
        for index in self._staged:
            info = self._sets[index].info
            if info is None or (info.timeline, info.step, info.kind) != (timeline, step, kind):
                continue
            for older in list(self._staged):
                older_info = self._sets[older].info
                if older_info is not None and older_info.kind == info.kind and older_info.step < info.step:
                    self._drop(older)
            self._staged.remove(index)
            self._published.append(index)
            self._published.sort(key=lambda i: self._step_of(i))
            self._retain()
            if index not in self._published:
                return False
            self._seal(index)
            self._sync_manifest()
            return True
        return False

    def _retain(self) -> None:
        validated = [i for i in self._published if i != self._base and self._kind_of(i) == "validation"]
        for extra in validated[: max(0, len(validated) - KEEP_VALIDATED)]:
            self._drop(extra)
        newest = max((self._step_of(i) for i in self._published if self._kind_of(i) == "validation"), default=-1)
        steps = [i for i in self._published if self._kind_of(i) == "step"]
        for old in [i for i in steps if self._step_of(i) <= newest]:
            self._drop(old)  # a validated snapshot at least as new supersedes it
        steps = [i for i in self._published if self._kind_of(i) == "step"]
        for extra in steps[: max(0, len(steps) - self.step_snapshots)]:
            self._drop(extra)

    def _step_of(self, index: int) -> int:
        info = self._sets[index].info
        return -1 if info is None else info.step

    def _kind_of(self, index: int) -> str:
        info = self._sets[index].info
        return "" if info is None else info.kind

    def _drop(self, index: int) -> None:
        self._sets[index].info = None
        if index in self._staged:
            self._staged.remove(index)
        if index in self._published:
            self._published.remove(index)
        if index == self._base:
            self._base = None

    def discard(self, staged: SnapshotInfo | None = None) -> None:
        """Drop the staged snapshot ``staged`` names, or every staged one (the LKG stays)."""
        for index in list(self._staged):
            if staged is None or self._sets[index].info == staged:
                self._drop(index)

    def take(self, state: TrainingState) -> SnapshotInfo:
        """Stage and publish at once, as the new base: every older published snapshot is dropped (the
        initial LKG at step 0, and right after a fossilization, when older snapshots no longer fit)."""
        info = self.stage(state)
        for older in list(self._published):
            self._drop(older)
        self.publish(info.timeline, info.step, info.kind)
        self._base = self._published[-1]
        return info

    # ----------------------------------------------------------------- restoring

    def choose(
        self, onset_step: int | None = None, margin: int = 0, before_step: int | None = None
    ) -> SnapshotInfo | None:
        """The snapshot ``restore`` would go back to (``_choose``)."""
        chosen = self._choose(onset_step, margin, before_step)
        return None if chosen is None else self._sets[chosen].info

    def _choose(self, onset_step: int | None, margin: int, before_step: int | None = None) -> int | None:
        """Without ``onset_step``: the newest validated snapshot (older than ``before_step`` when one is).
        With it: the newest published one older than ``onset_step - margin``, else older than the onset;
        each also older than ``before_step`` (a recurrence) when one is. Never one taken at or after the
        onset: the base is the last resort (it always predates what it is the base of)."""
        if not self._published:
            return None
        bound = before_step if before_step is not None else math.inf
        if onset_step is None:
            validated = [i for i in self._published if self._kind_of(i) == "validation"]
            older = [i for i in validated if self._step_of(i) < bound]
            if older:
                return older[-1]
            return validated[-1] if validated else self._published[0]
        for limits in ((onset_step - margin, bound), (onset_step, bound), (onset_step - margin,), (onset_step,)):
            older = [i for i in self._published if self._step_of(i) < min(limits)]
            if older:
                return older[-1]
        return self._base if self._base is not None else self._published[0]

    def restore(
        self,
        state: TrainingState,
        onset_step: int | None = None,
        margin: int = 0,
        before_step: int | None = None,
    ) -> SnapshotInfo:
        """Restore a published snapshot (``choose``) into ``state`` in place (live seeds must already be
        culled); the published snapshots newer than it belong to the abandoned future and are dropped.

        Checks that the model's snapshot keys equal the snapshot's; raises RestoreError otherwise (the
        caller reports the failure; the daemon then HALTs the run). Does not touch ``state.timeline`` or
        ``state.lr_scale``.
        """
        chosen = self._choose(onset_step, margin, before_step)
        if chosen is None:
            raise RestoreError("no last-known-good snapshot has been published")
        source = self._sets[chosen]
        info = source.info
        assert info is not None
        model_sd = state.model.state_dict()
        keys = snapshot_keys(state.model)
        missing = sorted(set(source.model) - set(keys))
        unexpected = sorted(set(keys) - set(source.model))
        if missing or unexpected:
            raise RestoreError(
                f"model keys do not match the snapshot of step {info.step}: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            )
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
                    f"{len(state.optimizers)} optimizers now, "
                    f"{len(source.optimizers)} in the snapshot of step {info.step}"
                )
            for optimizer, buffers in zip(state.optimizers, source.optimizers, strict=True):
                self._restore_optimizer(optimizer, buffers, non_blocking)
        torch.set_rng_state(source.cpu_rng if source.cpu_rng is not None else torch.get_rng_state())
        if source.generator is not None and state.generator is not None:
            state.generator.set_state(source.generator.clone())
        if source.cuda_rng is not None:
            torch.cuda.set_rng_state(source.cuda_rng, state.device)
        if source.python_rng is not None:
            random.setstate(source.python_rng)
        if source.numpy_rng is not None:
            np.random.set_state(source.numpy_rng)
        for scheduler, saved in zip(state.schedulers, source.schedulers, strict=True):
            scheduler.load_state_dict(copy.deepcopy(saved))
        if state.scaler is not None and source.scaler is not None:
            state.scaler.load_state_dict(copy.deepcopy(source.scaler))
        _restore_extra_state(state.extra_state, source.extra)
        state.step, state.epoch = info.step, info.epoch
        for newer in [i for i in self._published if self._step_of(i) > info.step]:
            self._drop(newer)
        self._sync_manifest()
        return info

    # ----------------------------------------------------------------- shared memory

    def digest_of(self, info: SnapshotInfo) -> str:
        """The digest of a published snapshot ("" when it is not in shared memory)."""
        return next((self._sets[i].digest for i in self._published if self._sets[i].info == info), "")

    def _seal(self, index: int) -> None:
        """A set just published: describe it (the manifest it would get) and digest it, once its copies
        have completed (a pinned set's copies were queued on the CUDA stream)."""
        target = self._sets[index]
        info = target.info
        if self.store is None or info is None or index not in self.store.segments:
            return
        started = time.perf_counter()
        if info.location == "pinned" and torch.cuda.is_available():
            torch.cuda.synchronize()
        segment = self.store.segments[index]
        tensors = [*target.model.values(), *(t for o in target.optimizers for t in o.tensors)]
        names = [f"model/{k}" for k in target.model] + [
            f"optimizer{n}/{j}" for n, o in enumerate(target.optimizers) for j in range(len(o.tensors))
        ]
        table = [
            {"name": name, "offset": offset, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
            for name, offset, t in zip(names, segment.offsets, tensors, strict=True)
        ]
        small = {
            "info": info,
            "signature": target.signature,
            "model_keys": list(target.model),
            "optimizers": [
                {"signature": o.signature, "layout": o.layout, "param_groups": o.param_groups, "n": len(o.tensors)}
                for o in target.optimizers
            ],
            "cpu_rng": target.cpu_rng,
            "generator": target.generator,
            "cuda_rng": target.cuda_rng,
            "python_rng": target.python_rng,
            "numpy_rng": target.numpy_rng,
            "schedulers": target.schedulers,
            "scaler": target.scaler,
            "extra": target.extra,
        }
        buffer = io.BytesIO()
        try:
            torch.save(small, buffer)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"the snapshot's small state cannot be written to shared memory: {exc}") from exc
        manifest = {
            "run_id": self.store.run_id,
            "rank": self.store.rank,
            "timeline": info.timeline,
            "step": info.step,
            "epoch": info.epoch,
            "kind": info.kind,
            "location": info.location,
            "tensors": table,
            "objects": encode_objects(buffer.getvalue()),
            "segment_bytes": segment.size,
        }
        target.digest = digest_segment(manifest_header(manifest), segment.view())
        target.manifest = {**manifest, "digest": target.digest}
        self.digest_ms = (time.perf_counter() - started) * 1000.0

    def _sync_manifest(self) -> None:
        """Point the manifest at the newest published snapshot (after a publish, a take, a restore)."""
        if self.store is None or not self._published:
            return
        index = self._published[-1]
        target = self._sets[index]
        if target.manifest is None or target.info is None or self._manifest_of == (index, target.info):
            return
        self.store.write_manifest(index, target.manifest)
        self._manifest_of = (index, target.info)

    def adopt(self, state: TrainingState, expected: tuple[int, int, str] | None) -> SnapshotInfo:
        """``prepare_adoption`` then ``complete_adoption``: restore the snapshot an earlier process of this
        (run, rank) left in shared memory, or raise AdoptionRefused having changed nothing."""
        return self.complete_adoption(state, self.prepare_adoption(state, expected))

    def prepare_adoption(self, state: TrainingState, expected: tuple[int, int, str] | None) -> Adoption:
        """Check the snapshot an earlier process of this (run, rank) left in shared memory: its manifest must
        name exactly ``expected`` (timeline, step, digest: what the governor journaled as this rank's last
        published snapshot), its bytes must still have that digest (checked before anything of it is
        unpickled), and it must fit the model, optimizers and schedulers. Raises AdoptionRefused; changes
        nothing either way."""
        store = self.store
        if store is None:
            raise AdoptionRefused("snapshots are not in shared memory here")
        manifest = store.previous
        if manifest is None:
            raise AdoptionRefused(store.previous_error or "no snapshot was left in shared memory for this run and rank")
        where = f"the snapshot of step {manifest['step']} (timeline {manifest['timeline']}) in shared memory"
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
        self._check_fits(state, model, small, where)
        return Adoption(small["info"], digest, manifest, segment, small, model, tensors[len(keys) :], started)

    def complete_adoption(self, state: TrainingState, adoption: Adoption) -> SnapshotInfo:
        """Make a prepared snapshot the only published one (the base) and restore it into ``state``."""
        assert self.store is not None
        small = adoption.small
        spare = next(i for i in range(len(self._sets)) if i not in self._published and i not in self._staged)
        target = self._sets[spare]
        rest = iter(adoption.optimizer_tensors)
        target.signature = small["signature"]
        target.model = adoption.model
        target.optimizers = [
            _OptimizerBuffers(o["signature"], [next(rest) for _ in range(o["n"])], o["layout"], o["param_groups"])
            for o in small["optimizers"]
        ]
        for name in ("cpu_rng", "generator", "cuda_rng", "python_rng", "numpy_rng", "schedulers", "scaler", "extra"):
            setattr(target, name, small[name])
        target.info, target.digest, target.manifest = adoption.info, adoption.digest, dict(adoption.manifest)
        self.store.attach(spare, adoption.segment, pinned=adoption.info.location == "pinned")
        self.store.previous = None
        for older in list(self._published):
            self._drop(older)
        self._published.append(spare)
        self._base = spare
        self._manifest_of = (spare, adoption.info)
        restored = self.restore(state)
        self.digest_ms = (time.perf_counter() - adoption.started) * 1000.0
        return restored

    def _check_fits(
        self, state: TrainingState, model: dict[str, torch.Tensor], small: dict[str, Any], where: str
    ) -> None:
        """Refuse (AdoptionRefused) a snapshot that would not restore into ``state`` as it is."""
        model_sd = state.model.state_dict()
        keys = snapshot_keys(state.model)
        if sorted(keys) != sorted(model):
            raise AdoptionRefused(f"{where} holds other model tensors than this model: {len(model)} vs {len(keys)}")
        for key in keys:
            mine, theirs = model_sd[key], model[key]
            if tuple(mine.shape) != tuple(theirs.shape) or mine.dtype != theirs.dtype:
                raise AdoptionRefused(
                    f"{where}: {key} is {tuple(theirs.shape)} {theirs.dtype} there, "
                    f"{tuple(mine.shape)} {mine.dtype} here"
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

    def close(self, remove: bool) -> None:
        """Give up the shared memory: remove the segment set (the run finished) or leave it for a restart."""
        if self.store is not None:
            if remove:
                self.store.remove()
            else:
                self.store.detach()

    def _restore_optimizer(
        self, optimizer: torch.optim.Optimizer, source: _OptimizerBuffers, non_blocking: bool
    ) -> None:
        current = optimizer.state_dict()
        if len(current["param_groups"]) != len(source.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(current["param_groups"], source.param_groups, strict=True)
        ):
            raise RestoreError("the optimizer's parameter groups changed since the snapshot")
        same_layout = _optimizer_signature(current)[:-2] == source.signature
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


def _extra_state_of(extra: Any) -> Any:
    """A deep copy of the user's extra state (a dict, or an object's ``state_dict()``)."""
    if extra is None:
        return None
    return copy.deepcopy(extra if isinstance(extra, dict) else extra.state_dict())


def _restore_extra_state(extra: Any, saved: Any) -> None:
    """Put a saved extra state back in place (the user's dict object stays the same object)."""
    if extra is None or saved is None:
        return
    if isinstance(extra, dict):
        extra.clear()
        extra.update(copy.deepcopy(saved))
    else:
        extra.load_state_dict(copy.deepcopy(saved))
