"""The recovery ladder: a fault that comes back after its rollback escalates instead of being replayed.

A ROLLBACK puts the run back where the fault will happen again if the fault is deterministic (a bad
shard, a schedule bug): replaying it costs ``max_rollbacks`` rollbacks and then a HALT. PaLM's answer,
done by hand there, is to restart somewhat before the spike and skip the batches around it; this module
automates it, one rung per recurrence:

====  =========================================================================================
rung  the ROLLBACK's recipe
====  =========================================================================================
0     restore (the newest snapshot before the onset) with the configured recipe
1     restore a snapshot older than the one rung 0 restored, and skip the data through the
      alarm's step + ``escalation_skip_margin`` batches
2     the same, skipping twice the margin, and scale the learning rate by ``escalation_lr_scale``
3     HALT with a diagnosis: the fault is deterministic (recurs at step S from snapshot K after
      skipping N batches and the LR scaled)
====  =========================================================================================

A panic is a **recurrence** when the previous fault-driven ROLLBACK was executed (its restored step is
known), the run has moved past that ROLLBACK's timeline, and the new fault's step (a train-stream alarm's
onset, or the step of a validation decision) is at most ``recurrence_steps`` past the previous fault's: the
run met the fault again before getting past the point where it met it last time. Anything else starts
at rung 0. The loop breaker (``max_rollbacks`` within ``rollback_window`` decisions) still stands behind
the ladder as its last rung. Pure: the engine keeps a ``Recovery`` in its journaled state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from governor_daemon.policy.config import PolicyConfig

HALT_RUNG = 3


@dataclass(frozen=True)
class Recovery:
    """The last fault-driven ROLLBACK of a run, as the ladder needs it."""

    command_id: int
    rung: int
    fault_step: int  # the onset a train-stream alarm estimated, or the step of the validation decision
    first_fault_step: int  # the fault step of rung 0 (the ladder's first rollback)
    alarm_step: int
    timeline: int  # the timeline the command was made on
    restore_before_step: int | None = None
    skip_through_step: int | None = None
    lr_scale: float = 1.0
    restored_step: int | None = None  # from the first successful result
    origin_restored_step: int | None = None  # what rung 0 restored

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (every field is a scalar: built by hand, ``dataclasses.asdict`` deep-copies)."""
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recovery:
        """Inverse of ``as_dict``."""

        def optional(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(value)

        return cls(
            command_id=int(data["command_id"]),
            rung=int(data["rung"]),
            fault_step=int(data["fault_step"]),
            first_fault_step=int(data["first_fault_step"]),
            alarm_step=int(data["alarm_step"]),
            timeline=int(data["timeline"]),
            restore_before_step=optional("restore_before_step"),
            skip_through_step=optional("skip_through_step"),
            lr_scale=float(data["lr_scale"]),
            restored_step=optional("restored_step"),
            origin_restored_step=optional("origin_restored_step"),
        )

    def restored(self, step: int) -> Recovery:
        """The command was executed: it restored ``step``."""
        origin = step if self.rung == 0 else self.origin_restored_step
        return replace(self, restored_step=step, origin_restored_step=origin)


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Recovery))


@dataclass(frozen=True)
class Rung:
    """What the next fault-driven command does: a ROLLBACK with this recipe, or (``halt``) a HALT."""

    number: int
    halt: bool
    lr_scale: float
    restore_before_step: int | None
    skip_through_step: int | None
    note: str  # for the command's reason ("" at rung 0)


def next_rung(previous: Recovery | None, fault_step: int, alarm_step: int, timeline: int, config: PolicyConfig) -> Rung:
    """The rung of a fault at ``fault_step`` (alarm at ``alarm_step``) on ``timeline``, after ``previous``."""
    plain = Rung(0, False, config.recovery_lr_scale, None, None, "")
    if not config.escalation or previous is None or previous.restored_step is None:
        return plain
    if timeline <= previous.timeline or fault_step > previous.fault_step + config.recurrence_steps:
        return plain
    number = previous.rung + 1
    recurs = (
        f"recurrence: the fault recurs at step {fault_step} (first at step {previous.first_fault_step}, then at "
        f"{previous.fault_step}), {fault_step - previous.restored_step} steps after the restore to step "
        f"{previous.restored_step} by command {previous.command_id}"
    )
    if number >= HALT_RUNG:
        skipped = max(0, (previous.skip_through_step or previous.restored_step) - previous.restored_step)
        diagnosis = (
            f"deterministic fault: recurs at step {fault_step} from the snapshot of step {previous.restored_step} "
            f"after skipping {skipped} batches and LR x{previous.lr_scale:g} (rung {HALT_RUNG} of the recovery "
            "ladder: HALT)"
        )
        return Rung(number, True, previous.lr_scale, None, None, f"{recurs}; {diagnosis}")
    origin = previous.origin_restored_step if previous.origin_restored_step is not None else previous.restored_step
    margin = config.escalation_skip_margin * number
    lr_scale = config.recovery_lr_scale * (config.escalation_lr_scale if number >= 2 else 1.0)
    skip_through = max(alarm_step, fault_step) + margin
    recipe = f"restore a snapshot older than step {origin} and skip the data through step {skip_through}"
    if number >= 2:
        recipe += f", LR x{lr_scale:g}"
    return Rung(
        number, False, lr_scale, origin, skip_through, f"{recurs}; rung {number} of the recovery ladder: {recipe}"
    )


def recovery_of(
    command_id: int, rung: Rung, fault_step: int, alarm_step: int, timeline: int, previous: Recovery | None
) -> Recovery:
    """The ladder's state once a fault-driven ROLLBACK on ``rung`` is issued."""
    first = previous.first_fault_step if rung.number > 0 and previous is not None else fault_step
    origin = previous.origin_restored_step if rung.number > 0 and previous is not None else None
    return Recovery(
        command_id=command_id,
        rung=rung.number,
        fault_step=fault_step,
        first_fault_step=first,
        alarm_step=alarm_step,
        timeline=timeline,
        restore_before_step=rung.restore_before_step,
        skip_through_step=rung.skip_through_step,
        lr_scale=rung.lr_scale,
        origin_restored_step=origin,
    )
