"""The train stream's word for a staged snapshot, and the step snapshots that wait for nothing else.

A healthy-looking validation (or no validation at all) can come too early to see a fault the train-stream
detectors find a few steps later. So a staged snapshot at step S is worth publishing only once the governor
acknowledged the train-step records through S + ``train_verification_steps`` of its timeline with no command
in between: ``TrainStreamVouching`` says when that is. ``StepSnapshots`` stages a snapshot every
``step_snapshot_every`` steps and publishes it on that word alone (docs/protocol.md, "step snapshots").
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tolaria_trainer.distributed import Distributed
from tolaria_trainer.errors import SnapshotError
from tolaria_trainer.governance import Governance
from tolaria_trainer.snapshot import LastKnownGood, SnapshotInfo
from tolaria_trainer.training.state import TrainingState

log = logging.getLogger("tolaria.governed")

Vouch = Literal["vouched", "waiting", "doomed"]


@dataclass
class Staged:
    """A staged snapshot awaiting what publishes it: a validation's (``seq``) verdict and the train stream
    (validation snapshots), or the train stream alone (step snapshots, ``seq`` None)."""

    info: SnapshotInfo
    seq: int | None
    unjudged: int  # train-step records never judged (dropped here or shed there) when it was staged


class TrainStreamVouching:
    """Whether the train stream vouches for a staged snapshot, from the chunks sent and the governor's Acks.

    Invariant: a snapshot staged at step S of timeline T is vouched for only once the governor acknowledged
    the records through S + ``train_verification_steps`` of T, with no command known here and no record left
    unjudged since it was staged; the chunks sent are kept while a snapshot it watches may still need them.
    """

    def __init__(self, governance: Governance, state: TrainingState, commands_known: Callable[[], bool]) -> None:
        self.governance = governance
        self.state = state
        self._commands_known = commands_known  # collects the commands delivered so far, then: any known?
        # (timeline, last step, last seq) of each chunk sent while a snapshot is staged, oldest first
        self._sent: deque[tuple[int, int, int]] = deque()
        self._watched: list[Staged] = []

    def sent(self, timeline: int, last_step: int, last_seq: int) -> None:
        """Note a chunk of train-step records handed to the governor (its last step and seq)."""
        self._sent.append((timeline, last_step, last_seq))
        self._prune()

    def watch(self, info: SnapshotInfo, seq: int | None) -> Staged:
        """Start watching a snapshot staged just now (``seq``: the validation it was staged for)."""
        item = Staged(info, seq, self.never_judged())
        self._watched.append(item)
        return item

    def release(self, item: Staged) -> None:
        """Stop watching a staged snapshot (published or dropped), forgetting the chunks only it needed."""
        self._watched = [watched for watched in self._watched if watched is not item]
        self._prune()

    def never_judged(self) -> int:
        """Train-step records the governor will never judge: dropped here, or shed there."""
        return self.governance.num_dropped_records + self.governance.num_shed_records

    def vouch(self, item: Staged) -> Vouch:
        """Whether the train stream vouches for a staged snapshot at step S: "vouched" once the governor
        acknowledged the records up to S + ``train_verification_steps`` of its timeline with no command here
        (a train-stream alarm whose onset is at or before S would have fired by then, and its command would
        have arrived before those Acks: the Acks are read first, the commands after); "doomed" once a
        command, another timeline, or records never judged (dropped by the client under back-pressure, or
        shed by a governor that was behind) make that impossible; "waiting" otherwise."""
        acked = self.governance.acked_seq
        commands = self._commands_known()  # every command delivered before those Acks is known now
        margin = self.governance.train_verification_steps
        if self.state.timeline != item.info.timeline or commands or self.never_judged() != item.unjudged:
            return "doomed"
        if margin is None:
            return "waiting"
        target = item.info.step + margin
        needed = next((seq for tl, last, seq in self._sent if tl == item.info.timeline and last >= target), None)
        return "vouched" if needed is not None and acked >= needed else "waiting"

    def _prune(self) -> None:
        """Forget the chunks no staged snapshot can still need (those before the oldest staged step)."""
        oldest = min((item.info.step for item in self._watched), default=None)
        while len(self._sent) > 1 and (oldest is None or self._sent[0][1] < oldest):
            self._sent.popleft()  # the newest stays: it may end at the step a snapshot is staged at next


class StepSnapshots:
    """Step snapshots: a last-known-good between validations, staged every ``every`` steps at an agreement point.

    Invariant: a step snapshot is published only once the train stream vouched for it on every rank. Every
    rank takes part in the same collectives in the same order, whatever it holds.
    """

    def __init__(
        self,
        lkg: LastKnownGood,
        state: TrainingState,
        governance: Governance,
        dist: Distributed,
        vouching: TrainStreamVouching,
        every: int,
        published: Callable[[SnapshotInfo], None],
    ) -> None:
        self.lkg = lkg
        self.state = state
        self.governance = governance
        self.dist = dist
        self.vouching = vouching
        self.every = every
        self._published = published  # tells the governor (SnapshotReport) of a snapshot just published
        self.pending: Staged | None = None  # staged at an agreement point, awaiting the train stream

    def stage(self, governed: bool) -> None:
        """Stage a step snapshot every ``every`` steps once the governor says how long its train-stream
        detectors take to vouch for a step. Every rank takes part in the one collective, whatever it holds
        (a rank whose earlier staging failed must not skip it). The agreement point pinned this step before
        its flush, so the governor keeps its detectors' state as of it."""
        newest = self.lkg.info
        due = self.pending is None and self.lkg.step_snapshots > 0
        due = due and (newest is None or self.state.step - newest.step >= self.every)
        able = due and governed and self.governance.train_verification_steps is not None
        if not self.dist.agree_min(int(able)):
            return
        try:
            info = self.lkg.stage(self.state, kind="step")
        except SnapshotError as exc:  # the other ranks learn it at the next settle (nothing staged here)
            log.error("step snapshot staging failed; the published snapshots stay: %s", exc)
            return
        self.pending = self.vouching.watch(info, None)

    def settle(self) -> None:
        """Publish the staged step snapshot once the train stream vouches for it on every rank, or discard it
        once some rank finds that impossible."""
        staged = self.pending
        if not self.dist.agree_max(int(staged is not None)):
            return
        vouch = self.vouching.vouch(staged) if staged is not None else "doomed"
        if self.dist.agree_max(int(vouch == "doomed")):
            self.drop()
            return
        if not self.dist.agree_min(int(vouch == "vouched")):
            return
        assert staged is not None
        if self.lkg.publish(staged.info.timeline, staged.info.step, "step"):
            self._published(staged.info)
        self.pending = None
        self.vouching.release(staged)

    def drop(self) -> None:
        """Discard the staged step snapshot, if any (the published ones stay)."""
        staged, self.pending = self.pending, None
        if staged is not None:
            self.lkg.discard(staged.info)
            self.vouching.release(staged)
