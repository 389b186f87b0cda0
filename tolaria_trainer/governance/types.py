"""The plain types a governed loop and the governor exchange through the ``Governance`` port: verdicts,
commands, the reports a loop sends, the vitals it streams, and the run's coverage."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tolaria.vocabulary import CommandType, VerdictKind


@dataclass(frozen=True)
class VitalsColumns:
    """Train-step records on the host, in columns, all produced on one timeline."""

    timeline: int
    steps: Sequence[int]
    losses: Sequence[float]
    grad_norms: Sequence[float]
    lrs: Sequence[float]
    pins: Sequence[int] = ()  # steps the governor keeps its detector state as of (a snapshot may be staged)

    def host(self) -> VitalsColumns:
        """Itself: already on the host."""
        return self

    def __len__(self) -> int:
        return len(self.steps)


class VitalsSource(Protocol):
    """A chunk of train-step records of one timeline whose values may still be copying to the host.

    ``steps`` and ``timeline`` are host values already; ``host()`` may wait for a device copy and is
    called once, when the chunk is first transmitted (``VitalsColumns`` is the host-only form).
    """

    @property
    def timeline(self) -> int: ...

    @property
    def steps(self) -> Sequence[int]: ...

    def host(self) -> VitalsColumns: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Verdict:
    """The governor's answer to one validation record: publish the staged snapshot only when
    ``snapshot_allowed`` names exactly its (timeline, step)."""

    seq: int
    kind: VerdictKind
    timeline: int
    step: int
    reason: str
    snapshot_allowed: bool


@dataclass(frozen=True)
class Command:
    """A command of the governor (or of a controller through it), executed by every rank at once."""

    command_id: int
    type: CommandType
    reason: str
    punishment_reward: float
    timeline: int  # the timeline it was issued on
    step: int
    recovery_skip_batches: int = 0
    recovery_lr_scale: float = 1.0
    generation: int = 0
    onset_step: int | None = None  # a train-stream alarm's estimate of where the anomaly began
    recovery_rung: int = 0  # the recovery ladder's rung (0: a first occurrence)
    restore_before_step: int | None = None  # a recurrence: restore a snapshot older than this, if one is held
    skip_through_step: int | None = None  # and skip the batches of the steps after the restored one through this

    def timeline_after(self, succeeded: bool) -> int:
        """The timeline executing it moves a rank to: its timeline + 1 for a ROLLBACK or RESUME that
        succeeded (whatever timeline the rank was on), its timeline otherwise."""
        moves = self.type in (CommandType.ROLLBACK, CommandType.RESUME)
        return self.timeline + 1 if succeeded and moves else self.timeline


@dataclass(frozen=True)
class SeedReport:
    """One seed slot's lifecycle state, reported with a validation."""

    slot: str
    blueprint: str
    stage: str
    alpha: float


@dataclass(frozen=True)
class ValidationReport:
    """One validation pass, as the governor judges it. Non-finite values are sent as they are: a NaN
    loss is exactly what the governor must see."""

    timeline: int
    step: int
    epoch: int
    loss: float
    accuracy: float | None = None
    per_class_accuracy: tuple[float, ...] = ()
    perplexity: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    seeds: tuple[SeedReport, ...] = ()


@dataclass(frozen=True)
class CommandReport:
    """What executing a command did (the CommandResult)."""

    command: Command
    succeeded: bool
    restored_step: int
    duration_ms: float
    error: str = ""
    num_culled_seeds: int = 0
    lr_after_restore: float | None = None  # the learning rate training continues with


@dataclass(frozen=True)
class SnapshotReport:
    """A snapshot that became the LKG."""

    timeline: int
    step: int
    snapshot_bytes: int
    duration_ms: float
    location: str
    digest: str = ""  # of the snapshot in shared memory ("" when it is not there)


@dataclass(frozen=True)
class AdoptionReport:
    """This new incarnation adopted the snapshot the governor named (``Governance.last_snapshot``) from shared
    memory on ``timeline``; it trains on from that snapshot's step on ``timeline`` + 1."""

    timeline: int
    snapshot: tuple[int, int, str]  # (timeline, step, digest), exactly ``last_snapshot``
    duration_ms: float


class FinishStatus(enum.StrEnum):
    """How a run ended, as the governor records it."""

    COMPLETED = "completed"
    HALTED = "halted"
    FAILED = "failed"


@dataclass(frozen=True)
class FinishReport:
    """The last message of a run."""

    status: FinishStatus
    epochs_completed: int
    num_rollbacks: int
    message: str
    duration_s: float
    final_validation_loss: float | None = None
    final_validation_accuracy: float | None = None


@dataclass(frozen=True)
class Coverage:
    """How governed a run was: what its summary, exit message and final log line say (fail-open runs train
    on without a governor, and must not claim one)."""

    governor: str
    """The governor's address ("" without one)."""
    judged_any: bool
    """The governor acknowledged at least one record: something was judged."""
    never_judged: int
    """Records the governor did not judge, as far as the trainer knows: stale, dropped, shed (the non-finite
    check only) and never acknowledged."""
    seconds_without: float
    """Seconds without a welcomed stream, all gaps together (the first connection's included)."""
    streams_lost: int
    """Welcomed streams that ended (the governor restarted, or the network failed)."""

    def describe(self) -> str:
        """One line for the run's end ("" for a run governed throughout, or one without a governor)."""
        if not self.governor:
            return ""
        where = f"the governor at {self.governor}"
        if not self.judged_any:
            return (
                f"ungoverned: {where} never judged a record ({self.seconds_without:.1f} s without it; training "
                "went on fail-open)"
            )
        if self.never_judged or self.streams_lost:
            lost = f", its stream lost {self.streams_lost} time(s)" if self.streams_lost else ""
            return (
                f"partly governed: {self.never_judged} record(s) never judged by {where}, "
                f"{self.seconds_without:.1f} s without it{lost}"
            )
        return ""


def finite_or_none(value: float | None) -> float | None:
    """``value`` when it is a finite number, else None (for JSON summaries and optional proto fields)."""
    return value if value is not None and math.isfinite(value) else None
