"""The trainer's translation to and from the contract's protobufs: the only place it builds them.

The loop speaks the plain types of ``tolaria_trainer.governance``; ``GovernorConnection`` hands the
protocol what these functions build and hands the loop what they read. Commands are kept as received
by the protocol, so that a result names exactly the command the governor sent.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

from tolaria import package_version
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria_trainer.governance import (
    AdoptionReport,
    Command,
    CommandType,
    FinishReport,
    FinishStatus,
    SnapshotReport,
    ValidationReport,
    Verdict,
    VerdictKind,
)

_VERDICT_KINDS = {
    common_pb2.VERDICT_KIND_HEALTHY: VerdictKind.HEALTHY,
    common_pb2.VERDICT_KIND_ANOMALY: VerdictKind.ANOMALY,
    common_pb2.VERDICT_KIND_PANIC: VerdictKind.PANIC,
}
_COMMAND_TYPES = {
    common_pb2.COMMAND_TYPE_ROLLBACK: CommandType.ROLLBACK,
    common_pb2.COMMAND_TYPE_HALT: CommandType.HALT,
    common_pb2.COMMAND_TYPE_RESUME: CommandType.RESUME,
}
_COMMAND_TYPE_PROTOS = {v: k for k, v in _COMMAND_TYPES.items()}
_FINISH_STATUS = {
    FinishStatus.COMPLETED: common_pb2.FINISH_STATUS_COMPLETED,
    FinishStatus.HALTED: common_pb2.FINISH_STATUS_HALTED,
    FinishStatus.FAILED: common_pb2.FINISH_STATUS_FAILED,
}


def build_hello(
    run_id: str,
    rank: int,
    world_size: int,
    task: str,
    *,
    num_classes: int | None = None,
    random_guess_loss: float | None = None,
    policy: Mapping[str, Any] | None = None,
) -> trainer_service_pb2.Hello:
    """The Hello of one rank's fresh incarnation (a new random incarnation id per process)."""
    hello = trainer_service_pb2.Hello(
        run_id=run_id,
        rank=rank,
        world_size=world_size,
        incarnation_id=uuid.uuid4().hex,
        task=task,
        policy_overrides=common_pb2.Policy(**dict(policy or {})),
        trainer_version=f"tolaria-trainer {package_version()}",
    )
    if random_guess_loss is not None:
        hello.random_guess_loss = random_guess_loss
    if num_classes is not None:
        hello.num_classes = num_classes
    return hello


def command_from_proto(command: trainer_service_pb2.Command) -> Command:
    """The loop's view of a command."""
    return Command(
        command_id=command.command_id,
        type=_COMMAND_TYPES[command.type],
        reason=command.reason,
        punishment_reward=command.punishment_reward,
        timeline=command.timeline,
        step=command.step,
        recovery_skip_batches=command.recovery_skip_batches,
        recovery_lr_scale=command.recovery_lr_scale if command.recovery_lr_scale > 0 else 1.0,
        generation=command.generation,
        onset_step=command.onset_step if command.HasField("onset_step") else None,
        recovery_rung=command.recovery_rung,
        restore_before_step=command.restore_before_step if command.HasField("restore_before_step") else None,
        skip_through_step=command.skip_through_step if command.HasField("skip_through_step") else None,
    )


def command_to_proto(command: Command) -> trainer_service_pb2.Command:
    """The contract's form of a command (for a rank that learnt it from another rank)."""
    return trainer_service_pb2.Command(
        command_id=command.command_id,
        type=_COMMAND_TYPE_PROTOS[command.type],
        reason=command.reason,
        punishment_reward=command.punishment_reward,
        recovery_skip_batches=command.recovery_skip_batches,
        recovery_lr_scale=command.recovery_lr_scale,
        generation=command.generation,
        timeline=command.timeline,
        step=command.step,
        onset_step=command.onset_step,
        recovery_rung=command.recovery_rung,
        restore_before_step=command.restore_before_step,
        skip_through_step=command.skip_through_step,
    )


def is_known_command(command: trainer_service_pb2.Command) -> bool:
    """A command type this trainer knows (others are skipped: a newer daemon's)."""
    return command.type in _COMMAND_TYPES


def verdict_from_proto(verdict: trainer_service_pb2.Verdict) -> Verdict:
    """The loop's view of a Verdict (a kind this trainer does not know reads as an anomaly)."""
    return Verdict(
        seq=verdict.seq,
        kind=_VERDICT_KINDS.get(verdict.kind, VerdictKind.ANOMALY),
        timeline=verdict.timeline,
        step=verdict.step,
        reason=verdict.reason,
        snapshot_allowed=verdict.snapshot_allowed,
    )


def validation_record(report: ValidationReport) -> trainer_service_pb2.ValidationRecord:
    """The ValidationRecord of a validation report (a non-finite accuracy is left out, a finite one clamped)."""
    record = trainer_service_pb2.ValidationRecord(
        timeline=report.timeline,
        step=report.step,
        epoch=report.epoch,
        loss=report.loss,
        per_class_accuracy=report.per_class_accuracy,
    )
    if report.accuracy is not None and math.isfinite(report.accuracy):
        record.accuracy = min(1.0, max(0.0, report.accuracy))
    if report.perplexity is not None:
        record.perplexity = report.perplexity
    if report.train_loss is not None:
        record.train_loss = report.train_loss
    if report.train_accuracy is not None:
        record.train_accuracy = report.train_accuracy
    for seed in report.seeds:
        record.seeds.append(
            trainer_service_pb2.SeedStatus(slot=seed.slot, blueprint=seed.blueprint, stage=seed.stage, alpha=seed.alpha)
        )
    return record


def snapshot_taken(report: SnapshotReport) -> trainer_service_pb2.SnapshotTaken:
    """The SnapshotTaken of a snapshot that became the LKG."""
    return trainer_service_pb2.SnapshotTaken(
        timeline=report.timeline,
        step=report.step,
        snapshot_bytes=report.snapshot_bytes,
        duration_ms=report.duration_ms,
        location=report.location,
        digest=report.digest,
    )


def snapshot_adopted(report: AdoptionReport) -> trainer_service_pb2.SnapshotAdopted:
    """The SnapshotAdopted of a snapshot a restarted process adopted."""
    timeline, step, digest = report.snapshot
    snapshot = trainer_service_pb2.PublishedSnapshot(timeline=timeline, step=step, digest=digest)
    return trainer_service_pb2.SnapshotAdopted(
        timeline=report.timeline, snapshot=snapshot, duration_ms=report.duration_ms
    )


def finish_message(finish: FinishReport) -> trainer_service_pb2.Finish:
    """The Finish of a run's end (a non-finite final accuracy is left out)."""
    message = trainer_service_pb2.Finish(
        status=_FINISH_STATUS[finish.status],
        epochs_completed=finish.epochs_completed,
        num_rollbacks=finish.num_rollbacks,
        message=finish.message,
        duration_s=finish.duration_s,
    )
    if finish.final_validation_loss is not None:
        message.final_validation_loss = finish.final_validation_loss
    if finish.final_validation_accuracy is not None and math.isfinite(finish.final_validation_accuracy):
        message.final_validation_accuracy = finish.final_validation_accuracy
    return message
