"""Adopting what an earlier process of this run left: the last-known-good in shared memory, the run's timeline.

``last_known_good`` builds a rank's snapshot store as its options ask, in the segment set ``shm_store`` opens
for a snapshot to outlive its process; ``adopt_shared_snapshot`` is the
start-up step that takes one over (docs/protocol.md, "SnapshotAdopted"); ``adopt_run_timeline`` moves the
ranks to the timeline the governor names. Invariant: every rank adopts, or none does; the ranks that adopt go
on together on the same timeline, and the governor hears of a snapshot adopted (SnapshotAdopted) before any
record of the timeline after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tolaria_trainer.distributed import Distributed
from tolaria_trainer.governance import AdoptionReport, Governance
from tolaria_trainer.options import GovernedOptions
from tolaria_trainer.shm import AdoptionRefused, ShmStore, ShmUnavailable
from tolaria_trainer.snapshot import Adoption, LastKnownGood, SnapshotInfo, weights_digest
from tolaria_trainer.training.state import TrainingState

log = logging.getLogger("tolaria.governed")

Progress = Callable[[dict[str, Any]], None]


def last_known_good(options: GovernedOptions, run_id: str, rank: int, governed: bool) -> LastKnownGood:
    """The LKG of this (run, rank) as ``options`` ask (location, step snapshots, shared memory: ``shm_store``)."""
    named = options.run_id is not None
    store = shm_store(options.snapshot_shm, named, options.snapshot_location, run_id, rank, governed)
    return LastKnownGood(options.snapshot_location, options.step_snapshots, store=store)


def shm_store(
    wanted: bool | None, named: bool, location: str, run_id: str, rank: int, governed: bool
) -> ShmStore | None:
    """The shared-memory segment set of this (run, rank), or None: off (``snapshot_shm=False``; by default
    unless the run is ``governed`` and its id ``named``, since a restart can adopt a snapshot only under the
    same run id and with the governor's word for it), a device location, or no room."""
    on = wanted if wanted is not None else named and governed
    if not on:
        return None
    if location == "device":
        log.warning("snapshot_shm: snapshots on the device cannot outlive the process; they stay there")
        return None
    try:
        return ShmStore(run_id, rank)
    except ShmUnavailable as exc:
        log.warning("%s; snapshots stay in this process's memory (a crash loses them)", exc)
        return None


def adopt_shared_snapshot(
    lkg: LastKnownGood, state: TrainingState, governance: Governance, dist: Distributed, progress: Progress
) -> SnapshotInfo | None:
    """Adopt the last-known-good an earlier process of this (run, rank) left in shared memory, when the
    governor's Welcome names exactly it and every rank holds one of the same step (all or none: every
    rank takes part in the two collectives). Every rank then goes on on the next timeline, as after a
    restore, and tells the governor first (SnapshotAdopted), so the steps the dead process had trained
    past the snapshot are never mixed with the ones trained again. A refusal is logged, and training
    starts as without one (None)."""
    prepared = _prepare(lkg, state, governance, progress)
    step = prepared.step if prepared is not None else -1
    lowest, highest = dist.agree_min(step), dist.agree_max(step)
    if prepared is None or lowest != highest:
        if prepared is not None:
            _refuse(progress, f"another rank holds {'none' if lowest < 0 else f'step {lowest}'}, not step {step}")
        return None
    info = lkg.complete_adoption(state, prepared)
    adopted_on = state.timeline  # the run's, agreed by every rank (adopt_run_timeline)
    governance.send_adopted(AdoptionReport(adopted_on, (info.timeline, info.step, prepared.digest), lkg.digest_ms))
    state.timeline = adopted_on + 1
    log.warning(
        "adopted the last-known-good of step %d (timeline %d) from shared memory in %.0f ms; training goes on "
        "from there on timeline %d",
        info.step,
        info.timeline,
        lkg.digest_ms,
        state.timeline,
    )
    progress(
        {
            "event": "adopted",
            "step": info.step,
            "epoch": info.epoch,
            "snapshot_timeline": info.timeline,
            "timeline": state.timeline,
            "digest": prepared.digest,
            "duration_ms": round(lkg.digest_ms, 3),
            "weights_sha256": weights_digest(state.model),
        }
    )
    return info


def adopt_run_timeline(
    state: TrainingState,
    governance: Governance,
    dist: Distributed,
    flush: Callable[[], object],
    drop_staged: Callable[[], None],
) -> None:
    """Move every rank to the run's timeline if the governor named a higher one (Welcome, Resync): a
    restarted trainer's records would otherwise be stale forever. Records already buffered keep their
    timeline (``flush`` sends them first); a snapshot staged on the old one can no longer be published
    (``drop_staged``)."""
    target = dist.agree_max(governance.run_timeline)
    if target <= state.timeline:
        return
    flush()
    drop_staged()
    log.warning(
        "adopting the run's timeline %d from the governor (was %d; %d records unjudged)",
        target,
        state.timeline,
        governance.num_unjudged_records,
    )
    state.timeline = target


def _prepare(lkg: LastKnownGood, state: TrainingState, governance: Governance, progress: Progress) -> Adoption | None:
    """This rank's side of an adoption: the snapshot in shared memory checked against the Welcome, or None."""
    store = lkg.store
    if store is None or (store.previous is None and not store.previous_error):
        return None
    try:
        return lkg.prepare_adoption(state, governance.last_snapshot)
    except AdoptionRefused as exc:
        _refuse(progress, str(exc))
        return None


def _refuse(progress: Progress, reason: str) -> None:
    log.warning("not adopting the last-known-good in shared memory: %s; training starts as without one", reason)
    progress({"event": "adoption_refused", "reason": reason})
