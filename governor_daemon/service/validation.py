"""Validation of every field that crosses the wire. Raises InvalidInputError naming the field.

Runs before the core sees the message, so a bad message changes nothing. Every float that the
journal stores as a number (not through ``float_to_json``) must be finite here, and every enum known:
the journal's JSON has no NaN, and an entry that cannot be encoded must never follow a state change.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from governor_daemon.core.machine import Limits
from governor_daemon.errors import InvalidInputError, LimitExceededError
from governor_daemon.text import RUN_ID_RE
from tolaria.governor.v1 import common_pb2, trainer_service_pb2

MAX_WORLD_SIZE = 4096


MAX_SEQ = (1 << 62) - 1
"""Seqs and timelines above this are refused: counters derived from them stay far inside uint64."""


def check_finite(field: str, value: float, low: float = 0.0, high: float = math.inf) -> None:
    """A float the journal stores raw: finite and within [low, high]."""
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidInputError(field, f"must be a finite number in [{low:g}, {high:g}], got {value}")


def check_seq(field: str, seq: int) -> None:
    """Sequence numbers start at 1 and stay below MAX_SEQ."""
    if not 1 <= seq <= MAX_SEQ:
        raise InvalidInputError(field, f"must be in 1..{MAX_SEQ}, got {seq}")


def check_timeline(field: str, timeline: int) -> None:
    """Timelines stay below MAX_SEQ."""
    if timeline > MAX_SEQ:
        raise InvalidInputError(field, f"must be <= {MAX_SEQ}, got {timeline}")


def check_run_id(field: str, run_id: str) -> None:
    """run_id must match [A-Za-z0-9._-]{1,128}."""
    if not RUN_ID_RE.fullmatch(run_id):  # match() with $ accepted a trailing newline
        raise InvalidInputError(field, f"must match [A-Za-z0-9._-]{{1,128}}, got {run_id[:140]!r}")


def check_text(field: str, value: str, limits: Limits) -> None:
    """Free text must stay within max_string_length characters."""
    if len(value) > limits.max_string_length:
        raise InvalidInputError(field, f"longer than {limits.max_string_length} characters ({len(value)})")


def validate_hello(hello: trainer_service_pb2.Hello, limits: Limits) -> None:
    """Identity and task facts of a Hello."""
    check_run_id("hello.run_id", hello.run_id)
    if not 1 <= hello.world_size <= MAX_WORLD_SIZE:
        raise InvalidInputError("hello.world_size", f"must be in 1..{MAX_WORLD_SIZE}, got {hello.world_size}")
    if hello.rank >= hello.world_size:
        raise InvalidInputError("hello.rank", f"must be < world_size {hello.world_size}, got {hello.rank}")
    if not hello.incarnation_id or len(hello.incarnation_id) > 128:
        raise InvalidInputError("hello.incarnation_id", "must be 1..128 characters")
    check_text("hello.task", hello.task, limits)
    check_timeline("hello.timeline", hello.timeline)
    check_text("hello.trainer_version", hello.trainer_version, limits)
    if hello.HasField("num_classes") and hello.num_classes < 2:
        raise InvalidInputError("hello.num_classes", f"must be >= 2, got {hello.num_classes}")
    if hello.HasField("random_guess_loss") and not (
        math.isfinite(hello.random_guess_loss) and hello.random_guess_loss > 0
    ):
        raise InvalidInputError("hello.random_guess_loss", f"must be a positive number, got {hello.random_guess_loss}")


MAX_PINS_PER_BATCH = 64
"""Pinned steps one VitalsBatch may carry (a trainer pins one per agreement point and validation)."""


def validate_vitals(batch: trainer_service_pb2.VitalsBatch, limits: Limits) -> npt.NDArray[np.int64]:
    """Columns of equal length, within the batch limit, seqs from 1, steps >= 0; returns the step column."""
    n = len(batch.step)
    if n == 0:
        raise InvalidInputError("vitals_batch.step", "empty batch")
    if n > limits.max_records_per_batch:
        raise LimitExceededError(
            f"vitals_batch: {n} records exceed the limit of {limits.max_records_per_batch} per batch"
        )
    if len(batch.loss) != n:
        raise InvalidInputError("vitals_batch.loss", f"has {len(batch.loss)} values for {n} steps")
    for name in ("grad_norm", "lr"):
        count = len(getattr(batch, name))
        if count not in (0, n):
            raise InvalidInputError(f"vitals_batch.{name}", f"has {count} values for {n} steps (0 or {n})")
    check_seq("vitals_batch.first_seq", batch.first_seq)
    check_seq("vitals_batch.first_seq", batch.first_seq + n - 1)
    check_timeline("vitals_batch.timeline", batch.timeline)
    if batch.num_dropped_records > MAX_SEQ:
        raise InvalidInputError("vitals_batch.num_dropped_records", f"must be <= {MAX_SEQ}")
    if len(batch.pin_steps) > MAX_PINS_PER_BATCH:
        raise InvalidInputError(
            "vitals_batch.pin_steps", f"{len(batch.pin_steps)} pins exceed the limit of {MAX_PINS_PER_BATCH} per batch"
        )
    if any(p < 0 for p in batch.pin_steps):
        raise InvalidInputError("vitals_batch.pin_steps", "steps must be >= 0")
    steps = np.array(batch.step, dtype=np.int64)  # one C-level copy; min() over the field boxes each value
    if steps.min() < 0:
        raise InvalidInputError("vitals_batch.step", "steps must be >= 0")
    return steps


def validate_validation(record: trainer_service_pb2.ValidationRecord, limits: Limits) -> None:
    """A validation record's fields."""
    check_seq("validation_record.seq", record.seq)
    check_timeline("validation_record.timeline", record.timeline)
    if record.step < 0:
        raise InvalidInputError("validation_record.step", f"must be >= 0, got {record.step}")
    if record.HasField("accuracy") and not 0.0 <= record.accuracy <= 1.0:
        raise InvalidInputError("validation_record.accuracy", f"must be in [0, 1], got {record.accuracy}")
    if len(record.per_class_accuracy) > limits.max_per_class:
        raise InvalidInputError("validation_record.per_class_accuracy", f"more than {limits.max_per_class} classes")
    if record.HasField("random_guess_loss") and not (
        math.isfinite(record.random_guess_loss) and record.random_guess_loss > 0
    ):
        raise InvalidInputError("validation_record.random_guess_loss", "must be a positive number")
    if len(record.seeds) > 1024:
        raise InvalidInputError("validation_record.seeds", "more than 1024 seed slots")
    for i, seed in enumerate(record.seeds):
        for name in ("slot", "blueprint", "stage"):
            check_text(f"validation_record.seeds[{i}].{name}", getattr(seed, name), limits)
        check_finite(f"validation_record.seeds[{i}].alpha", seed.alpha, 0.0, 1.0)


