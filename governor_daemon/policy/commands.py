"""The command ledger of one run: the open command, issuing, results, timeouts, punishments, the timeline.

Pure like the rest of the engine: times (``now_s``) come in, notices come out (docs/protocol.md, "Commands",
"Punishment ledger"). ``RunPolicy`` owns one ``CommandLedger`` and decides *when* to issue; the ledger keeps
*what* was issued and what came of it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Set
from dataclasses import dataclass, replace
from typing import Any

from governor_daemon.errors import PolicyStateError
from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import Command, CommandKind
from governor_daemon.policy.detectors import fmt

RECENT_COMMANDS = 8
"""Closed commands remembered to judge a late CommandResult."""


@dataclass(frozen=True)
class OpenCommand:
    """A command sent and not yet answered by every expected rank."""

    command: Command
    issued_at_s: float
    ranks_done: frozenset[int] = frozenset()
    new_timeline: int = 0


@dataclass(frozen=True)
class Notice:
    """A state change outside a record's judgement (timeout, result, resume, policy change)."""

    kind: str
    reason: str
    command: Command | None = None
    charged: float | None = None  # a punishment charged (kind "punishment_charged")


@dataclass(frozen=True)
class Recipe:
    """What a command carries beyond the configured recipe: the recovery ladder's rung (policy/recovery.py) and
    where a train-stream detector estimates the fault began."""

    rung: int = 0
    lr_scale: float | None = None  # None: the configured recovery_lr_scale
    onset_step: int | None = None
    restore_before_step: int | None = None
    skip_through_step: int | None = None


PLAIN_RECIPE = Recipe()
"""The configured recipe, as is (controller commands, HALTs)."""


@dataclass(frozen=True)
class CommandResult:
    """One rank's CommandResult, as the engine reads it."""

    command_id: int
    rank: int
    succeeded: bool
    new_timeline: int
    error: str
    restored_step: int | None = None


