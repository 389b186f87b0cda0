"""Value types the policy engine returns: verdicts, actions, commands and decisions.

All are immutable and JSON-ready through ``as_dict``; the journal and the gRPC layer encode them,
the engine never does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

SHADOW_NOTE = "shadow mode: no command sent"
"""Why a decision in shadow mode sent no command (its ``suppressed``; ``shadow`` is set)."""


class Verdict(enum.StrEnum):
    """Judgement of one record."""

    HEALTHY = "healthy"
    ANOMALY = "anomaly"
    PANIC = "panic"


class Action(enum.StrEnum):
    """What the decision orders (or, suppressed or in shadow mode, would have ordered)."""

    NONE = "none"
    ROLLBACK = "rollback"
    HALT = "halt"


class CommandKind(enum.StrEnum):
    """Command types sent to the trainer."""

    ROLLBACK = "rollback"
    HALT = "halt"
    RESUME = "resume"


class RunState(enum.StrEnum):
    """Run states (docs/protocol.md, "Run states")."""

    HEALTHY = "healthy"
    ANOMALY = "anomaly"
    ROLLING_BACK = "rolling_back"
    HALTED = "halted"
    STALLED = "stalled"
    FINISHED = "finished"


class Rule(enum.StrEnum):
    """The rule that produced a verdict."""

    NON_FINITE = "non_finite"
    LOBOTOMY = "lobotomy"
    WARMUP = "warmup"
    DIVERGENCE = "divergence"
    NORMAL = "normal"
    TRAIN_NON_FINITE = "train_non_finite"
    TRAIN_FINITE = "train_finite"
    STEP_LOSS_SPIKE = "step_loss_spike"
    STEP_GRAD_BLOWUP = "step_grad_blowup"
    STEP_COLLAPSE = "step_collapse"
    STEP_RISE = "step_rise"
    STEP_LR_JUMP = "step_lr_jump"
    STEP_ZERO = "step_zero"


@dataclass(frozen=True)
class Command:
    """An order for every rank of a run. ``command_id`` is unique and increasing per run."""

    command_id: int
    kind: CommandKind
    reason: str
    punishment_reward: float
    recovery_skip_batches: int
    recovery_lr_scale: float
    timeline: int
    step: int
    onset_step: int | None = None  # where a train-stream detector estimates the anomaly began
    recovery_rung: int = 0  # the recovery ladder's rung (policy/recovery.py)
    restore_before_step: int | None = None  # restore a snapshot older than this (a recurrence)
    skip_through_step: int | None = None  # and skip the data through this step

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "command_id": self.command_id,
            "kind": str(self.kind),
            "reason": self.reason,
            "punishment_reward": self.punishment_reward,
            "recovery_skip_batches": self.recovery_skip_batches,
            "recovery_lr_scale": self.recovery_lr_scale,
            "timeline": self.timeline,
            "step": self.step,
            "onset_step": self.onset_step,
            "recovery_rung": self.recovery_rung,
            "restore_before_step": self.restore_before_step,
            "skip_through_step": self.skip_through_step,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Command:
        """Inverse of ``as_dict``."""
        return cls(
            command_id=int(data["command_id"]),
            kind=CommandKind(data["kind"]),
            reason=str(data["reason"]),
            punishment_reward=float(data["punishment_reward"]),
            recovery_skip_batches=int(data["recovery_skip_batches"]),
            recovery_lr_scale=float(data["recovery_lr_scale"]),
            timeline=int(data["timeline"]),
            step=int(data["step"]),
            onset_step=_optional_int(data.get("onset_step")),
            recovery_rung=int(data.get("recovery_rung", 0)),
            restore_before_step=_optional_int(data.get("restore_before_step")),
            skip_through_step=_optional_int(data.get("skip_through_step")),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Decision:
    """The outcome of judging one validation step (all ranks) or one train-step batch.

    ``action`` is what the rules ask for; ``command`` is set only when a command is actually sent
    (not suppressed, not shadow mode). ``suppressed`` names why an action was not carried out.
    """

    kind: str  # "validation" or "train"
    timeline: int
    step: int
    epoch: int | None
    ranks: tuple[int, ...]
    losses: tuple[float, ...]
    verdict: Verdict
    rule: Rule
    action: Action
    reason: str
    punishment_reward: float | None
    command: Command | None
    snapshot_allowed: bool
    appended: float | None
    consecutive_anomalies: int
    run_state: RunState
    suppressed: str | None = None
    shadow: bool = False
    missing_ranks: tuple[int, ...] = field(default_factory=tuple)
    onset_step: int | None = None  # a train-stream detector's estimate of where the anomaly began

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite losses as the strings "nan", "inf", "-inf")."""
        return {
            "kind": self.kind,
            "timeline": self.timeline,
            "step": self.step,
            "epoch": self.epoch,
            "ranks": list(self.ranks),
            "losses": [float_to_json(x) for x in self.losses],
            "verdict": str(self.verdict),
            "rule": str(self.rule),
            "action": str(self.action),
            "reason": self.reason,
            "punishment_reward": self.punishment_reward,
            "command": self.command.as_dict() if self.command else None,
            "snapshot_allowed": self.snapshot_allowed,
            "appended": self.appended,
            "consecutive_anomalies": self.consecutive_anomalies,
            "run_state": str(self.run_state),
            "suppressed": self.suppressed,
            "shadow": self.shadow,
            "missing_ranks": list(self.missing_ranks),
            "onset_step": self.onset_step,
        }


@dataclass(frozen=True)
class Judged:
    """What one decision judges: a validation step (every reporting rank's loss) or a rank's train record."""

    kind: str  # "validation" or "train"
    timeline: int
    step: int
    epoch: int | None
    ranks: tuple[int, ...]
    losses: tuple[float, ...]
    missing_ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What came of judging it (the engine turns a ``Judged`` and its ``Outcome`` into a ``Decision``)."""

    verdict: Verdict
    rule: Rule
    action: Action
    reason: str
    command: Command | None = None
    snapshot_allowed: bool = False
    appended: float | None = None
    suppressed: str | None = None
    onset_step: int | None = None

    def decision(self, judged: Judged, consecutive_anomalies: int, run_state: RunState) -> Decision:
        """The decision on ``judged``, with the run's anomaly counter and state as they stand after judging it."""
        command = self.command
        return Decision(
            kind=judged.kind,
            timeline=judged.timeline,
            step=judged.step,
            epoch=judged.epoch,
            ranks=judged.ranks,
            losses=judged.losses,
            verdict=self.verdict,
            rule=self.rule,
            action=self.action,
            reason=self.reason,
            punishment_reward=command.punishment_reward if command else None,
            command=command,
            snapshot_allowed=self.snapshot_allowed,
            appended=self.appended,
            consecutive_anomalies=consecutive_anomalies,
            run_state=run_state,
            suppressed=self.suppressed,
            shadow=self.suppressed == SHADOW_NOTE,
            missing_ranks=judged.missing_ranks,
            onset_step=self.onset_step,
        )


def float_to_json(value: float) -> float | str:
    """A float as JSON allows it: finite values as numbers, others as "nan", "inf", "-inf"."""
    if value != value:
        return "nan"
    if value == float("inf"):
        return "inf"
    if value == float("-inf"):
        return "-inf"
    return value


def float_from_json(value: float | int | str) -> float:
    """Inverse of ``float_to_json``; raises ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    lowered = value.strip().lower()
    if lowered in ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"):
        return float(lowered)
    raise ValueError(f"expected a number or nan/inf/-inf, got {value!r}")
