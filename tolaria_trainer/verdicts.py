"""Snapshots staged at validations, and the governor's verdicts that publish them.

Each validation stages a snapshot of the state it validated; the governor's Verdict on that validation says
whether it may become the last-known-good (docs/protocol.md, "verdicts"). ``ValidationSnapshots`` holds
them until every rank can publish or drop them together, and ``report`` sends each validation with the
snapshot staged for it; ``validation_report`` is what the validation says (``Measured``: what it measured).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tolaria_trainer.distributed import Distributed
from tolaria_trainer.errors import SnapshotError
from tolaria_trainer.governance import Governance, SeedReport, ValidationReport, Verdict, VerdictKind
from tolaria_trainer.model.seeds import seed_slots
from tolaria_trainer.snapshot import MAX_STAGED, LastKnownGood, SnapshotInfo
from tolaria_trainer.training.state import TrainingState
from tolaria_trainer.training.vitals import VitalsBuffer
from tolaria_trainer.vouching import Staged, TrainStreamVouching

log = logging.getLogger("tolaria.governed")


@dataclass(frozen=True)
class Measured:
    """What a validation measured, as the caller gave it (host numbers: ``validation_report`` converts them)."""

    loss: float
    accuracy: float | None
    per_class_accuracy: Sequence[float]
    perplexity: float | None
    train_loss: float | None
    train_accuracy: float | None


def validation_report(state: TrainingState, measured: Measured) -> ValidationReport:
    """The report of a validation of ``state`` as it is now (its timeline, step, epoch and live seeds)."""
    return ValidationReport(
        timeline=state.timeline,
        step=state.step,
        epoch=state.epoch,
        loss=float(measured.loss),
        accuracy=measured.accuracy,
        per_class_accuracy=tuple(measured.per_class_accuracy),
        perplexity=measured.perplexity,
        train_loss=measured.train_loss,
        train_accuracy=measured.train_accuracy,
        seeds=tuple(SeedReport(s.name, s.blueprint, str(s.stage), s.alpha) for s in seed_slots(state.model)),
    )


class ValidationSnapshots:
    """The validation snapshots staged on this rank, oldest first, and the verdicts they wait for.

    Invariant: a staged validation snapshot is published only when every rank holds a Verdict allowing
    exactly its (timeline, step), and the train stream vouched for it on every rank; a verdict is kept only
    while a staged snapshot or the latest validation needs it.
    """

    def __init__(
        self,
        lkg: LastKnownGood,
        governance: Governance,
        dist: Distributed,
        vouching: TrainStreamVouching,
        published: Callable[[SnapshotInfo], None],
    ) -> None:
        self.lkg = lkg
        self.governance = governance
        self.dist = dist
        self.vouching = vouching
        self._published = published  # tells the governor (SnapshotReport) of a snapshot just published
        self.pending: list[Staged] = []  # staged validation snapshots, oldest first
        self.verdicts: dict[int, Verdict] = {}  # of the pending and the latest seq
        self.latest_seq: int | None = None  # the last validation's seq

    def report(
        self, state: TrainingState, measured: Measured, governed: bool, vitals: VitalsBuffer
    ) -> tuple[int, ValidationReport]:
        """Report a validation of ``state`` as it is now; returns its seq and the report. What the previous
        verdicts allow is published first (they have arrived by now), then, when ``governed`` (without verdicts a
        staged snapshot could never be published), a snapshot of ``state`` is staged for this validation, with
        the detectors' state as of it pinned in ``vitals`` for a restore; the steps before the validation go out
        before its report."""
        self.settle()
        staged: SnapshotInfo | None = None
        if governed:
            staged = self.stage(state)
            if staged is not None:
                vitals.pin(state.step, state.timeline)
        report = validation_report(state, measured)
        vitals.flush()
        seq = self.governance.send_validation(report)
        self.reported(seq, staged)
        return seq, report

    def stage(self, state: TrainingState) -> SnapshotInfo | None:
        """Stage a snapshot of ``state`` for the validation about to be reported (the newest staged one makes
        room when ``MAX_STAGED`` are waiting), or None when staging failed (the previous LKG stays)."""
        if len(self.pending) == MAX_STAGED:
            self._drop(self.pending[-1])  # the LKG's stage replaces the newest staged one
        try:
            return self.lkg.stage(state)
        except SnapshotError as exc:
            log.error("snapshot staging failed; the previous LKG stays: %s", exc)
            return None

    def reported(self, seq: int, staged: SnapshotInfo | None) -> None:
        """The validation ``seq`` was sent, with the snapshot staged for it (if any): wait for its verdict."""
        previous, self.latest_seq = self.latest_seq, seq
        self._release_verdict(previous)  # superseded: only the newest validation's verdict matters at the end
        if staged is not None:
            self.pending.append(self.vouching.watch(staged, seq))

    def verdict(self, seq: int | None, wait_s: float) -> Verdict | None:
        """The Verdict on validation ``seq`` once it arrived (kept until its seq is dropped)."""
        if seq is None:
            return None
        if seq not in self.verdicts:
            verdict = self.governance.verdict(seq, wait_s)
            if verdict is None:
                return None
            if verdict.kind is VerdictKind.PANIC:
                log.warning("governor verdict PANIC at step %d: %s", verdict.step, verdict.reason)
            self.verdicts[seq] = verdict
        return self.verdicts[seq]

    def settle(self, wait_s: float = 0.0) -> None:
        """Publish or discard the staged snapshots, oldest first. A snapshot is published once every rank holds
        a Verdict allowing exactly its (timeline, step) and the train stream vouches for it on every rank (no
        anomaly whose onset is at or before its step can still be reported), so the LKG never holds a fault
        that a healthy-looking validation came too early to see. It is discarded when a verdict does not allow
        it or the vouching became impossible; this stops at the first one still waiting. Every rank calls the
        same collectives in the same order."""
        for position in range(self.dist.agree_max(len(self.pending))):
            item = self.pending[0] if self.pending else None
            verdict = self.verdict(item.seq, wait_s if position == 0 else 0.0) if item else None
            if not self.dist.agree_min(int(verdict is not None)):
                return
            assert item is not None
            assert verdict is not None
            staged = item.info
            allowed = verdict.snapshot_allowed and (verdict.timeline, verdict.step) == (staged.timeline, staged.step)
            vouch = self.vouching.vouch(item) if allowed else "doomed"
            if self.dist.agree_max(int(vouch == "doomed")):
                self._drop(item)
                continue
            if not self.dist.agree_min(int(vouch == "vouched")):
                return
            if self.lkg.publish(staged.timeline, staged.step, "validation"):
                self._published(staged)
            self._drop(item)

    def drop_all(self) -> None:
        """Discard every staged snapshot: staged on a timeline being left, no verdict can publish them now."""
        for item in list(self.pending):
            self._drop(item)

    def _drop(self, item: Staged) -> None:
        """Forget a staged snapshot (if it was published, the LKG stays) and stop waiting for its verdict."""
        self.pending.remove(item)
        self.lkg.discard(item.info)
        self._release_verdict(item.seq)
        self.vouching.release(item)

    def _release_verdict(self, seq: int | None) -> None:
        """Stop tracking the verdict on ``seq`` unless a staged snapshot or the latest validation needs it."""
        if seq is None or seq == self.latest_seq or any(seq == item.seq for item in self.pending):
            return
        if self.verdicts.pop(seq, None) is None:
            self.governance.forget_verdict(seq)
