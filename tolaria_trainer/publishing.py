"""SnapshotPublishing: one rank's snapshots on their way to the last-known-good, and the governor told of each.

Three ways in: ``checkpoint`` publishes the current state at once (the initial state, an adopted one, right
after a seed fossilized); a validation stages one that the governor's verdict publishes (``validations``:
verdicts.py); an agreement point stages a step snapshot the train stream vouches for (``steps``:
vouching.py). Both kinds of staged snapshot share one ``TrainStreamVouching``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tolaria_trainer.distributed import Distributed
from tolaria_trainer.governance import Governance, SnapshotReport
from tolaria_trainer.snapshot import LastKnownGood, SnapshotInfo
from tolaria_trainer.training.state import TrainingState
from tolaria_trainer.verdicts import ValidationSnapshots
from tolaria_trainer.vouching import StepSnapshots, TrainStreamVouching

log = logging.getLogger("tolaria.governed")

Progress = Callable[[dict[str, Any]], None]


class SnapshotPublishing:
    """The publishing side of one rank's LKG.

    Invariant: the governor hears of every snapshot published (one SnapshotReport, with the digest of one
    kept in shared memory, which ``progress`` hears of too), and a timeline left behind takes the snapshots
    staged on it along (``drop_staged``): no verdict or vouching can publish them any more.
    """

    def __init__(
        self,
        lkg: LastKnownGood,
        state: TrainingState,
        governance: Governance,
        dist: Distributed,
        commands_known: Callable[[], bool],
        step_snapshot_every: int,
        progress: Progress,
    ) -> None:
        self.lkg = lkg
        self.state = state
        self.governance = governance
        self.progress = progress
        self.vouching = TrainStreamVouching(governance, state, commands_known)
        self.validations = ValidationSnapshots(lkg, governance, dist, self.vouching, self.report)
        self.steps = StepSnapshots(lkg, state, governance, dist, self.vouching, step_snapshot_every, self.report)

    def checkpoint(self, why: str) -> SnapshotInfo:
        """Make the current state the LKG at once, without a verdict."""
        info = self.lkg.take(self.state)
        log.info("snapshot published (%s) at step %d, %d bytes", why, info.step, info.snapshot_bytes)
        self.report(info)
        return info

    def report(self, info: SnapshotInfo) -> None:
        """Tell the governor of the snapshot ``info`` just published."""
        digest = self.lkg.digest_of(info)
        self.governance.send_snapshot(
            SnapshotReport(info.timeline, info.step, info.snapshot_bytes, info.duration_ms, info.location, digest)
        )
        if digest:
            self.progress({"event": "snapshot", "timeline": info.timeline, "step": info.step, "digest": digest})

    def drop_staged(self) -> None:
        """Discard every staged snapshot (the published ones stay): their timeline is being left."""
        self.steps.drop()
        self.validations.drop_all()


__all__ = ["SnapshotPublishing"]
