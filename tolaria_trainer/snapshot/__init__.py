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

``LastKnownGood`` is the facade over: ``buffers`` (one snapshot's buffers, copy-in, allocation),
``ledger`` (which set is staged, published, the base; which one a restore picks),
``restore`` (copy-out into the TrainingState) and ``manifest`` (the digest and manifest in
shared memory, and the checks before adopting one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tolaria_trainer.errors import RestoreError, SnapshotError
from tolaria_trainer.options import SNAPSHOT_LOCATIONS
from tolaria_trainer.shm import AdoptionRefused, ShmStore
from tolaria_trainer.snapshot.buffers import (
    BufferAllocator,
    BufferSet,
    buffer_signature,
    snapshot_keys,
    weights_digest,
)
from tolaria_trainer.snapshot.ledger import KEEP_VALIDATED, MAX_STAGED, SnapshotLedger, sets_needed
from tolaria_trainer.snapshot.manifest import Adoption, prepare_adoption, seal
from tolaria_trainer.snapshot.restore import restore_into
from tolaria_trainer.training.state import TrainingState

__all__ = [
    "KEEP_VALIDATED",
    "LOCATIONS",
    "MAX_STAGED",
    "Adoption",
    "LastKnownGood",
    "SnapshotInfo",
    "snapshot_keys",
    "weights_digest",
]

LOCATIONS = SNAPSHOT_LOCATIONS


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

    Invariant: a staging that fails leaves every published snapshot as it was, and with a ``ShmStore`` the
    manifest names the newest published snapshot after every publish, take, restore and adoption.
    """

    def __init__(self, location: str = "auto", step_snapshots: int = 0, store: ShmStore | None = None) -> None:
        if location not in LOCATIONS:
            raise SnapshotError(f"snapshot location must be one of {', '.join(LOCATIONS)}, got {location!r}")
        if step_snapshots < 0:
            raise SnapshotError(f"step_snapshots must be >= 0, got {step_snapshots}")
        self._sets = [BufferSet() for _ in range(sets_needed(step_snapshots))]
        self._ledger = SnapshotLedger(self._sets, step_snapshots)
        self._allocator = BufferAllocator(location, store)
        self._manifest_of: tuple[int, SnapshotInfo] | None = None  # the (set, snapshot) the manifest names
        self.digest_ms = 0.0  # time spent on the last digest

    @property
    def step_snapshots(self) -> int:
        """Published step snapshots kept (0: step snapshots are off)."""
        return self._ledger.step_snapshots

    @property
    def requested(self) -> str:
        """The snapshot location asked for (``LOCATIONS``)."""
        return self._allocator.requested

    @property
    def store(self) -> ShmStore | None:
        """Shared memory for the host and pinned buffer sets (None: this process's memory)."""
        return self._allocator.store

    @property
    def num_allocations(self) -> int:
        """Buffers allocated so far."""
        return self._allocator.num_allocations

    # ----------------------------------------------------------------- views

    @property
    def info(self) -> SnapshotInfo | None:
        """The newest published snapshot's info, or None."""
        published = self._ledger.published
        return self._sets[published[-1]].info if published else None

    @property
    def published(self) -> list[SnapshotInfo]:
        """Every published snapshot's info, oldest first."""
        return [info for i in self._ledger.published if (info := self._sets[i].info) is not None]

    @property
    def staged_info(self) -> SnapshotInfo | None:
        """The newest staged (unpublished) snapshot's info, or None."""
        staged = self._ledger.staged
        return self._sets[staged[-1]].info if staged else None

    @property
    def _published(self) -> list[int]:  # the published sets' indices into _sets, oldest first (for tests)
        return self._ledger.published

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
        spare = self._ledger.make_room(kind)
        target = self._sets[spare]
        target.clear()
        location = self._allocator.location(state.device)
        non_blocking = location in ("pinned", "device") and state.device.type == "cuda"
        model_sd = state.model.state_dict()
        keys = snapshot_keys(state.model)
        optim_sds = [optimizer.state_dict() for optimizer in state.optimizers]
        signature = buffer_signature(location, model_sd, keys, optim_sds)
        try:
            if target.signature != signature:
                self._allocator.allocate(spare, target, signature, model_sd, keys, optim_sds, location)
            target.copy_in(state, model_sd, keys, optim_sds, non_blocking, self._copy)
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
        self._ledger.add_staged(spare)
        return target.info

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        """One tensor copy (a seam for tests that make a copy fail halfway)."""
        dst.copy_(src, non_blocking=non_blocking)

    def publish(self, timeline: int, step: int, kind: str = "validation") -> bool:
        """Publish the staged snapshot of exactly (timeline, step, kind), dropping the older staged snapshots
        of its kind; without one, leave everything and return False (a validation and a step snapshot of
        the same step are two snapshots: each is published only by what vouches for it). Then only the
        base, the newest ``KEEP_VALIDATED`` validated and the ``step_snapshots`` newest step snapshots
        newer than them stay published. Returns whether the snapshot is published now: False too for a step
        snapshot that a validated one of a step at least as new supersedes as it is published (nothing new is
        held, so nothing is to be reported)."""
        index = self._ledger.publish(timeline, step, kind)
        if index is None:
            return False
        self._seal(index)
        self._sync_manifest()
        return True

    def discard(self, staged: SnapshotInfo | None = None) -> None:
        """Drop the staged snapshot ``staged`` names, or every staged one (the LKG stays)."""
        self._ledger.discard(staged)

    def take(self, state: TrainingState) -> SnapshotInfo:
        """Stage and publish at once, as the new base: every older published snapshot is dropped (the
        initial LKG at step 0, and right after a fossilization, when older snapshots no longer fit)."""
        info = self.stage(state)
        self._ledger.drop_published()
        self.publish(info.timeline, info.step, info.kind)
        self._ledger.make_newest_base()
        return info

    # ----------------------------------------------------------------- restoring

    def choose(
        self, onset_step: int | None = None, margin: int = 0, before_step: int | None = None
    ) -> SnapshotInfo | None:
        """The snapshot ``restore`` would go back to (``SnapshotLedger.choose``)."""
        chosen = self._ledger.choose(onset_step, margin, before_step)
        return None if chosen is None else self._sets[chosen].info

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
        chosen = self._ledger.choose(onset_step, margin, before_step)
        if chosen is None:
            raise RestoreError("no last-known-good snapshot has been published")
        info = restore_into(state, self._sets[chosen])
        self._ledger.drop_newer_than(info.step)
        self._sync_manifest()
        return info

    # ----------------------------------------------------------------- shared memory

    def digest_of(self, info: SnapshotInfo) -> str:
        """The digest of a published snapshot ("" when it is not in shared memory)."""
        return next((self._sets[i].digest for i in self._ledger.published if self._sets[i].info == info), "")

    def _seal(self, index: int) -> None:
        """A set just published: describe it and digest it (``manifest.seal``), when it is in shared
        memory."""
        store = self.store
        if store is None or self._sets[index].info is None or index not in store.segments:
            return
        started = time.perf_counter()
        seal(store, index, self._sets[index])
        self.digest_ms = (time.perf_counter() - started) * 1000.0

    def _sync_manifest(self) -> None:
        """Point the manifest at the newest published snapshot (after a publish, a take, a restore)."""
        if self.store is None or not self._ledger.published:
            return
        index = self._ledger.published[-1]
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
        if self.store is None:
            raise AdoptionRefused("snapshots are not in shared memory here")
        return prepare_adoption(self.store, state, expected)

    def complete_adoption(self, state: TrainingState, adoption: Adoption) -> SnapshotInfo:
        """Make a prepared snapshot the only published one (the base) and restore it into ``state``."""
        assert self.store is not None
        spare = self._ledger.spare()
        adoption.fill(self._sets[spare])
        self.store.attach(spare, adoption.segment, pinned=adoption.info.location == "pinned")
        self.store.previous = None
        self._ledger.adopt_base(spare)
        self._manifest_of = (spare, adoption.info)
        restored = self.restore(state)
        self.digest_ms = (time.perf_counter() - adoption.started) * 1000.0
        return restored

    def close(self, remove: bool) -> None:
        """Give up the shared memory: remove the segment set (the run finished) or leave it for a restart."""
        if self.store is not None:
            if remove:
                self.store.remove()
            else:
                self.store.detach()
