"""GovernorConnection: the ``Governance`` of a governed loop over the Attach stream.

It translates between the loop's plain types (``tolaria_trainer.governance``) and the contract's
protobufs, and leaves everything else to ``GovernorClient`` (the sender thread) and the sans-IO
``TrainerProtocol`` under it. Commands are kept as received so that a result names exactly the
command the governor sent.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

from tolaria import package_version
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria_trainer.client.client import GovernorClient
from tolaria_trainer.governance import (
    AdoptionReport,
    Command,
    CommandReport,
    CommandType,
    Coverage,
    FinishReport,
    FinishStatus,
    GovernorRefused,
    SnapshotReport,
    ValidationReport,
    Verdict,
    VerdictKind,
    VitalsSource,
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
    types = {v: k for k, v in _COMMAND_TYPES.items()}
    return trainer_service_pb2.Command(
        command_id=command.command_id,
        type=types[command.type],
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


class GovernorConnection:
    """``Governance`` over one rank's GovernorClient."""

    governed = True

    def __init__(self, client: GovernorClient) -> None:
        self.client = client

    @property
    def connected(self) -> bool:
        """A stream is open and welcomed."""
        return self.client.connected

    @property
    def refusal(self) -> GovernorRefused | None:
        """The permanent refusal, if any."""
        return self.client.refused

    @property
    def run_timeline(self) -> int:
        """The run's timeline as the governor named it."""
        return self.client.run_timeline

    @property
    def num_unjudged_records(self) -> int:
        """Records journaled as stale and never judged."""
        return self.client.num_unjudged_records

    @property
    def num_dropped_records(self) -> int:
        """Train-step records dropped under back-pressure."""
        return self.client.num_dropped_records

    @property
    def num_shed_records(self) -> int:
        """Train-step records the governor acknowledged without judging them (it was behind)."""
        return self.client.num_shed_records

    @property
    def acked_seq(self) -> int:
        """The highest seq the governor acknowledged."""
        return self.client.acked_seq

    @property
    def last_snapshot(self) -> tuple[int, int, str] | None:
        """This rank's last published snapshot in shared memory as the last Welcome named it (timeline, step,
        digest); None without one (or before a Welcome, or from an older daemon). Read at start-up, the
        Welcome is the first of this process: the snapshot is one an earlier process published."""
        welcome = self.client.welcome
        if welcome is None or not welcome.HasField("last_snapshot") or not welcome.last_snapshot.digest:
            return None
        last = welcome.last_snapshot
        return (last.timeline, last.step, last.digest)

    @property
    def train_verification_steps(self) -> int | None:
        """Steps after which the train-stream detectors vouch for a step: the longest delay between an
        alarm's onset and the alarm, as the Welcome names it (0 when only non-finite records are judged;
        None before a Welcome)."""
        welcome = self.client.welcome
        if welcome is None:
            return None
        if welcome.HasField("train_verification_steps"):
            return welcome.train_verification_steps
        policy = welcome.effective_policy  # a daemon from before the field: its three patience-based rules
        if policy.profile != "default" or not policy.HasField("step_loss_patience"):
            return 0
        return max(policy.step_loss_patience, policy.step_collapse_patience)

    @property
    def num_history_losses(self) -> int:
        """Times the governor no longer held the run's history (its commands start at 1 again)."""
        return self.client.num_history_losses

    @property
    def commands_waiting(self) -> bool:
        """A command arrived that ``take_commands`` has not taken yet (lock-free)."""
        return self.client.commands_waiting

    def start(self, wait_s: float) -> bool:
        """Start the sender thread and wait up to ``wait_s`` for the first Welcome."""
        self.client.start()
        return self.client.wait_connected(wait_s)

    def unreachable_for_s(self) -> float:
        """Seconds since the last welcomed stream was lost."""
        return self.client.unreachable_for_s()

    def coverage(self) -> Coverage:
        """How governed the run was so far."""
        judged_any, never_judged, seconds_without, streams_lost = self.client.coverage()
        return Coverage(self.client.address, judged_any, never_judged, seconds_without, streams_lost)

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Queue train-step records; returns the last seq."""
        return self.client.send_vitals(chunk)

    def send_validation(self, report: ValidationReport) -> int:
        """Queue a ValidationRecord; returns its seq."""
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
                trainer_service_pb2.SeedStatus(
                    slot=seed.slot, blueprint=seed.blueprint, stage=seed.stage, alpha=seed.alpha
                )
            )
        return self.client.send_validation(record)

    def verdict(self, seq: int, wait_s: float) -> Verdict | None:
        """The Verdict on ``seq``; waits only while connected."""
        verdict = self.client.wait_verdict(seq, wait_s if self.client.connected else 0.0)
        if verdict is None:
            return None
        return Verdict(
            seq=verdict.seq,
            kind=_VERDICT_KINDS.get(verdict.kind, VerdictKind.ANOMALY),
            timeline=verdict.timeline,
            step=verdict.step,
            reason=verdict.reason,
            snapshot_allowed=verdict.snapshot_allowed,
        )

    def forget_verdict(self, seq: int) -> None:
        """Drop the Verdict on ``seq``."""
        self.client.forget_verdict(seq)

    def take_commands(self) -> list[Command]:
        """Commands received so far, each once (types this trainer does not know are skipped)."""
        return [command_from_proto(c) for c in self.client.take_commands() if c.type in _COMMAND_TYPES]

    def send_snapshot(self, report: SnapshotReport) -> None:
        """Queue a SnapshotTaken."""
        self.client.send_snapshot(
            report.timeline, report.step, report.snapshot_bytes, report.duration_ms, report.location, report.digest
        )

    def send_adopted(self, report: AdoptionReport) -> None:
        """Queue a SnapshotAdopted."""
        timeline, step, digest = report.snapshot
        snapshot = trainer_service_pb2.PublishedSnapshot(timeline=timeline, step=step, digest=digest)
        self.client.send_adopted(
            trainer_service_pb2.SnapshotAdopted(
                timeline=report.timeline, snapshot=snapshot, duration_ms=report.duration_ms
            )
        )

    def send_command_result(self, report: CommandReport) -> None:
        """Queue a CommandResult for the command as the governor sent it."""
        self.client.send_command_result(
            command_to_proto(report.command),
            report.succeeded,
            report.restored_step,
            report.duration_ms,
            report.error,
            report.num_culled_seeds,
            report.lr_after_restore,
        )

    def close(self, finish: FinishReport | None, flush_timeout_s: float) -> bool:
        """Queue the Finish (if any), flush up to ``flush_timeout_s`` and stop."""
        if finish is not None:
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
            self.client.send_finish(message)
        return self.client.close(flush_timeout_s=flush_timeout_s)

    def pending(self) -> int:
        """Messages not acknowledged yet."""
        return self.client.pending()
