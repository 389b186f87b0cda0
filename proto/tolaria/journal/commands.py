"""Entries of commands and of a trainer's single-seq reports: a command issued, its result, its timeout; a
snapshot taken, a snapshot adopted after a restart; a rank's finish."""

from __future__ import annotations

import dataclasses
from typing import Any

from tolaria.journal.base import JsonFloat, Part, Record, flat, optional, part, parts
from tolaria.journal.kinds import EntryKind


@dataclasses.dataclass(frozen=True, kw_only=True)
class Notice(Part):
    """What a report or a timer did to the open command: ``kind`` "punishment_charged" (a trainer executed the
    command: ``charged`` is its punishment reward, charged once), "command_progress" (some ranks still to
    report), "command_completed", "command_failed", "command_timeout", "command_abandoned" (every rank finished
    first: never executed, never charged), "unknown_command" or "unknown_snapshot"."""

    kind: str
    reason: str
    command: dict[str, Any] | None
    """The follow-up command the daemon issued (the HALT after a failure or a timeout), if any."""
    charged: float | None = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandIssued(Record):
    """Every command the daemon issues, whatever caused it; durable before it leaves. It changes no state itself:
    the entry before it carries the policy state that includes the command."""

    KIND = EntryKind.COMMAND
    cause: str
    """"decision", "train_step", "controller", "command_failed" or "command_timeout"."""
    command: dict[str, Any]
    """The command: ``command_id``, ``kind``, ``reason``, ``timeline``, ``step``, its recipe and rung."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandResult(Record):
    """One rank's report of how it executed (or failed) a command."""

    KIND = EntryKind.COMMAND_RESULT
    rank: int
    incarnation_id: str
    seq: int
    command_id: int
    succeeded: bool
    new_timeline: int
    """The rank's timeline after the command (T+1 for a ROLLBACK or RESUME made on T)."""
    restored_step: int
    duration_ms: float
    error: str
    num_culled_seeds: int
    lr_after_restore: JsonFloat | None = optional()
    """The learning rate the rank continues with after a restore, when it reported one."""
    command_kind: str | None = optional()
    """"rollback", "halt" or "resume"; absent for a command this life of the run never issued."""
    notices: tuple[Notice, ...] | None = parts(Notice, is_optional=True)
    superseded_steps: list[list[int]] | None = optional()
    """[timeline, step] of pending steps discarded because the run moved to a new timeline."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandTimeout(Record):
    """An open command got no result within ``command_timeout_s``: the notice's keys, spread into the payload."""

    KIND = EntryKind.COMMAND_TIMEOUT
    notice: Notice = flat(Notice)
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Snapshot(Record):
    """A rank published a last-known-good snapshot."""

    KIND = EntryKind.SNAPSHOT
    rank: int
    incarnation_id: str
    seq: int
    timeline: int
    step: int
    snapshot_bytes: int
    duration_ms: float
    location: str
    digest: str
    """"" unless the snapshot lies in shared memory."""
    detector_state: str
    """"pinned" (the detectors resume from here after a restore to it: ``effects.pins``) or why not."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapshotRef(Part):
    """Which snapshot: the timeline and step it was taken at, and its digest."""

    timeline: int
    step: int
    digest: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapshotAdopted(Record):
    """A restarted trainer adopted its rank's snapshot from shared memory: the run goes on on a new timeline."""

    KIND = EntryKind.SNAPSHOT_ADOPTED
    rank: int
    incarnation_id: str
    seq: int
    timeline: int
    """The timeline it adopted on (the run's, from its Welcome)."""
    new_timeline: int
    snapshot: SnapshotRef = part(SnapshotRef)
    duration_ms: float
    run_timeline: int | None = optional()
    """The run's timeline after it; absent with an "unknown_snapshot" notice (nothing changed)."""
    superseded_steps: list[list[int]] | None = optional()
    notices: tuple[Notice, ...] | None = parts(Notice, is_optional=True)
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finish(Record):
    """A rank's Finish; the run is FINISHED with its last rank. It may close the open command as abandoned."""

    KIND = EntryKind.FINISH
    rank: int
    incarnation_id: str
    seq: int
    status: str
    """The contract's FinishStatus value name, e.g. "FINISH_STATUS_COMPLETED"."""
    epochs_completed: int
    num_rollbacks: int
    message: str
    duration_s: float
    notices: tuple[Notice, ...] = parts(Notice)
    final_validation_loss: JsonFloat | None = optional()
    final_validation_accuracy: float | None = optional()
    effects: dict[str, Any]
