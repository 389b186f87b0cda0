"""Conversions between the contract's messages and the policy core's values. No I/O, no grpc."""

from __future__ import annotations

import math
from typing import Any

from governor_daemon.journal import Committed
from governor_daemon.policy import Command, CommandKind, Decision, PolicyConfig, RunState, Verdict
from governor_daemon.policy.config import FIELD_NAMES
from governor_daemon.registry import Run
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
    return trainer_service_pb2.AttachResponse(
        command=trainer_service_pb2.Command(
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
    )


def verdict_to_proto(decision: Decision, seq: int) -> trainer_service_pb2.AttachResponse:
    """The Verdict message naming the (seq, timeline, step) it judges."""
    return trainer_service_pb2.AttachResponse(
        verdict=trainer_service_pb2.Verdict(
            seq=seq,
            timeline=decision.timeline,
            step=decision.step,
            kind=VERDICT_TO_PROTO[decision.verdict],
            reason=decision.reason,
            snapshot_allowed=decision.snapshot_allowed,
            run_state=RUN_STATE_TO_PROTO[decision.run_state],
        )
    )


def run_status_to_proto(run: Run, now_s: float, monotonic_s: float) -> control_service_pb2.RunStatus:
    """Everything a controller sees of a run."""
    policy = run.policy
    history = policy.detector.history
    status = control_service_pb2.RunStatus(
        run_id=run.run_id,
        state=RUN_STATE_TO_PROTO[policy.state],
        timeline=policy.timeline,
        world_size=run.meta.world_size,
        task=run.meta.task,
        consecutive_anomalies=policy.detector.consecutive,
        history_size=len(history),
        num_rollbacks=policy.num_rollbacks,
        num_halts=policy.num_halts,
        total_punishment_reward=policy.total_punishment,
        last_punishment_reward=policy.last_punishment,
        latest_validation_step=policy.latest_validation_step,
        last_verdict=VERDICT_TO_PROTO[policy.last_verdict]
        if policy.last_verdict
        else common_pb2.VERDICT_KIND_UNSPECIFIED,
        last_reason=policy.last_reason,
        profile=policy.config.profile,
        last_cursor=run.last_cursor,
    )
    if history:
        mean = math.fsum(history) / len(history)
        status.history_mean = mean
        status.history_std = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / len(history))
    rgl = policy.random_guess_loss()
    if rgl is not None:
        status.random_guess_loss = rgl
    if policy.lowest_accepted is not None:
        status.lowest_accepted_loss = policy.lowest_accepted
    if policy.open is not None:
        cmd = policy.open.command
        status.open_command.CopyFrom(
            control_service_pb2.OpenCommand(
                command_id=cmd.command_id,
                type=COMMAND_TO_PROTO[cmd.kind],
                reason=cmd.reason,
                age_s=max(0.0, now_s - policy.open.issued_at_s),
            )
        )
    for rank in sorted(run.ranks):
        state = run.ranks[rank]
        status.ranks.append(
            control_service_pb2.RankStatus(
                rank=rank,
                attached=state.stream is not None,
                stalled=rank in policy.stalled_ranks,
                latest_step=state.latest_step,
                incarnation_id=state.incarnation_id,
                generation=state.generation,
                last_durable_seq=state.last_durable_seq,
                num_records=state.num_records,
                num_record_gaps=state.num_gaps,
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
