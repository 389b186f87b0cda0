"""How a run answers a committed PANIC: the recovery ladder's next rung (policy/recovery.py) and, behind it, the
loop breaker (docs/protocol.md, "Loop breaker")."""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Mapping
from typing import Any

from governor_daemon.policy.commands import CommandLedger, Recipe
from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import SHADOW_NOTE, Action, Command, CommandKind
from governor_daemon.policy.recovery import Recovery, Rung, next_rung, recovery_of


class Escalation:
    """The loop breaker's window (``recent``: 1 for each committed PANIC, 0 for each other committed validation,
    the newest ``rollback_window``) and the recovery ladder's state (``recovery``: the last fault-driven
    ROLLBACK).

    Invariant: a PANIC HALTs instead of rolling back when the ladder reached its HALT rung, or when it would be
    rollback number ``max_rollbacks`` + 1 within the window. A Resume clears both (``clear``). It holds no
    command: ``intervene`` issues a PANIC's on the ``CommandLedger`` it is handed.
    """

    def __init__(self, rollback_window: int) -> None:
        self.recent: deque[int] = deque(maxlen=rollback_window)
        self.recovery: Recovery | None = None

    def would_be_action(self, config: PolicyConfig) -> Action:
        """What the loop breaker makes of a PANIC now."""
        return Action.HALT if self._prior(config) + 1 > config.max_rollbacks else Action.ROLLBACK

    def _prior(self, config: PolicyConfig) -> int:
        window = config.rollback_window
        return sum(list(self.recent)[-(window - 1) :]) if window > 1 else 0

    def panic(
        self, reason: str, fault_step: int, alarm_step: int, timeline: int, config: PolicyConfig
    ) -> tuple[Action, Rung, str]:
        """A committed PANIC (its fault at ``fault_step``, its alarm at ``alarm_step``), counted in the window.
        Returns the action, the ladder's rung and the reason with the ladder's and the loop breaker's notes."""
        rung = next_rung(self.recovery, fault_step, alarm_step, timeline, config)
        action = Action.HALT if rung.halt else self.would_be_action(config)
        if rung.note:
            reason += f"; {rung.note}"
        if action is Action.HALT and not rung.halt:
            window = config.rollback_window
            reason += (
                f"; loop breaker: rollback {sum(list(self.recent)[-(window - 1) :]) + 1} within the last "
                f"{window} decisions > max_rollbacks {config.max_rollbacks}: HALT"
            )
        self.recent.append(1)
        return action, rung, reason

    def intervene(
        self, reason: str, step: int, onset_step: int | None, now_s: float, ledger: CommandLedger, config: PolicyConfig
    ) -> tuple[Action, Command | None, str | None, str]:
        """Turn a committed PANIC of ``step`` (on the ledger's timeline) into a ROLLBACK or HALT issued on ``ledger``,
        honouring shadow mode (no command: what suppressed it is ``SHADOW_NOTE``). A train-stream PANIC's
        ``onset_step`` goes with the command: the trainer restores a snapshot older than it. Returns the action, the
        command, what suppressed it, and the reason."""
        fault_step = step if onset_step is None else onset_step
        action, rung, reason = self.panic(reason, fault_step, step, ledger.timeline, config)
        if config.shadow_mode:
            return action, None, SHADOW_NOTE, f"{reason}; {SHADOW_NOTE}"
        kind, recipe = command_for(action, rung, onset_step)
        command = ledger.issue(kind, reason, step, now_s, config, recipe=recipe)
        if kind is CommandKind.ROLLBACK:
            self.rolled_back(command.command_id, rung, fault_step, step, ledger.timeline)
        return action, command, None, reason

    def passed(self) -> None:
        """A committed validation that was no PANIC."""
        self.recent.append(0)

    def rolled_back(self, command_id: int, rung: Rung, fault_step: int, alarm_step: int, timeline: int) -> None:
        """The PANIC's ROLLBACK was issued on ``rung``: the ladder's new state."""
        self.recovery = recovery_of(command_id, rung, fault_step, alarm_step, timeline, self.recovery)

    def restored(self, command_id: int, step: int) -> None:
        """Command ``command_id`` was executed, restoring ``step``: the ladder learns it from the first result."""
        recovery = self.recovery
        if recovery is not None and recovery.command_id == command_id and recovery.restored_step is None:
            self.recovery = recovery.restored(step)

    def clear(self) -> None:
        """A Resume: a controller judged the fault handled, so a recurrence starts the ladder afresh."""
        self.recent.clear()
        self.recovery = None

    def resize(self, rollback_window: int) -> None:
        """A new rollback_window keeps the newest entries."""
        self.recent = deque(self.recent, maxlen=rollback_window)

    def copy(self) -> Escalation:
        """An independent copy (an undo point)."""
        twin = copy.copy(self)
        twin.recent = deque(self.recent, maxlen=self.recent.maxlen)
        return twin

    def to_dict(self) -> dict[str, Any]:
        """The journaled part (``RunPolicy.to_dict`` orders the keys)."""
        return {"recent": list(self.recent), "recovery": None if self.recovery is None else self.recovery.as_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], rollback_window: int) -> Escalation:
        """Inverse of ``to_dict``."""
        escalation = cls(rollback_window)
        escalation.recent.extend(int(x) for x in data["recent"])
        raw_recovery = data.get("recovery")
        escalation.recovery = None if raw_recovery is None else Recovery.from_dict(raw_recovery)
        return escalation


def command_for(action: Action, rung: Rung, onset_step: int | None) -> tuple[CommandKind, Recipe]:
    """The command that carries out a committed PANIC's ``action`` on ``rung``: a HALT (naming the ladder's HALT
    rung when that is what halts) or a ROLLBACK with the rung's recipe and the fault's ``onset_step`` (a trainer
    restores a snapshot older than it)."""
    if action is Action.HALT:
        return CommandKind.HALT, Recipe(rung=rung.number if rung.halt else 0)
    return CommandKind.ROLLBACK, Recipe(
        rung.number, rung.lr_scale, onset_step, rung.restore_before_step, rung.skip_through_step
    )