def validate_command_result(result: trainer_service_pb2.CommandResult, limits: Limits) -> None:
    """A CommandResult's fields."""
    check_seq("command_result.seq", result.seq)
    check_seq("command_result.command_id", result.command_id)
    check_timeline("command_result.new_timeline", result.new_timeline)
    if result.outcome not in (common_pb2.COMMAND_OUTCOME_SUCCEEDED, common_pb2.COMMAND_OUTCOME_FAILED):
        raise InvalidInputError("command_result.outcome", "must be SUCCEEDED or FAILED")
    check_finite("command_result.duration_ms", result.duration_ms)
    check_text("command_result.error", result.error, limits)


def validate_snapshot(snap: trainer_service_pb2.SnapshotTaken, limits: Limits) -> None:
    """A SnapshotTaken's fields."""
    check_seq("snapshot_taken.seq", snap.seq)
    check_timeline("snapshot_taken.timeline", snap.timeline)
    check_finite("snapshot_taken.duration_ms", snap.duration_ms)
    check_text("snapshot_taken.location", snap.location, limits)
    check_text("snapshot_taken.digest", snap.digest, limits)


def validate_adopted(adopted: trainer_service_pb2.SnapshotAdopted, limits: Limits) -> None:
    """A SnapshotAdopted's fields. It is its incarnation's first message (seq 1): a process adopts once, when it
    starts, before it trains (red-team finding: a second adoption, or one after a Finish, moved the run again)."""
    if adopted.seq != 1:
        raise InvalidInputError(
            "snapshot_adopted.seq", f"must be 1 (a process adopts once, before anything else), got {adopted.seq}"
        )
    check_timeline("snapshot_adopted.timeline", adopted.timeline)
    if adopted.timeline >= MAX_SEQ:  # it goes on on timeline + 1, which no record could then carry
        raise InvalidInputError("snapshot_adopted.timeline", f"must be < {MAX_SEQ}, got {adopted.timeline}")
    if not adopted.HasField("snapshot"):
        raise InvalidInputError("snapshot_adopted.snapshot", "names no snapshot")
    check_timeline("snapshot_adopted.snapshot.timeline", adopted.snapshot.timeline)
    if adopted.snapshot.step < 0:
        raise InvalidInputError("snapshot_adopted.snapshot.step", f"{adopted.snapshot.step} is negative")
    check_text("snapshot_adopted.snapshot.digest", adopted.snapshot.digest, limits)
    if not adopted.snapshot.digest:
        raise InvalidInputError(
            "snapshot_adopted.snapshot.digest", "is empty: only a snapshot in shared memory is adopted"
        )
    check_finite("snapshot_adopted.duration_ms", adopted.duration_ms)


FINISH_STATUSES = frozenset(
    (common_pb2.FINISH_STATUS_COMPLETED, common_pb2.FINISH_STATUS_FAILED, common_pb2.FINISH_STATUS_HALTED)
)


def validate_finish(finish: trainer_service_pb2.Finish, limits: Limits) -> None:
    """A Finish's fields."""
    check_seq("finish.seq", finish.seq)
    if finish.status not in FINISH_STATUSES:
        raise InvalidInputError("finish.status", f"must be COMPLETED, FAILED or HALTED, got {finish.status}")
    check_finite("finish.duration_s", finish.duration_s)
    if finish.HasField("final_validation_accuracy"):
        check_finite("finish.final_validation_accuracy", finish.final_validation_accuracy, 0.0, 1.0)
    check_text("finish.message", finish.message, limits)
