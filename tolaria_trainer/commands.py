"""The governor's commands on one rank: collected from the stream, agreed with every rank, executed.

A command (ROLLBACK, HALT, RESUME) reaches each rank on its own stream, possibly not at all. At an
agreement point ``Commands.agree`` picks the one every rank executes; ``restore`` executes a ROLLBACK or
RESUME (``rollback.execute_restore``), ``halt`` waits for the RESUME that ends a HALT (docs/protocol.md,
"commands"). What a command did also goes to the loggers (``tolaria_trainer.loggers``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from tolaria_trainer.distributed import Distributed
from tolaria_trainer.errors import RollbackFailed
from tolaria_trainer.governance import Command, CommandReport, CommandType, Governance
from tolaria_trainer.guard import StepGuard
from tolaria_trainer.loggers import GovernorEvent, GovernorLoggers
from tolaria_trainer.outcome import Outcome
from tolaria_trainer.rollback import CommandLedger, RestoreOutcome, execute_restore
from tolaria_trainer.snapshot import LastKnownGood
from tolaria_trainer.training.state import TrainingState

log = logging.getLogger("tolaria.governed")

Progress = Callable[[dict[str, Any]], None]


class Commands:
    """The commands this rank knows and has executed, and the counts of what they did.

    Invariant: every rank executes the same command at the same agreement point (the highest id any rank
    holds, as the lowest rank holding it received it), or all stop (a HALT no RESUME ended within
    ``halt_wait_s``); a command id is executed at most once (``last_command_id`` only grows, until the
    governor loses the run's history and its ids restart).
    """

    def __init__(
        self,
        state: TrainingState,
        lkg: LastKnownGood,
        governance: Governance,
        dist: Distributed,
        guard: StepGuard | None,
        loggers: GovernorLoggers,
        progress: Progress,
        *,
        onset_margin_steps: int,
        halt_wait_s: float,
    ) -> None:
        self.state = state
        self.lkg = lkg
        self.governance = governance
        self.dist = dist
        self.guard = guard
        self.loggers = loggers
        self.progress = progress
        self.onset_margin_steps = onset_margin_steps
        self.halt_wait_s = halt_wait_s
        self.ledger = CommandLedger()
        self.known: dict[int, Command] = {}  # received and not executed yet, by id
        self.last_command_id = 0  # every rank executed every command up to this id
        self.num_rollbacks = 0
        self.num_restores = 0  # ROLLBACKs and RESUMEs executed
        self._history_losses = 0  # the governor lost the run's history this many times (its commands restart at 1)
        self._non_finite_at_restore = 0  # the guard's count of non-finite steps when the LKG was last restored
        self._logged_records = (0, 0)  # (shed, otherwise unjudged) as the loggers last saw them
        self._adopted_on: int | None = None  # the timeline this process adopted its last-known-good on

    def adopted_on(self, timeline: int) -> None:
        """This process adopted the last-known-good its predecessor left, on ``timeline`` (every rank did, on the
        same one). A ROLLBACK or RESUME made on an earlier timeline is answered by that adoption: the process
        that died had executed it (the snapshot it left is what it restored), and executing it again would take
        this rank back to that command's timeline + 1, behind the run. The governor counts the adoption as the
        rank's answer (docs/protocol.md, "Snapshots in shared memory")."""
        self._adopted_on = timeline

    def _answered_by_adoption(self, command: Command) -> bool:
        adopted_on = self._adopted_on
        if adopted_on is None or command.type is CommandType.HALT or command.timeline >= adopted_on:
            return False
        log.info(
            "%s %d (made on timeline %d) is answered by the adoption on timeline %d: not executed",
            command.type,
            command.command_id,
            command.timeline,
            adopted_on,
        )
        return True

    @property
    def condemned(self) -> bool:
        """True when this rank saw a non-finite step since the LKG was last restored (its update was not
        applied) or holds a command not yet executed: the governor's ROLLBACK is on its way."""
        seen = self.guard.num_non_finite_skipped if self.guard is not None else 0
        return seen > self._non_finite_at_restore or bool(self.known) or self.governance.commands_waiting

    def collect(self) -> None:
        """Take the commands the stream delivered (forgetting every one if the governor lost the run's history)."""
        losses = self.governance.num_history_losses
        if losses != self._history_losses:  # the governor no longer holds the run: its old orders are void
            self._history_losses = losses
            self.known.clear()
            self.last_command_id = 0
        for command in self.governance.take_commands():
            if command.command_id > self.last_command_id and not self._answered_by_adoption(command):
                self.known[command.command_id] = command  # (an executed command may still reach a slow rank)

    def any_known(self) -> bool:
        """Collect what the stream delivered so far; True if a command is known and not executed yet."""
        self.collect()
        return bool(self.known)

    def agree(self) -> Command | None:
        """The command every rank executes now: the highest id any rank holds, as the lowest rank holding
        it received it (so a rank whose stream never delivered it executes it too and the ranks never
        diverge). None when no rank holds a new command."""
        highest = self.dist.agree_max(max(self.known, default=0))
        if highest == 0:
            return None
        holds = highest in self.known
        holder = self.dist.agree_min(self.dist.rank if holds else self.dist.world_size)
        assert holder < self.dist.world_size, "the highest id came from a rank that holds it"
        data = json.dumps(dataclasses.asdict(self.known[highest])).encode() if holds else b""
        fields = json.loads(self.dist.broadcast_bytes(data, holder))
        command = Command(**{**fields, "type": CommandType(fields["type"])})
        self.known = {cid: c for cid, c in self.known.items() if cid > highest}
        self.last_command_id = highest
        return command

    def announce(self, command: Command) -> None:
        """Say which command this rank executes now (the log and ``progress``)."""
        log.warning(
            "governor command %d %s (punishment %g): %s",
            command.command_id,
            command.type,
            command.punishment_reward,
            command.reason,
        )
        self.progress(
            {
                "event": "command",
                "type": str(command.type),
                "command_id": command.command_id,
                "reason": command.reason,
                "punishment_reward": command.punishment_reward,
            }
        )

    def halt(self, command: Command) -> bool:
        """Execute a HALT: answer it, then stay alive with the LKG and the stream until every rank agrees on a
        RESUME (True: the caller executes it at an agreement point), or give up after ``halt_wait_s`` (False:
        every rank stops)."""
        self.governance.send_command_result(CommandReport(command, True, self.state.step, 0.0))
        self.log_event("halt", self.state.step, command)
        self.progress(
            {
                "event": "halted",
                "command_id": command.command_id,
                "reason": command.reason,
                "halt_wait_s": self.halt_wait_s,
            }
        )
        deadline = time.monotonic() + self.halt_wait_s
        while True:
            self.collect()
            resume = max((c for c, cmd in self.known.items() if cmd.type is CommandType.RESUME), default=0)
            if self.dist.agree_max(resume):
                return True
            if self.dist.agree_max(int(time.monotonic() >= deadline)):
                self.log_event("halted", self.state.step, command)
                return False
            time.sleep(0.1)

    def restore(self, command: Command) -> Outcome:
        """Execute a ROLLBACK or RESUME: restore the LKG in place, answer the governor, and say how the loop
        goes on. Raises RollbackFailed when the LKG could not be restored."""
        at_step = self.state.step
        rollback = command.type is CommandType.ROLLBACK
        outcome = self._execute_restore(command, rollback)
        self._report_result(command, outcome)
        if not outcome.succeeded:
            self.log_event("restore_failed", at_step, command, reason=f"{command.reason}; {outcome.error}")
            raise RollbackFailed(f"rollback {command.command_id} failed: {outcome.error}")
        self.num_restores += 1
        if rollback:
            self.num_rollbacks += 1
        if self.guard is not None:
            self._non_finite_at_restore = self.guard.num_non_finite_skipped
        self.progress(
            {
                "event": "restored",
                "command_id": command.command_id,
                "timeline": outcome.new_timeline,
                "restored_step": outcome.restored_step,
                "culled": list(outcome.culled),
                "duration_ms": outcome.duration_ms,
            }
        )
        restored = Outcome(
            restored=True,
            command=command,
            restored_step=outcome.restored_step,
            restored_epoch=self.state.epoch,
            timeline=outcome.new_timeline,
            skip_batches=self.state.skip_batches,
            lr_scale=command.recovery_lr_scale if rollback else 1.0,
            punishment_reward=command.punishment_reward,
            culled=outcome.culled,
            duration_ms=outcome.duration_ms,
        )
        self.log_event("rollback" if rollback else "resume", at_step, command, restored)
        return restored

    def _execute_restore(self, command: Command, rollback: bool) -> RestoreOutcome:
        """The restore itself, with a ROLLBACK's recovery recipe (none for a RESUME)."""
        return execute_restore(
            self.state,
            self.lkg,
            self.ledger,
            command.command_id,
            command.reason,
            command.timeline_after(succeeded=True),
            command.recovery_lr_scale if rollback else 1.0,
            command.recovery_skip_batches if rollback else 0,
            command.onset_step if rollback else None,
            self.onset_margin_steps,
            before_step=command.restore_before_step if rollback else None,
            skip_through_step=command.skip_through_step if rollback else None,
        )

    def _report_result(self, command: Command, outcome: RestoreOutcome) -> None:
        self.governance.send_command_result(
            CommandReport(
                command,
                outcome.succeeded,
                outcome.restored_step,
                outcome.duration_ms,
                outcome.error,
                len(outcome.culled),
                # The learning rate training continues with: the restored one, times recovery_lr_scale.
                self.state.learning_rate() if outcome.succeeded else None,
            )
        )

    def log_event(
        self, kind: str, at_step: int, command: Command | None, outcome: Outcome | None = None, reason: str = ""
    ) -> None:
        """Hand what a command did to the loggers (``tolaria_trainer.loggers``); nothing without loggers."""
        if not self.loggers:
            return
        governance = self.governance
        shed = governance.num_shed_records
        unjudged = governance.num_unjudged_records + governance.num_dropped_records
        self._logged_records = (shed, unjudged)
        self.loggers.emit(
            GovernorEvent(
                kind=kind,
                step=at_step,
                timeline=self.state.timeline,
                num_rollbacks=self.num_rollbacks,
                num_restores=self.num_restores,
                num_shed_records=shed,
                num_unjudged_records=unjudged,
                command_id=command.command_id if command is not None else None,
                command_type=str(command.type) if command is not None else "",
                reason=reason or (command.reason if command is not None else ""),
                restored_step=outcome.restored_step if outcome is not None else None,
                punishment_reward=command.punishment_reward if command is not None else 0.0,
                lr_scale=outcome.lr_scale if outcome is not None else 1.0,
                skip_batches=outcome.skip_batches if outcome is not None else 0,
            )
        )

    def log_records(self) -> None:
        """At an agreement point: a ``records`` event when more records went unjudged since the last event."""
        governance = self.governance
        now = (governance.num_shed_records, governance.num_unjudged_records + governance.num_dropped_records)
        if now != self._logged_records:
            self.log_event("records", self.state.step, None)
