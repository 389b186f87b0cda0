"""What a governed loop asks of the governor, in plain Python types, and the ungoverned null object.

``GovernedTraining`` (``governed.py``) talks to the governor only through the ``Governance`` protocol:
queue vitals, validation reports, snapshot reports, command results and the finish; read verdicts,
commands and the run's timeline. ``client/connection.py`` implements it over the Attach stream (the
only place protobufs are built); ``Ungoverned`` implements it as nothing at all, so the loop never asks
whether a governor exists; tests drive a loop with a scripted fake.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

from tolaria.vocabulary import CommandType as CommandType  # the port speaks the contract's vocabulary
from tolaria.vocabulary import VerdictKind as VerdictKind
from tolaria_trainer.client.errors import GovernorRefused
from tolaria_trainer.client.outbox import VitalsSource


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


class Governance(Protocol):
    """One rank's line to the governor. Every ``send_*`` queues and returns at once; nothing here
    waits on the network except ``verdict`` (up to the bound given) and ``close``."""

    @property
    def governed(self) -> bool:
        """False for the null object: verdicts never come, so staged snapshots are never kept."""
        ...

    @property
    def connected(self) -> bool:
        """A stream is open and welcomed."""
        ...

    @property
    def refusal(self) -> GovernorRefused | None:
        """The permanent refusal, once the governor refused this trainer."""
        ...

    @property
    def run_timeline(self) -> int:
        """The highest timeline the governor named for the run (adopted at an agreement point)."""
        ...

    @property
    def num_unjudged_records(self) -> int:
        """Records the governor journaled as stale and never judged."""
        ...

    @property
    def num_dropped_records(self) -> int:
        """Train-step records dropped under back-pressure (reported to the governor)."""
        ...

    @property
    def num_shed_records(self) -> int:
        """Train-step records the governor acknowledged without judging them, because it was behind
        (docs/protocol.md, "Shedding")."""
        ...

    @property
    def acked_seq(self) -> int:
        """The highest seq the governor acknowledged: durable, and judged unless shed (counted in
        ``num_shed_records``). A command caused by a record is
        always delivered before that record's Ack (docs/protocol.md, "Train-stream verification")."""
        ...

    @property
    def train_verification_steps(self) -> int | None:
        """How many steps after step S the governor's train-stream detectors must have judged, without a
        command, to vouch for S (None: the run's profile does not judge the train stream)."""
        ...

    @property
    def last_snapshot(self) -> tuple[int, int, str] | None:
        """This rank's last published snapshot in shared memory (timeline, step, digest), as the governor
        journaled it before this process started; None without one."""
        ...

    @property
    def num_history_losses(self) -> int:
        """Times the governor turned out no longer to hold the run (forgotten, expired): its command ids
        start at 1 again, and the commands of the run's previous life are void."""
        ...

    @property
    def commands_waiting(self) -> bool:
        """A command arrived that ``take_commands`` has not taken yet (cheap: called every step)."""
        ...

    def start(self, wait_s: float) -> bool:
        """Start connecting; wait up to ``wait_s`` for the first Welcome. Returns whether connected."""
        ...

    def unreachable_for_s(self) -> float:
        """Seconds since the last welcomed stream was lost (0 while connected)."""
        ...

    def coverage(self) -> Coverage:
        """How governed the run was so far (``Coverage``)."""
        ...

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Queue train-step records of one timeline; returns the seq of the last one."""
        ...

    def send_validation(self, report: ValidationReport) -> int:
        """Queue a validation report; returns the seq its Verdict will name."""
        ...

    def verdict(self, seq: int, wait_s: float) -> Verdict | None:
        """The Verdict on validation ``seq``, waiting up to ``wait_s`` (0: just look)."""
        ...

    def forget_verdict(self, seq: int) -> None:
        """Stop keeping the Verdict on ``seq`` (received or still to come)."""
        ...

    def take_commands(self) -> list[Command]:
        """Commands received since the last call, each once, lowest id first."""
        ...

    def send_snapshot(self, report: SnapshotReport) -> None:
        """Queue a report of a snapshot that became the LKG."""
        ...

    def send_command_result(self, report: CommandReport) -> None:
        """Queue the result of executing a command (it moves ``run_timeline`` to the command's new one)."""
        ...

    def send_adopted(self, report: AdoptionReport) -> None:
        """Queue the report of an adopted snapshot (it moves ``run_timeline`` to ``report.timeline`` + 1); sent
        before any record of that timeline."""
        ...

    def close(self, finish: FinishReport | None, flush_timeout_s: float) -> bool:
        """Queue ``finish`` (None: the governor is not told, e.g. it is unreachable), wait up to
        ``flush_timeout_s`` for everything to be acknowledged, and stop. Returns True if flushed."""
        ...

    def pending(self) -> int:
        """Messages not acknowledged yet."""
        ...


class Ungoverned:
    """The null ``Governance``: training without a governor. Nothing is sent, no verdict or command ever
    comes, and a refusal never happens."""

    governed = False
    connected = False
    refusal: GovernorRefused | None = None
    run_timeline = 0
    num_unjudged_records = 0
    num_dropped_records = 0
    num_shed_records = 0
    acked_seq = 0
    train_verification_steps: int | None = None
    last_snapshot: tuple[int, int, str] | None = None
    commands_waiting = False
    num_history_losses = 0

    def __init__(self) -> None:
        self._seq = 0

    def start(self, wait_s: float) -> bool:
        """Nothing to connect to."""
        return False

    def unreachable_for_s(self) -> float:
        """Never reachable, never waited for."""
        return 0.0

    def coverage(self) -> Coverage:
        """No governor: nothing to claim."""
        return Coverage(governor="", judged_any=False, never_judged=0, seconds_without=0.0, streams_lost=0)

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Dropped: nobody judges them."""
        return 0

    def send_validation(self, report: ValidationReport) -> int:
        """A seq no verdict will ever name."""
        self._seq += 1
        return self._seq

    def verdict(self, seq: int, wait_s: float) -> Verdict | None:
        """Never."""
        return None

    def forget_verdict(self, seq: int) -> None:
        """Nothing kept."""

    def take_commands(self) -> list[Command]:
        """None ever."""
        return []

    def send_snapshot(self, report: SnapshotReport) -> None:
        """Nobody to tell."""

    def send_command_result(self, report: CommandReport) -> None:
        """No command is ever executed."""

    def send_adopted(self, report: AdoptionReport) -> None:
        """No snapshot is ever named, so none is adopted."""

    def close(self, finish: FinishReport | None, flush_timeout_s: float) -> bool:
        """Nothing pending."""
        return True

    def pending(self) -> int:
        """Nothing pending."""
        return 0


def finite_or_none(value: float | None) -> float | None:
    """``value`` when it is a finite number, else None (for JSON summaries and optional proto fields)."""
    return value if value is not None and math.isfinite(value) else None
