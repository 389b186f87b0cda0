"""A run's state, its policy and a command's receipt as frozen dataclasses (``GetPanicState``, ``ListRuns``,
``GetPolicy``, the command calls)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any

from tolaria.governor.v1 import common_pb2, control_service_pb2
from tolaria.vocabulary import CommandType, RunState, VerdictKind, from_proto_enum, proto_name


class _ProtoJson:
    """``to_dict`` for the dataclasses that mirror a contract message field by field."""

    def to_dict(self) -> dict[str, Any]:
        """The message in protobuf's JSON mapping with the contract's field names: enums by their full names,
        fields at their default left out (``optional`` ones whenever set), non-finite floats as "NaN",
        "Infinity", "-Infinity"; but 64-bit integers as JSON numbers, not strings (what ``governor ... --json``
        prints)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            optional = f.default is None
            if not optional and (not value or (isinstance(value, enum.StrEnum) and value.value == "UNSPECIFIED")):
                continue
            out[f.name] = _json_value(value)
        return out


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.StrEnum):
        return proto_name(value)
    if isinstance(value, _ProtoJson):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


@dataclass(frozen=True, kw_only=True)
class RankStatus(_ProtoJson):
    """One rank of a run."""

    rank: int
    attached: bool
    """An Attach stream of this rank is open."""
    stalled: bool
    latest_step: int
    incarnation_id: str
    generation: int
    last_durable_seq: int
    num_records: int
    num_record_gaps: int
    """Records missing between accepted seqs (dropped by the trainer or lost)."""
    seconds_since_progress_s: float
    num_shed_records: int = 0
    """Train-step records acknowledged unjudged because the daemon was behind."""


@dataclass(frozen=True, kw_only=True)
class OpenCommand(_ProtoJson):
    """The command awaiting its result."""

    command_id: int
    type: CommandType
    reason: str
    age_s: float
    """Seconds since it was issued."""


@dataclass(frozen=True, kw_only=True)
class RunStatus(_ProtoJson):
    """Everything the daemon tells a controller about one run (``RunStatus`` of the contract).

    Fields the contract marks ``optional`` are None when unset (e.g. ``history_mean`` before any accepted loss).
    """

    run_id: str
    state: RunState
    timeline: int
    world_size: int
    task: str
    consecutive_anomalies: int
    history_size: int
    """Accepted losses in the history window."""
    history_mean: float | None = None
    history_std: float | None = None
    """Population standard deviation of the history."""
    random_guess_loss: float | None = None
    num_rollbacks: int
    num_halts: int
    total_punishment_reward: float
    """Sum of the punishment rewards of all the run's commands so far."""
    latest_validation_step: int
    last_verdict: VerdictKind
    last_reason: str
    open_command: OpenCommand | None = None
    ranks: tuple[RankStatus, ...]
    profile: str
    last_cursor: int
    """Cursor of the run's latest journal entry: ``events(cursor=last_cursor, runs=[run_id])`` sees only what
    comes next."""
    lowest_accepted_loss: float | None = None
    last_punishment_reward: float
    """Punishment of the latest command (what an RL controller polling the state reads)."""


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _rank_status(r: control_service_pb2.RankStatus) -> RankStatus:
    return RankStatus(
        rank=r.rank,
        attached=r.attached,
        stalled=r.stalled,
        latest_step=r.latest_step,
        incarnation_id=r.incarnation_id,
        generation=r.generation,
        last_durable_seq=r.last_durable_seq,
        num_records=r.num_records,
        num_record_gaps=r.num_record_gaps,
        seconds_since_progress_s=r.seconds_since_progress_s,
        num_shed_records=r.num_shed_records,
    )


def run_status_from_proto(s: control_service_pb2.RunStatus) -> RunStatus:
    open_command = None
    if s.HasField("open_command"):
        oc = s.open_command
        open_command = OpenCommand(
            command_id=oc.command_id,
            type=from_proto_enum(CommandType, common_pb2.CommandType, oc.type),
            reason=oc.reason,
            age_s=oc.age_s,
        )
    return RunStatus(
        run_id=s.run_id,
        state=from_proto_enum(RunState, common_pb2.RunState, s.state),
        timeline=s.timeline,
        world_size=s.world_size,
        task=s.task,
        consecutive_anomalies=s.consecutive_anomalies,
        history_size=s.history_size,
        history_mean=_optional(s, "history_mean"),
        history_std=_optional(s, "history_std"),
        random_guess_loss=_optional(s, "random_guess_loss"),
        num_rollbacks=s.num_rollbacks,
        num_halts=s.num_halts,
        total_punishment_reward=s.total_punishment_reward,
        latest_validation_step=s.latest_validation_step,
        last_verdict=from_proto_enum(VerdictKind, common_pb2.VerdictKind, s.last_verdict),
        last_reason=s.last_reason,
        open_command=open_command,
        ranks=tuple(_rank_status(r) for r in s.ranks),
        profile=s.profile,
        last_cursor=s.last_cursor,
        lowest_accepted_loss=_optional(s, "lowest_accepted_loss"),
        last_punishment_reward=s.last_punishment_reward,
    )


@dataclass(frozen=True, kw_only=True)
class Policy(_ProtoJson):
    """Policy knobs (``Policy`` of the contract; its comments give each default). None: not set. ``get_policy``
    and ``update_policy`` return the effective policy, every field set."""

    profile: str | None = None
    history_window: int | None = None
    min_history: int | None = None
    sensitivity: float | None = None
    multiplier: float | None = None
    absolute_threshold: float | None = None
    min_panics_before_rollback: int | None = None
    random_guess_loss: float | None = None
    lobotomy_mean_ratio: float | None = None
    lobotomy_tolerance_ratio: float | None = None
    death_penalty: float | None = None
    """A ROLLBACK or HALT answering a fault or a controller has punishment_reward -death_penalty."""
    max_rollbacks: int | None = None
    rollback_window: int | None = None
    command_timeout_s: float | None = None
    recovery_skip_batches: int | None = None
    recovery_lr_scale: float | None = None
    shadow_mode: bool | None = None
    stall_timeout_s: float | None = None
    rank_deadline_s: float | None = None
    step_warmup_steps: int | None = None
    step_ema_steps: int | None = None
    step_loss_ratio: float | None = None
    step_loss_sigma: float | None = None
    step_loss_patience: int | None = None
    step_grad_ratio: float | None = None
    step_collapse_patience: int | None = None
    step_lr_ratio: float | None = None
    step_zero_patience: int | None = None
    step_rise_ratio: float | None = None
    step_rise_patience: int | None = None
    recurrence_steps: int | None = None
    escalation: bool | None = None
    escalation_skip_margin: int | None = None
    escalation_lr_scale: float | None = None
    end_stalled_ranks: bool | None = None


POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Policy))


def policy_from_proto(p: common_pb2.Policy) -> Policy:
    return Policy(**{name: _optional(p, name) for name in POLICY_FIELDS})


@dataclass(frozen=True)
class CommandReceipt:
    """The daemon's answer to rollback, halt and resume: the command it issued and the run's state after."""

    command_id: int
    run_state: RunState
