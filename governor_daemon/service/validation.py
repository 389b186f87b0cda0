"""Validation of every field that crosses the wire. Raises InvalidInputError naming the field.

Runs before any state changes, so a bad message changes nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from governor_daemon.errors import InvalidInputError, LimitExceededError
from tolaria.governor.v1 import trainer_service_pb2

RUN_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_WORLD_SIZE = 4096


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send."""

    max_records_per_batch: int = 4096
    max_string_length: int = 4096
    max_per_class: int = 100_000
    max_active_runs: int = 1024
    retain_finished_runs: int = 256


def check_run_id(field: str, run_id: str) -> None:
    """run_id must match [A-Za-z0-9._-]{1,128}."""
    if not RUN_ID_RE.match(run_id):
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
    check_text("hello.trainer_version", hello.trainer_version, limits)
    if hello.HasField("num_classes") and hello.num_classes < 2:
        raise InvalidInputError("hello.num_classes", f"must be >= 2, got {hello.num_classes}")
    if hello.HasField("random_guess_loss") and not (
        math.isfinite(hello.random_guess_loss) and hello.random_guess_loss > 0
    ):
        raise InvalidInputError("hello.random_guess_loss", f"must be a positive number, got {hello.random_guess_loss}")


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
    if batch.first_seq < 1:
        raise InvalidInputError("vitals_batch.first_seq", "must be >= 1")
    steps = np.array(batch.step, dtype=np.int64)  # one C-level copy; min() over the field boxes each value
    if steps.min() < 0:
        raise InvalidInputError("vitals_batch.step", "steps must be >= 0")
    return steps


def validate_validation(record: trainer_service_pb2.ValidationRecord, limits: Limits) -> None:
    """A validation record's fields."""
    if record.seq < 1:
        raise InvalidInputError("validation_record.seq", "must be >= 1")
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


def validate_command_result(result: trainer_service_pb2.CommandResult, limits: Limits) -> None:
    """A CommandResult's fields."""
    if result.seq < 1:
        raise InvalidInputError("command_result.seq", "must be >= 1")
    if result.command_id < 1:
        raise InvalidInputError("command_result.command_id", "must be >= 1")
    if result.outcome not in (1, 2):
        raise InvalidInputError("command_result.outcome", "must be SUCCEEDED or FAILED")
    check_text("command_result.error", result.error, limits)


def validate_seq(field: str, seq: int) -> None:
    """Sequence numbers start at 1."""
    if seq < 1:
        raise InvalidInputError(field, "must be >= 1")
