"""Conversions between the contract's messages and the core's values. No I/O, no grpc.

``decode_request`` turns a validated AttachRequest into a core event; ``encode_message`` turns a core
message into an AttachResponse. Both the gRPC servicers and the simulation use them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from governor_daemon.core import effects as fx
from governor_daemon.core import events as ev
from governor_daemon.core.machine import Limits
from governor_daemon.core.registry import Run
from governor_daemon.errors import InvalidInputError
from governor_daemon.journal.entry import Committed
from governor_daemon.policy import Command, CommandKind, PolicyConfig, RunState, Verdict
from governor_daemon.policy.config import FIELD_NAMES
from governor_daemon.policy.decisions import float_to_json
from governor_daemon.policy.detectors import mean_and_pstdev
from governor_daemon.service import validation as check
from tolaria.governor.v1 import common_pb2, control_service_pb2, trainer_service_pb2

RUN_STATE_TO_PROTO = {
    RunState.HEALTHY: common_pb2.RUN_STATE_HEALTHY,
    RunState.ANOMALY: common_pb2.RUN_STATE_ANOMALY,
    RunState.ROLLING_BACK: common_pb2.RUN_STATE_ROLLING_BACK,
    RunState.HALTED: common_pb2.RUN_STATE_HALTED,
    RunState.STALLED: common_pb2.RUN_STATE_STALLED,
    RunState.FINISHED: common_pb2.RUN_STATE_FINISHED,
}
PROTO_TO_RUN_STATE = {v: k for k, v in RUN_STATE_TO_PROTO.items()}
VERDICT_TO_PROTO = {
    Verdict.HEALTHY: common_pb2.VERDICT_KIND_HEALTHY,
    Verdict.ANOMALY: common_pb2.VERDICT_KIND_ANOMALY,
    Verdict.PANIC: common_pb2.VERDICT_KIND_PANIC,
}
COMMAND_TO_PROTO = {
    CommandKind.ROLLBACK: common_pb2.COMMAND_TYPE_ROLLBACK,
    CommandKind.HALT: common_pb2.COMMAND_TYPE_HALT,
    CommandKind.RESUME: common_pb2.COMMAND_TYPE_RESUME,
}


def policy_to_proto(config: PolicyConfig) -> common_pb2.Policy:
    """The fully populated Policy message of a config (random_guess_loss unset when None)."""
    values = {k: v for k, v in config.as_dict().items() if v is not None}
    return common_pb2.Policy(**values)


def overrides_from_proto(policy: common_pb2.Policy) -> dict[str, Any]:
    """The fields set in a Policy message, as a dict of overrides."""
    present = {field.name for field, _ in policy.ListFields()}
    return {name: getattr(policy, name) for name in FIELD_NAMES if name in present}


def command_to_proto(command: Command, generation: int) -> trainer_service_pb2.AttachResponse:
    """A Command message for a stream of ``generation``."""
    message = trainer_service_pb2.Command(
        command_id=command.command_id,
        type=COMMAND_TO_PROTO[command.kind],
        reason=command.reason,
        punishment_reward=command.punishment_reward,
        recovery_skip_batches=command.recovery_skip_batches,
        recovery_lr_scale=command.recovery_lr_scale,
        generation=generation,
        timeline=command.timeline,
        step=command.step,
    )
    if command.onset_step is not None:
        message.onset_step = command.onset_step
    message.recovery_rung = command.recovery_rung
    if command.restore_before_step is not None:
        message.restore_before_step = command.restore_before_step
    if command.skip_through_step is not None:
        message.skip_through_step = command.skip_through_step
    return trainer_service_pb2.AttachResponse(command=message)


def decode_hello(
    hello: trainer_service_pb2.Hello,
    stream: int,
    peer: str,
    caller: str,
    now: float,
    limits: Limits,
    principal: str = "",
) -> ev.Attach:
    """A validated Hello as an Attach event. Raises InvalidInputError.

    The incarnation id is a secret of the trainer process (it lets a reconnect replace a stream): the
    core, the journal and every answer see only its digest.
    """
    check.validate_hello(hello, limits)
    return ev.Attach(
        stream=stream,
        run_id=hello.run_id,
        rank=hello.rank,
        world_size=hello.world_size,
        incarnation_id=incarnation_digest(hello.incarnation_id),
        task=hello.task,
        overrides=overrides_from_proto(hello.policy_overrides),
        random_guess_loss=hello.random_guess_loss if hello.HasField("random_guess_loss") else None,
        num_classes=hello.num_classes if hello.HasField("num_classes") else None,
        trainer_version=hello.trainer_version,
        peer=peer,
        caller=caller,
        now=now,
        principal=principal,
        timeline=hello.timeline if hello.HasField("timeline") else 0,
    )


def incarnation_digest(incarnation_id: str) -> str:
    """What the daemon keeps of an incarnation id: 24 hex digits of its SHA-256."""
    return hashlib.sha256(incarnation_id.encode("utf-8")).hexdigest()[:24]


def decode_request(
    request: trainer_service_pb2.AttachRequest, stream: int, now: float, limits: Limits
) -> ev.TrainerEvent:
    """A validated message after the Hello as a core event. Raises InvalidInputError or LimitExceededError."""
    kind = request.WhichOneof("message")
    if kind == "hello":
        raise InvalidInputError("hello", "Hello may only be the first message of a stream")
    if kind is None or kind not in _DECODERS:
        raise InvalidInputError("message", "empty AttachRequest")
    return _DECODERS[kind](getattr(request, kind), stream, now, limits)


def _decode_vitals(batch: trainer_service_pb2.VitalsBatch, stream: int, now: float, limits: Limits) -> ev.Vitals:
    steps = check.validate_vitals(batch, limits)
    return ev.Vitals(
        stream,
        batch.first_seq,
        batch.timeline,
        steps,
        batch.loss,
        batch.grad_norm,
        batch.num_dropped_records,
        now,
        lrs=batch.lr,
        pins=tuple(batch.pin_steps),
    )


def _decode_validation(
    record: trainer_service_pb2.ValidationRecord, stream: int, now: float, limits: Limits
) -> ev.Validation:
    check.validate_validation(record, limits)
    rgl = record.random_guess_loss if record.HasField("random_guess_loss") else None
    return ev.Validation(
        stream,
        record.seq,
        record.timeline,
        record.step,
        record.epoch,
        record.loss,
        rgl,
        validation_details(record),
        now,
    )


def _decode_heartbeat(beat: trainer_service_pb2.Heartbeat, stream: int, now: float, limits: Limits) -> ev.Heartbeat:
    return ev.Heartbeat(stream, beat.latest_step, beat.timeline, now)


def _decode_command_result(
    result: trainer_service_pb2.CommandResult, stream: int, now: float, limits: Limits
) -> ev.CommandResult:
    check.validate_command_result(result, limits)
    return ev.CommandResult(
        stream,
        result.seq,
        result.command_id,
        result.outcome == common_pb2.COMMAND_OUTCOME_SUCCEEDED,
        result.new_timeline,
        result.restored_step,
        result.duration_ms,
        result.error,
        result.num_culled_seeds,
        now,
        result.lr_after_restore if result.HasField("lr_after_restore") else None,
    )


def _decode_snapshot_taken(
    snap: trainer_service_pb2.SnapshotTaken, stream: int, now: float, limits: Limits
) -> ev.SnapshotTaken:
    check.validate_snapshot(snap, limits)
    return ev.SnapshotTaken(
        stream,
        snap.seq,
        snap.timeline,
        snap.step,
        snap.snapshot_bytes,
        snap.duration_ms,
        snap.location,
        now,
        snap.digest,
    )


def _decode_snapshot_adopted(
    adopted: trainer_service_pb2.SnapshotAdopted, stream: int, now: float, limits: Limits
) -> ev.SnapshotAdopted:
    check.validate_adopted(adopted, limits)
    snapshot = adopted.snapshot
    return ev.SnapshotAdopted(
        stream,
        adopted.seq,
        adopted.timeline,
        (snapshot.timeline, snapshot.step, snapshot.digest),
        adopted.duration_ms,
        now,
    )


def _decode_finish(finish: trainer_service_pb2.Finish, stream: int, now: float, limits: Limits) -> ev.Finish:
    check.validate_finish(finish, limits)
    return ev.Finish(
        stream,
        finish.seq,
        common_pb2.FinishStatus.Name(finish.status),
        finish.epochs_completed,
        finish.num_rollbacks,
        finish.message,
        finish.duration_s,
        finish.final_validation_loss if finish.HasField("final_validation_loss") else None,
        finish.final_validation_accuracy if finish.HasField("final_validation_accuracy") else None,
        now,
    )


_DECODERS: dict[str, Callable[[Any, int, float, Limits], ev.TrainerEvent]] = {
    "vitals_batch": _decode_vitals,
    "validation_record": _decode_validation,
    "heartbeat": _decode_heartbeat,
    "command_result": _decode_command_result,
    "snapshot_taken": _decode_snapshot_taken,
    "snapshot_adopted": _decode_snapshot_adopted,
    "finish": _decode_finish,
}
"""One decoder per case of AttachRequest's ``message`` oneof after the Hello: it validates the message and
returns its core event."""


def validation_details(record: trainer_service_pb2.ValidationRecord) -> dict[str, Any]:
    """A validation record as the journal describes it (non-finite floats encoded as strings)."""
    details: dict[str, Any] = {
        "seq": record.seq,
        "timeline": record.timeline,
        "step": record.step,
        "epoch": record.epoch,
        "loss": float_to_json(record.loss),
    }
    for name in ("accuracy", "perplexity", "train_loss", "train_accuracy", "random_guess_loss"):
        if record.HasField(name):
            details[name] = float_to_json(getattr(record, name))
    if record.per_class_accuracy:
        details["per_class_accuracy"] = [float_to_json(x) for x in record.per_class_accuracy]
    if record.seeds:
        details["seeds"] = [
            {"slot": s.slot, "blueprint": s.blueprint, "stage": s.stage, "alpha": s.alpha} for s in record.seeds
        ]
    return details


def encode_message(message: fx.Message) -> trainer_service_pb2.AttachResponse:
    """A core message for a trainer as the AttachResponse that carries it."""
    if isinstance(message, fx.Ack):
        return trainer_service_pb2.AttachResponse(
            ack=trainer_service_pb2.Ack(up_to_seq=message.up_to_seq, num_shed=message.num_shed)
        )
    if isinstance(message, fx.VerdictOut):
        return trainer_service_pb2.AttachResponse(
            verdict=trainer_service_pb2.Verdict(
                seq=message.seq,
                timeline=message.timeline,
                step=message.step,
                kind=VERDICT_TO_PROTO[message.verdict],
                reason=message.reason,
                snapshot_allowed=message.snapshot_allowed,
                run_state=RUN_STATE_TO_PROTO[message.run_state],
            )
        )
    if isinstance(message, fx.CommandOut):
        return command_to_proto(message.command, message.generation)
    if isinstance(message, fx.Welcome):
        welcome = trainer_service_pb2.Welcome(
            generation=message.generation,
            effective_policy=policy_to_proto(message.policy),
            last_durable_seq=message.last_durable_seq,
            timeline=message.timeline,
            run_state=RUN_STATE_TO_PROTO[message.run_state],
            ignored_policy_fields=message.ignored_policy_fields,
        )
        if message.random_guess_loss is not None:
            welcome.random_guess_loss = message.random_guess_loss
        welcome.train_verification_steps = message.train_verification_steps
        welcome.run_life = message.run_life
        if message.last_snapshot is not None:
            last = welcome.last_snapshot
            last.timeline, last.step, last.digest = message.last_snapshot
        return trainer_service_pb2.AttachResponse(welcome=welcome)
    if isinstance(message, fx.Resync):
        return trainer_service_pb2.AttachResponse(
            resync=trainer_service_pb2.Resync(
                timeline=message.timeline,
                up_to_seq=message.up_to_seq,
                reason=message.reason,
                run_state=RUN_STATE_TO_PROTO[message.run_state],
            )
        )
    return trainer_service_pb2.AttachResponse(
        stream_end=trainer_service_pb2.StreamEnd(reason=message.reason, end_process=message.end_process)
    )


def run_status_to_proto(run: Run, now_s: float, monotonic_s: float) -> control_service_pb2.RunStatus:
    """Everything a controller sees of a run."""
    policy = run.policy
    history = policy.validation.detector.history
    status = control_service_pb2.RunStatus(
        run_id=run.run_id,
        state=RUN_STATE_TO_PROTO[policy.state],
        timeline=policy.timeline,
        world_size=run.meta.world_size,
        task=run.meta.task,
        consecutive_anomalies=policy.validation.detector.consecutive,
        history_size=len(history),
        num_rollbacks=policy.ledger.num_rollbacks,
        num_halts=policy.ledger.num_halts,
        total_punishment_reward=policy.ledger.total_punishment,
        last_punishment_reward=policy.ledger.last_punishment,
        latest_validation_step=policy.validation.latest_validation_step,
        last_verdict=VERDICT_TO_PROTO[policy.last_verdict]
        if policy.last_verdict
        else common_pb2.VERDICT_KIND_UNSPECIFIED,
        last_reason=policy.last_reason,
        profile=policy.config.profile,
        last_cursor=run.last_cursor,
    )
    if history:
        status.history_mean, status.history_std = mean_and_pstdev(history)
    rgl = policy.random_guess_loss()
    if rgl is not None:
        status.random_guess_loss = rgl
    if policy.validation.lowest_accepted is not None:
        status.lowest_accepted_loss = policy.validation.lowest_accepted
    if policy.ledger.open is not None:
        cmd = policy.ledger.open.command
        status.open_command.CopyFrom(
            control_service_pb2.OpenCommand(
                command_id=cmd.command_id,
                type=COMMAND_TO_PROTO[cmd.kind],
                reason=cmd.reason,
                age_s=max(0.0, monotonic_s - policy.ledger.open.issued_at_s),
            )
        )
    for rank in sorted(run.ranks):
        state = run.ranks[rank]
        status.ranks.append(
            control_service_pb2.RankStatus(
                rank=rank,
                attached=state.stream is not None,
                stalled=rank in policy.roster.stalled,
                latest_step=state.latest_step,
                incarnation_id=state.incarnation_id,
                generation=state.generation,
                last_durable_seq=state.last_durable_seq,
                num_records=state.num_records,
                num_record_gaps=state.num_gaps,
                num_shed_records=state.num_shed,
                seconds_since_progress_s=state.tracker.seconds_since_progress(monotonic_s) if state.tracker else 0.0,
            )
        )
    return status


def entry_to_proto(entry: Committed) -> control_service_pb2.WatchEventsResponse:
    """A durable journal entry as a WatchEvents message."""
    return control_service_pb2.WatchEventsResponse(
        cursor=entry.seq,
        ts=entry.ts,
        run_id=entry.run,
        kind=entry.kind,
        payload_json=entry.payload_json,
        hash=entry.hash,
    )