class CommandLedger:
    """The commands of one run and the run's timeline, which only they (and adoptions) move.

    Invariant: at most one command is open per run (issuing one closes the open one: a trainer executes the
    highest id). A ROLLBACK or RESUME moves the run's timeline once, to its timeline + 1, with its first
    successful result (a late one too, as long as the command was made on the run's timeline). A command's
    punishment is charged once, when a trainer first reports executing it. A HALT halts the run until a
    RESUME is issued.
    """

    def __init__(self) -> None:
        self.timeline = 0
        self.halted = False
        self.open: OpenCommand | None = None
        self.next_command_id = 1
        self.recent_commands: deque[Command] = deque(maxlen=RECENT_COMMANDS)
        self.num_rollbacks = 0
        self.num_halts = 0
        self.total_punishment = 0.0  # charged when a trainer executes a command (``charge``)
        self.last_punishment = 0.0
        self.charged: deque[int] = deque(maxlen=RECENT_COMMANDS)  # ids of the commands charged

    # ----------------------------------------------------------------- views

    def command(self, command_id: int) -> Command | None:
        """The open command or a recently closed one with this id."""
        if self.open is not None and self.open.command.command_id == command_id:
            return self.open.command
        return next((c for c in self.recent_commands if c.command_id == command_id), None)

    def halting_command(self) -> Command | None:
        """While halted: the HALT that halted the run; None otherwise."""
        if not self.halted:
            return None
        return next((c for c in reversed(self.recent_commands) if c.kind is CommandKind.HALT), None)

    def blocked_reason(self) -> str | None:
        """Why no new command may be issued for a record now (None: one may)."""
        if self.halted:
            return "run is halted"
        if self.open is not None:
            cmd = self.open.command
            return f"{cmd.kind} {cmd.command_id} still open"
        return None

    def timeout_due(self, now_s: float, timeout_s: float) -> bool:
        """Whether the open command has waited longer than ``timeout_s``."""
        return self.open is not None and now_s - self.open.issued_at_s > timeout_s

    # ----------------------------------------------------------------- issuing

    def issue(
        self,
        kind: CommandKind,
        reason: str,
        step: int,
        now_s: float,
        config: PolicyConfig,
        punishment: float | None = None,
        recipe: Recipe = PLAIN_RECIPE,
    ) -> Command:
        """A new open command on the run's timeline (closing any open one). Its punishment (by default
        -death_penalty, none for a RESUME) is charged when a trainer executes it (``charge``), not now."""
        if punishment is None:
            punishment = 0.0 if kind is CommandKind.RESUME else -config.death_penalty
        self.close_open()
        command = Command(
            command_id=self.next_command_id,
            kind=kind,
            reason=reason,
            punishment_reward=punishment,
            recovery_skip_batches=config.recovery_skip_batches,
            recovery_lr_scale=config.recovery_lr_scale if recipe.lr_scale is None else recipe.lr_scale,
            timeline=self.timeline,
            step=step,
            onset_step=recipe.onset_step,
            recovery_rung=recipe.rung,
            restore_before_step=recipe.restore_before_step,
            skip_through_step=recipe.skip_through_step,
        )
        self.next_command_id += 1
        self.open = OpenCommand(command, now_s)
        if kind is CommandKind.ROLLBACK:
            self.num_rollbacks += 1
        elif kind is CommandKind.HALT:
            self.num_halts += 1
            self.halted = True
        else:
            self.halted = False
        return command

    def check_current(self, timeline: int) -> None:
        """Raise PolicyStateError unless a record of ``timeline`` is of the run's timeline: an earlier one is stale
        (in flight during a rollback), a later one means a trainer restored without a command."""
        if timeline < self.timeline:
            raise PolicyStateError(f"stale record: timeline {timeline} < current {self.timeline}")
        if timeline > self.timeline:
            raise PolicyStateError(
                f"record from timeline {timeline} but the run is on {self.timeline}: "
                "the trainer restored without a command"
            )

    def start_on(self, timeline: int) -> None:
        """A run that has issued no command yet starts on ``timeline`` (its first trainer is on it)."""
        if self.next_command_id != 1:
            raise PolicyStateError(f"command {self.next_command_id - 1} was issued on timeline {self.timeline}")
        self.timeline = timeline

    def close_open(self) -> None:
        """Close the open command, if any (it stays known to a late result)."""
        if self.open is not None:
            self.recent_commands.append(self.open.command)
            self.open = None

    def rearm(self, now_s: float) -> None:
        """Restart the open command's timeout at ``now_s`` (daemon start: monotonic clocks restart too)."""
        if self.open is not None:
            self.open = replace(self.open, issued_at_s=now_s)

    # ----------------------------------------------------------------- results

    def charge(self, command: Command) -> Notice | None:
        """A trainer executed ``command`` (its first CommandResult, of any outcome): charge its punishment,
        once. Returns the notice that journals the charge (None: charged before)."""
        if command.command_id in self.charged:
            return None
        self.charged.append(command.command_id)
        self.total_punishment += command.punishment_reward
        self.last_punishment = command.punishment_reward
        reason = f"{command.kind} {command.command_id} executed: punishment {fmt(command.punishment_reward)} charged"
        return Notice("punishment_charged", reason, charged=command.punishment_reward)

    def on_result(
        self, result: CommandResult, now_s: float, expected: Set[int], config: PolicyConfig
    ) -> tuple[list[Notice], bool]:
        """Record one rank's result; ``expected``: the ranks that must answer (the unfinished ones). Returns
        the notices and whether the run moved to a new timeline. The command closes when every expected rank
        has answered; a failure closes it and (unless it was a HALT) HALTs the run."""
        command = self.command(result.command_id)
        charge = None if command is None else self.charge(command)
        charged = [] if charge is None else [charge]
        moves = command is not None and command.kind is not CommandKind.HALT and command.timeline == self.timeline
        moved = result.succeeded and moves and result.new_timeline == self.timeline + 1
        if moved:
            self.timeline = result.new_timeline
        open_cmd = self.open
        if open_cmd is None or open_cmd.command.command_id != result.command_id:
            return [*charged, self._late(result, moved)], moved
        if not result.succeeded:
            return [*charged, *self._failed(open_cmd, result, now_s, config)], moved
        name = f"{open_cmd.command.kind} {result.command_id}"
        return [*charged, self._answered(open_cmd, name, result.rank, result.new_timeline, expected)], moved

    def _late(self, result: CommandResult, moved: bool) -> Notice:
        return Notice(
            "late_command_result",
            f"result of command {result.command_id} from rank {result.rank} arrived after it closed"
            + ("" if result.succeeded else f": failed: {result.error}")
            + (f"; run now on timeline {self.timeline}" if moved else ""),
        )

    def _failed(self, open_cmd: OpenCommand, result: CommandResult, now_s: float, config: PolicyConfig) -> list[Notice]:
        kind, command_id = open_cmd.command.kind, result.command_id
        self.close_open()
        why = f"{kind} {command_id} failed on rank {result.rank}: {result.error}"
        notices = [Notice("command_failed", why)]
        if kind is not CommandKind.HALT:
            halt = self.issue(CommandKind.HALT, why, open_cmd.command.step, now_s, config, punishment=0.0)
            notices.append(Notice("halt", halt.reason, halt))
        return notices

    def _answered(self, open_cmd: OpenCommand, name: str, rank: int, new_timeline: int, expected: Set[int]) -> Notice:
        """``rank`` answered the open command (``name`` says how), reaching ``new_timeline``: it closes once every
        rank in ``expected`` has."""
        done = open_cmd.ranks_done | {rank}
        if not expected <= done:
            reached = max(open_cmd.new_timeline, new_timeline)
            self.open = replace(open_cmd, ranks_done=done, new_timeline=reached)
            return Notice("command_progress", f"{name}: {len(done & expected)}/{len(expected)} ranks done")
        self.close_open()
        return Notice("command_completed", f"{name} completed; timeline {self.timeline}")

    def on_adopted(self, rank: int, timeline: int, expected: Set[int]) -> tuple[bool, list[Notice]]:
        """``rank`` adopted its snapshot on ``timeline`` and goes on on ``timeline`` + 1: the first to say so
        moves the run there. An open ROLLBACK or RESUME made on an earlier timeline is answered by the adoption
        (the process that died had executed it: the snapshot it left is what it restored; the trainer does not
        execute it again, which would take it back behind the run). Returns whether the run moved, and the
        notices of the answer."""
        moved = timeline == self.timeline
        if moved:
            self.timeline = timeline + 1
        open_cmd = self.open
        if open_cmd is None or open_cmd.command.kind is CommandKind.HALT or open_cmd.command.timeline >= timeline:
            return moved, []
        name = (
            f"{open_cmd.command.kind} {open_cmd.command.command_id} (made on timeline {open_cmd.command.timeline}) "
            f"answered by rank {rank}'s adoption"
        )
        return moved, [self._answered(open_cmd, name, rank, timeline + 1, expected)]

    def check_timeouts(self, now_s: float, config: PolicyConfig) -> list[Notice]:
        """HALT the run if the open command has waited longer than command_timeout_s."""
        open_cmd = self.open
        if open_cmd is None or not self.timeout_due(now_s, config.command_timeout_s):
            return []
        self.close_open()
        reason = (
            f"{open_cmd.command.kind} {open_cmd.command.command_id} had no result after "
            f"{fmt(now_s - open_cmd.issued_at_s)} s (command_timeout_s {fmt(config.command_timeout_s)})"
        )
        if open_cmd.command.kind is CommandKind.HALT:
            return [Notice("command_timeout", reason + "; run stays halted")]  # a silent trainer still stops
        halt = self.issue(CommandKind.HALT, reason, open_cmd.command.step, now_s, config, punishment=0.0)
        return [Notice("command_timeout", reason + "; run halted", halt)]

    def on_finish(self, rank: int, expected: Set[int], all_finished: bool) -> list[Notice]:
        """A rank finished; ``expected``: the ranks still unfinished. The open command completes when every
        one of them has answered, and is closed as abandoned (charging nothing) when the run has finished."""
        open_cmd = self.open
        if open_cmd is None:
            return []
        name = f"{open_cmd.command.kind} {open_cmd.command.command_id}"
        if all_finished:
            self.close_open()
            return [Notice("command_abandoned", f"{name}: every rank finished")]
        if expected <= open_cmd.ranks_done:
            self.close_open()
            return [Notice("command_completed", f"{name} completed (rank {rank} finished); timeline {self.timeline}")]
        return []

    # ----------------------------------------------------------------- undo points and persistence

    def copy(self) -> CommandLedger:
        """An independent copy (an undo point: its containers copied, its commands shared, being frozen)."""
        twin = CommandLedger.__new__(CommandLedger)
        twin.__dict__.update(self.__dict__)
        twin.recent_commands = deque(self.recent_commands, maxlen=self.recent_commands.maxlen)
        twin.charged = deque(self.charged, maxlen=self.charged.maxlen)
        return twin

    def to_dict(self) -> dict[str, Any]:
        """The ledger's part of the journaled policy state (``RunPolicy.to_dict`` orders the keys)."""
        open_cmd = self.open
        return {
            "timeline": self.timeline,
            "halted": self.halted,
            "open": None
            if open_cmd is None
            else {
                "command": open_cmd.command.as_dict(),
                "ranks_done": sorted(open_cmd.ranks_done),
                "new_timeline": open_cmd.new_timeline,
            },
            "next_command_id": self.next_command_id,
            "num_rollbacks": self.num_rollbacks,
            "num_halts": self.num_halts,
            "total_punishment": self.total_punishment,
            "last_punishment": self.last_punishment,
            "charged": list(self.charged),
            "recent_commands": [c.as_dict() for c in self.recent_commands],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CommandLedger:
        """Inverse of ``to_dict`` (an open command's timeout is re-armed at daemon start, ``rearm``)."""
        ledger = cls()
        ledger.timeline = int(data["timeline"])
        ledger.halted = bool(data["halted"])
        raw_open = data["open"]
        if raw_open is not None:
            ranks_done = frozenset(int(r) for r in raw_open["ranks_done"])
            command = Command.from_dict(raw_open["command"])
            ledger.open = OpenCommand(command, 0.0, ranks_done, int(raw_open["new_timeline"]))
        ledger.next_command_id = int(data["next_command_id"])
        ledger.num_rollbacks = int(data["num_rollbacks"])
        ledger.num_halts = int(data["num_halts"])
        ledger.total_punishment = float(data["total_punishment"])
        ledger.last_punishment = float(data["last_punishment"])
        ledger.charged.extend(int(x) for x in data.get("charged", []))
        ledger.recent_commands.extend(Command.from_dict(c) for c in data.get("recent_commands", []))
        return ledger
