"""Entries of a trainer's records: train-step batches (vitals), validation records (reported, late, duplicate,
stale), the decisions they lead to, and the timers' verdicts on ranks (a missed rank deadline, a stall)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tolaria.journal.base import JsonFloat, Part, Record, flat, optional, part
from tolaria.journal.kinds import EntryKind


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSummary(Part):
    """What a ``vitals`` entry keeps of its batch's records for people (the audit plot)."""

    first_step: int
    last_step: int
    loss_mean: JsonFloat
    """Mean of the finite losses ("nan" if none is finite)."""
    loss_max: JsonFloat
    """Largest finite loss ("nan" if none is finite)."""
    grad_norm_max: float | None
    """Largest finite grad norm (None if the trainer sent none, or none is finite)."""
    num_non_finite: int
    """Records whose loss is not finite."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Vitals(Record):
    """Accepted train-step records of one VitalsBatch (the records past the rank's journaled seqs)."""

    KIND = EntryKind.VITALS
    rank: int
    incarnation_id: str
    seq: int
    """The batch's last seq."""
    first_seq: int
    """The first new seq (records at or below the rank's journaled seq were resent, and are skipped)."""
    num_records: int
    """Records judged (0 for a shed batch)."""
    num_gaps: int
    """Seq gaps this batch opened (dropped records)."""
    num_dropped: int
    """Records the trainer reports it dropped."""
    max_step: int
    timeline: int
    num_shed: int | None = optional()
    """A shed batch (the daemon was overloaded): its record count; it got the non-finite check only."""
    records: dict[str, Any] | None = optional()
    """The batch's records one by one, while the run is under ``--journal-train-records``:
    ``{"encoding": "base64-le8", "step": ..., "loss": ..., "grad_norm": ..., "lr": ...}``."""
    train: TrainSummary | None = part(TrainSummary, is_optional=True)
    """The batch's summary (absent for a shed batch)."""
    decision: dict[str, Any] | None = optional()
    """The decision on a non-finite record, if the batch had one."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValidationDetails(Part):
    """A validation record as the journal describes it (non-finite floats written as strings). The daemon writes
    ``seq``, ``timeline``, ``step``, ``epoch`` and ``loss`` always, the others when the trainer sent them."""

    seq: int | None = optional()
    timeline: int | None = optional()
    step: int | None = optional()
    epoch: int | None = optional()
    loss: JsonFloat | None = optional()
    accuracy: JsonFloat | None = optional()
    perplexity: JsonFloat | None = optional()
    train_loss: JsonFloat | None = optional()
    train_accuracy: JsonFloat | None = optional()
    random_guess_loss: JsonFloat | None = optional()
    """The record's own random-guess loss (else the Hello's applies)."""
    per_class_accuracy: list[JsonFloat] | None = optional()
    seeds: list[dict[str, Any]] | None = optional()
    """The trainer's seeds: ``{"slot", "blueprint", "stage", "alpha"}`` each."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValidationReport(Record):
    """One rank's validation record of a multi-rank step, its keys spread into the entry's payload."""

    rank: int
    incarnation_id: str
    seq: int
    record: ValidationDetails = flat(ValidationDetails)
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report(ValidationReport):
    """A rank's report of a multi-rank step, waiting for the others (the last one's ``decision`` follows)."""

    KIND = EntryKind.REPORT


@dataclasses.dataclass(frozen=True, kw_only=True)
class Late(ValidationReport):
    """A report for a step already decided: never decided (the rank is told, with no snapshot)."""

    KIND = EntryKind.LATE


@dataclasses.dataclass(frozen=True, kw_only=True)
class Duplicate(ValidationReport):
    """A second report of one rank for the same pending step: not counted again."""

    KIND = EntryKind.DUPLICATE


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stale(Record):
    """Records of a timeline the run has left: journaled, acknowledged, never judged."""

    KIND = EntryKind.STALE
    what: str
    """"vitals_batch" or "validation_record"."""
    rank: int
    incarnation_id: str
    seq: int
    first_seq: int
    timeline: int
    """The records' timeline."""
    current_timeline: int
    """The run's timeline."""
    resync: bool
    """Whether a Resync went out (not while the rank has a command in flight)."""
    num_records: int | None = optional()
    """A vitals batch's: its records past the rank's journaled seqs."""
    record: ValidationDetails | None = flat(ValidationDetails, is_optional=True)
    """A validation record's keys."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Superseded(Record):
    """A pending multi-rank step of a timeline the run left before it was complete: discarded at its deadline."""

    KIND = EntryKind.SUPERSEDED
    timeline: int
    step: int
    current_timeline: int
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decision(Record):
    """A judged validation step: of a one-rank run's record (``rank`` .. ``record`` say which), of a complete
    multi-rank step, or of one decided at its rank deadline (``after_deadline``)."""

    KIND = EntryKind.DECISION
    after_deadline: bool | None = optional()
    """True when the step was decided without its missing ranks (a ``rank_deadline`` entry precedes it)."""
    rank: int | None = optional()
    incarnation_id: str | None = optional()
    seq: int | None = optional()
    record: ValidationDetails | None = part(ValidationDetails, is_optional=True)
    """A one-rank run's record."""
    seqs: dict[str, int]
    """Rank -> the seq of its record of the step."""
    decision: dict[str, Any]
    """Verdict, rule, reason, action, missing ranks, the command (if one was sent), the run state after."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankDeadline(Record):
    """A multi-rank step decided without its missing ranks (a ``decision`` follows)."""

    KIND = EntryKind.RANK_DEADLINE
    step: int
    timeline: int
    missing_ranks: list[int]
    rank_deadline_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stall(Record):
    """A rank made no progress past its stall threshold: it is STALLED (and, with ``end_stalled_ranks``, its
    trainer is told to end its process)."""

    KIND = EntryKind.STALL
    rank: int
    latest_step: int
    latest_timeline: int
    seconds_without_progress: float
    threshold_s: float
    end_process: bool
    """Whether the watchdog told the trainer to end its process."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StallCleared(Record):
    """A STALLED rank sent a record past its latest position again."""

    KIND = EntryKind.STALL_CLEARED
    rank: int
    timeline: int
    step: int
    effects: dict[str, Any]
