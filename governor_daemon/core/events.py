"""What goes into the core: typed, already validated events.

The gRPC layer decodes every wire message into one of these (``service/codec.py``), after checking
every field (``service/validation.py``); the simulation builds them the same way. ``now`` is always
monotonic seconds of the daemon process: the core never reads a clock, and wall time never decides
anything (docs/protocol.md, "Clocks").

A trainer event names its stream by ``stream``, an integer the adapter assigns per Attach call; the
core keeps stream ids, never stream objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Attach:
    """A Hello on a new stream."""

    stream: int
    run_id: str
    rank: int
    world_size: int
    incarnation_id: str
    task: str
    overrides: dict[str, Any]
    random_guess_loss: float | None
    num_classes: int | None
    trainer_version: str
    peer: str
    caller: str
    now: float
    principal: str = ""
    """The authenticated identity (token name or certificate subject); "" without authentication."""
    timeline: int = 0
    """The trainer's timeline; a run this Hello creates starts on it."""


@dataclass(frozen=True)
class Vitals:
    """A VitalsBatch: records ``first_seq .. first_seq + len(steps) - 1`` of one timeline."""

    stream: int
    first_seq: int
    timeline: int
    steps: npt.NDArray[np.int64]
    losses: Sequence[float] | npt.NDArray[np.float64]
    grads: Sequence[float] | npt.NDArray[np.float64]
    num_dropped: int
    now: float
    shed: bool = False
    """The daemon was behind: these records get the non-finite check only, not the statistical detectors
    (service/ingest.py; docs/protocol.md, "Shedding")."""
    lrs: Sequence[float] | npt.NDArray[np.float64] = ()
    """The learning rate of each record (empty: the trainer sent none)."""
    pins: tuple[int, ...] = ()
    """Steps the trainer may stage a snapshot at: the detector state as of each is kept."""

    @property
    def last_seq(self) -> int:
        """Seq of the batch's last record."""
        return self.first_seq + len(self.steps) - 1

    def follows(self, earlier: Vitals) -> bool:
        """True if this batch continues ``earlier`` on the same stream and timeline, seq for seq, with the
        same columns."""
        return (
            self.stream == earlier.stream
            and self.timeline == earlier.timeline
            and self.first_seq == earlier.last_seq + 1
            and (len(self.grads) == 0) == (len(earlier.grads) == 0)
            and (len(self.lrs) == 0) == (len(earlier.lrs) == 0)
        )

    @staticmethod
    def joined(batches: Sequence[Vitals], shed: bool = False) -> Vitals:
        """One event for consecutive batches (each ``follows`` the one before): judged and journaled as
        one, so a daemon that falls behind does less work per record; ``shed``: the statistical detectors
        skip them."""
        first = batches[0]
        if len(batches) == 1 and shed == first.shed:
            return first
        losses = np.concatenate([np.asarray(b.losses, dtype=np.float64) for b in batches])
        grads = np.concatenate([np.asarray(b.grads, dtype=np.float64) for b in batches])
        lrs = np.concatenate([np.asarray(b.lrs, dtype=np.float64) for b in batches])
        return Vitals(
            first.stream,
            first.first_seq,
            first.timeline,
            np.concatenate([b.steps for b in batches]) if len(batches) > 1 else first.steps,
            losses,
            grads,
            sum(b.num_dropped for b in batches),
            batches[-1].now,
            shed,
            lrs,
            tuple(p for b in batches for p in b.pins),
        )


@dataclass(frozen=True)
class Validation:
    """One validation record; ``details`` is its journal-ready description."""

    stream: int
    seq: int
    timeline: int
    step: int
    epoch: int
    loss: float
    record_rgl: float | None
    details: dict[str, Any]
    now: float


@dataclass(frozen=True)
class SnapshotTaken:
    """The trainer published a last-known-good snapshot."""

    stream: int
    seq: int
    timeline: int
    step: int
    snapshot_bytes: int
    duration_ms: float
    location: str
    now: float
    digest: str = ""  # of the snapshot in the node's shared memory ("" when it is not there)


@dataclass(frozen=True)
class SnapshotAdopted:
    """A new incarnation of a rank restored the snapshot its Welcome named from shared memory; it trains on
    from that step on ``timeline`` + 1."""

    stream: int
    seq: int
    timeline: int
    snapshot: tuple[int, int, str]  # (timeline, step, digest) of the adopted snapshot
    duration_ms: float
    now: float


@dataclass(frozen=True)
class CommandResult:
    """How one rank executed a command."""

    stream: int
    seq: int
    command_id: int
    succeeded: bool
    new_timeline: int
    restored_step: int
    duration_ms: float
    error: str
    num_culled_seeds: int
    now: float
    # The trainer's learning rate once the command was executed (None: not reported).
    lr_after_restore: float | None = None


@dataclass(frozen=True)
class Heartbeat:
    """Liveness only: never progress, never journaled."""

    stream: int
    latest_step: int
    timeline: int
    now: float


@dataclass(frozen=True)
class Finish:
    """A rank is done."""

    stream: int
    seq: int
    status: str
    epochs_completed: int
    num_rollbacks: int
    message: str
    duration_s: float
    final_validation_loss: float | None
    final_validation_accuracy: float | None
    now: float


@dataclass(frozen=True)
class Detach:
    """A stream ended, from either side."""

    stream: int
    now: float


@dataclass(frozen=True)
class RequestRollback:
    """A controller's ROLLBACK."""

    run_id: str
    reason: str
    caller: str
    now: float


@dataclass(frozen=True)
class Halt:
    """A controller's HALT."""

    run_id: str
    reason: str
    caller: str
    now: float


@dataclass(frozen=True)
class Resume:
    """A controller's Resume of a HALTED run."""

    run_id: str
    reason: str
    caller: str
    now: float


@dataclass(frozen=True)
class UpdatePolicy:
    """A controller's UpdatePolicy: ``changes`` maps policy fields to new values."""

    run_id: str
    changes: dict[str, Any]
    caller: str
    now: float


@dataclass(frozen=True)
class ForgetRun:
    """A controller removes a finished or unattached run from memory (the journal keeps its history)."""

    run_id: str
    reason: str
    caller: str
    now: float


@dataclass(frozen=True)
class Tick:
    """Time passed: rank deadlines, stalls and command timeouts are checked against ``now``."""

    now: float


@dataclass(frozen=True)
class Start:
    """The daemon started with the state rebuilt from its journal. Every timer restarts at ``now``."""

    now: float
    runs_restored: int = 0
    entries_applied: int = 0
    moved_aside: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Stop:
    """The daemon is shutting down: every stream is asked to end."""

    reason: str
    now: float


TrainerEvent = (
    Attach | Vitals | Validation | SnapshotTaken | SnapshotAdopted | CommandResult | Heartbeat | Finish | Detach
)
ControllerEvent = RequestRollback | Halt | Resume | UpdatePolicy | ForgetRun
Event = TrainerEvent | ControllerEvent | Tick | Start | Stop
