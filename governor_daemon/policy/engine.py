"""Per-run decision engine: the detector profile plus every mechanism outside the profiles.

Pure: values and times (``now_s``, seconds on the daemon's monotonic clock) go in, decisions and
commands come out. No grpc, no files, no clock reads. The daemon core calls it (it is not
thread-safe); ``governor replay`` drives it from a trace. Times are never journaled: the command
timeout restarts at daemon start (``rearm``).

Mechanisms (docs/protocol.md): train-step signals, one command at a time, loop breaker, recovery
recipe, shadow mode, command timeout, Resume, policy updates. The run state is derived, never stored
twice: FINISHED > HALTED > ROLLING_BACK > STALLED > ANOMALY > HEALTHY.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from governor_daemon.errors import PolicyStateError
from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import (
    Action,
    Command,
    CommandKind,
    Decision,
    Rule,
    RunState,
    Verdict,
)
from governor_daemon.policy.detectors import (
    BLOW_UP_CEILING,
    DetectorState,
    blown_up,
    detector_for,
    fmt,
    lobotomy_band_below,
)
from governor_daemon.policy.recovery import Recovery, next_rung, recovery_of
from governor_daemon.policy.steps import (
    StepState,
    judge_pinned,
    pinned_states_from_json,
    pinned_states_to_json,
)

SHADOW_NOTE = "shadow mode: no command sent"
RECENT_COMMANDS = 8
"""Closed commands remembered to judge a late CommandResult."""
PINS_KEPT = 8
"""Detector states kept per rank for published snapshots (a trainer keeps at most about four)."""
CANDIDATES_KEPT = 32
"""Detector states kept per rank for snapshots a trainer may still publish (runtime only)."""
FAR_ABOVE_TRAIN = 0.5
"""A validation loss more than this fraction of the way from the train stream's level up to the random-guess
loss publishes no snapshot (a collapsed or broken model that a young history cannot judge yet)."""


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


class RunPolicy:
    """The policy state of one run and the operations that change it."""

    def __init__(
        self,
        config: PolicyConfig,
        world_size: int = 1,
        random_guess_loss: float | None = None,
        num_classes: int | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.config = config
        self.world_size = world_size
        self.task_rgl = random_guess_loss
        self.num_classes = num_classes
        self.timeline = 0
        self.detector = DetectorState()
        self.lowest_accepted: float | None = None
        self.judged = RunState.HEALTHY
        self.halted = False
        self.open: OpenCommand | None = None
        self.next_command_id = 1
        self.recent: deque[int] = deque(maxlen=config.rollback_window)
        self.stalled_ranks: set[int] = set()
        self.finished_ranks: set[int] = set()
        self.num_rollbacks = 0
        self.num_halts = 0
        self.total_punishment = 0.0  # charged when a trainer executes a command (``_charge``)
        self.last_punishment = 0.0
        self.charged: deque[int] = deque(maxlen=RECENT_COMMANDS)  # ids of the commands charged
        self.last_verdict: Verdict | None = None
        self.last_reason = ""
        self.latest_validation_step = -1
        self.recent_commands: deque[Command] = deque(maxlen=RECENT_COMMANDS)
        self.step_states: dict[int, StepState] = {}  # the train-stream detectors' state per rank
        # Per rank, the detector state as of each published snapshot: (timeline, step, state), oldest first.
        self.pins: dict[int, list[tuple[int, int, StepState]]] = {}
        # Runtime only: the state as of each step a trainer may stage a snapshot at, until it publishes one.
        self.candidates: dict[int, dict[tuple[int, int], StepState]] = {}
        self.recovery: Recovery | None = None  # the recovery ladder (policy/recovery.py)

    # ----------------------------------------------------------------- derived views

    @property
    def state(self) -> RunState:
        """The run state, derived from the flags in priority order."""
        if self.finished_ranks and len(self.finished_ranks) >= self.world_size:
            return RunState.FINISHED
        if self.halted:
            return RunState.HALTED
        if self.open is not None:
            return RunState.ROLLING_BACK
        if self.stalled_ranks:
            return RunState.STALLED
        return self.judged

    def random_guess_loss(self, record_rgl: float | None = None) -> float | None:
        """RGL in force: policy > record > Hello > ln(num_classes); None turns the lobotomy rule off."""
        if self.config.random_guess_loss is not None:
            return self.config.random_guess_loss
        if record_rgl is not None:
            return record_rgl
        if self.task_rgl is not None:
            return self.task_rgl
        if self.num_classes is not None and self.num_classes >= 2:
            return math.log(self.num_classes)
        return None

    def is_stale(self, timeline: int) -> bool:
        """True for a record of a timeline the run has already left (in flight during a rollback)."""
        return timeline < self.timeline

    def command(self, command_id: int) -> Command | None:
        """The open command or a recently closed one with this id."""
        if self.open is not None and self.open.command.command_id == command_id:
            return self.open.command
        return next((c for c in self.recent_commands if c.command_id == command_id), None)

    def halting_command(self) -> Command | None:
        """While HALTED: the HALT that halted the run (re-sent to a trainer that attaches, so that a new
        process knows it is halted too); None otherwise."""
        if not self.halted:
            return None
        return next((c for c in reversed(self.recent_commands) if c.kind is CommandKind.HALT), None)

    def rearm(self, now_s: float) -> None:
        """Restart the command timeout at ``now_s`` (daemon start: monotonic clocks restart too)."""
        if self.open is not None:
            self.open = replace(self.open, issued_at_s=now_s)

    # ----------------------------------------------------------------- judging records

    def judge_validation(
        self,
        timeline: int,
        step: int,
        losses_by_rank: Mapping[int, float],
        now_s: float,
        epoch: int | None = None,
        record_rgl: float | None = None,
        missing_ranks: Sequence[int] = (),
    ) -> Decision:
        """Judge the validation losses of one (timeline, step), one per reporting rank.

        Raises PolicyStateError for a stale or future timeline (the caller journals stale records
        without judging them). While a command is open or the run is HALTED the record is judged for
        the journal but changes neither history nor counter, and a PANIC is suppressed.
        """
        self._check_timeline(timeline)
        if not losses_by_rank:
            raise ValueError("judge_validation needs at least one rank's loss")
        ranks = tuple(sorted(losses_by_rank))
        losses = tuple(losses_by_rank[r] for r in ranks)
        rgl = self.random_guess_loss(record_rgl)
        judgement = detector_for(self.config.profile)(losses, self.detector, self.config, rgl)
        self.latest_validation_step = max(self.latest_validation_step, step)
        self.last_verdict = judgement.verdict
        self.last_reason = judgement.reason
        blocked = self._blocked_reason()
        if blocked is not None:
            action = self._would_be_action() if judgement.verdict is Verdict.PANIC else Action.NONE
            return self._decision(
                "validation",
                timeline,
                step,
                epoch,
                ranks,
                losses,
                judgement.verdict,
                judgement.rule,
                action,
                judgement.reason + f"; not committed: {blocked}",
                command=None,
                snapshot_allowed=False,
                appended=None,
                suppressed=blocked if action is not Action.NONE else None,
                missing_ranks=tuple(missing_ranks),
            )
        lowest_before = self.lowest_accepted
        self.detector = judgement.state
        if judgement.appended is not None:
            self.lowest_accepted = (
                judgement.appended if lowest_before is None else min(lowest_before, judgement.appended)
            )
        snapshot_allowed = judgement.verdict is Verdict.HEALTHY and (
            lowest_before is None or max(losses) <= self.config.multiplier * lowest_before
        )
        reason = judgement.reason
        if judgement.verdict is Verdict.HEALTHY and not snapshot_allowed:
            reason += (
                f"; no snapshot: loss {fmt(max(losses))} > {fmt(self.config.multiplier)}× lowest "
                f"accepted {fmt(lowest_before or 0.0)}"
            )
        if snapshot_allowed:
            broken = self._broken_validation(max(losses), rgl)
            if broken is not None:
                snapshot_allowed = False
                reason += f"; no snapshot: {broken}"
        if judgement.verdict is Verdict.PANIC:
            action, command, suppressed, reason = self._intervene(reason, timeline, step, now_s)
        else:
            self.judged = RunState.ANOMALY if judgement.verdict is Verdict.ANOMALY else RunState.HEALTHY
            self.recent.append(0)
            action, command, suppressed = Action.NONE, None, None
        self.last_reason = reason
        return self._decision(
            "validation",
            timeline,
            step,
            epoch,
            ranks,
            losses,
            judgement.verdict,
            judgement.rule,
            action,
            reason,
            command=command,
            snapshot_allowed=snapshot_allowed,
            appended=judgement.appended,
            suppressed=suppressed,
            missing_ranks=tuple(missing_ranks),
        )

    def judge_train_step(
        self,
        timeline: int,
        step: int,
        rank: int,
        loss: float,
        grad_norm: float | None,
        now_s: float,
        epoch: int | None = None,
        shed: bool = False,
    ) -> Decision:
        """Judge one train-step record: a non-finite loss or grad norm is a PANIC at once.

        Train records never enter the validation history. ``shed``: the record came in a shed batch,
        which the reason says. Raises PolicyStateError like ``judge_validation`` for a stale or future
        timeline.
        """
        self._check_timeline(timeline)
        values = [("loss", loss)] + ([("grad_norm", grad_norm)] if grad_norm is not None else [])
        bad = [(name, v) for name, v in values if blown_up(v)]
        if not bad:
            return self._decision(
                "train",
                timeline,
                step,
                epoch,
                (rank,),
                (loss,),
                Verdict.HEALTHY,
                Rule.TRAIN_FINITE,
                Action.NONE,
                "train step finite",
                command=None,
                snapshot_allowed=False,
                appended=None,
                suppressed=None,
            )
        name, value = bad[0]
        beyond = "" if not math.isfinite(value) else f" (beyond the ceiling {BLOW_UP_CEILING:g}: a blow-up)"
        reason = f"non-finite train {name} {value}{beyond} at step {step} (rank {rank})"
        if shed:
            reason += "; in a shed batch: the daemon was behind, so only the statistical detectors skipped it"
        return self._train_panic(Rule.TRAIN_NON_FINITE, reason, timeline, step, epoch, rank, loss, now_s, step)

    def judge_train_batch(
        self,
        timeline: int,
        rank: int,
        steps: npt.NDArray[np.int64],
        losses: npt.NDArray[np.float64],
        grads: npt.NDArray[np.float64] | None,
        now_s: float,
        epoch: int | None = None,
        lrs: npt.NDArray[np.float64] | None = None,
        pins: Sequence[int] = (),
        shed: bool = False,
    ) -> tuple[Decision | None, StepState | None]:
        """Judge a batch of one rank's train-step records, in step order: the first non-finite one is a
        PANIC at once (every profile); under the default profile the train-stream detectors
        (``policy/steps.py``) then judge the finite ones. A ``shed`` batch (the daemon was behind,
        docs/protocol.md "Shedding") gets the non-finite check only, which is vectorised and cheap: its
        pins keep the detector state as it stands. Returns the decision (None: nothing to say)
        and the rank's new detector state (None: unchanged, which it stays while a command is open or
        the run is halted: records produced under an open command say nothing about the healthy run).
        ``pins`` are steps a trainer may stage a snapshot at: the state as of each is kept (``pin``).
        Raises PolicyStateError like ``judge_validation`` for a stale or future timeline."""
        self._check_timeline(timeline)
        finite = _sane(losses) & (_sane(grads) if grads is not None else True)
        if not finite.all():
            bad = int(np.argmin(finite))
            grad = None if grads is None else float(grads[bad])
            decision = self.judge_train_step(
                timeline, int(steps[bad]), rank, float(losses[bad]), grad, now_s, epoch, shed
            )
            return decision, None
        if shed:
            self.keep_candidates(rank, timeline, pins)
            return None, None
        if self.config.profile != "default" or self._blocked_reason() is not None:
            return None, None
        state = self.step_states.get(rank, StepState(timeline=timeline))
        state, alarm, pinned = judge_pinned(
            state, timeline, steps, losses, grads, self.config, self.random_guess_loss(), rank, lrs, pins
        )
        self.step_states[rank] = state
        candidates = self.candidates.setdefault(rank, {})
        for step, pinned_state in pinned:
            candidates[(timeline, step)] = pinned_state
        while len(candidates) > CANDIDATES_KEPT:
            del candidates[next(iter(candidates))]
        if alarm is None:
            return None, state
        decision = self._train_panic(
            alarm.rule, alarm.reason, timeline, alarm.step, epoch, rank, alarm.loss, now_s, alarm.onset_step
        )
        return decision, state

    def _train_panic(
        self,
        rule: Rule,
        reason: str,
        timeline: int,
        step: int,
        epoch: int | None,
        rank: int,
        loss: float,
        now_s: float,
        onset_step: int,
    ) -> Decision:
        """A PANIC from the train stream: a command at once (unless one is open, or the run is halted)."""
        blocked = self._blocked_reason()
        if blocked is None:
            self.last_verdict = Verdict.PANIC
            action, command, suppressed, reason = self._intervene(reason, timeline, step, now_s, onset_step)
            self.last_reason = reason
        else:
            action, command, suppressed = self._would_be_action(), None, blocked
            reason += f"; not committed: {blocked}"
        decision = self._decision(
            "train",
            timeline,
            step,
            epoch,
            (rank,),
            (loss,),
            Verdict.PANIC,
            rule,
            action,
            reason,
            command=command,
            snapshot_allowed=False,
            appended=None,
            suppressed=suppressed,
        )
        return replace(decision, onset_step=onset_step)

    # ----------------------------------------------------------------- commands and their results

    def request_rollback(self, reason: str, now_s: float) -> Command:
        """A controller's ROLLBACK. Raises PolicyStateError if HALTED or a command is open."""
        if self.state is RunState.FINISHED:
            raise PolicyStateError("run has finished: every rank sent Finish")
        blocked = self._blocked_reason()
        if blocked is not None:
            raise PolicyStateError(f"cannot roll back now: {blocked}")
        self.detector = replace(self.detector, consecutive=0)
        return self._issue(
            CommandKind.ROLLBACK,
            f"requested by controller: {reason}",
            self.timeline,
            self.latest_validation_step,
            now_s,
        )

    def halt(self, reason: str, now_s: float) -> Command:
        """A controller's HALT; replaces an open ROLLBACK (the trainer executes the highest id)."""
        if self.halted:
            raise PolicyStateError("run is already halted; use Resume to continue it")
        if self.state is RunState.FINISHED:
            raise PolicyStateError("run has finished: every rank sent Finish")
        return self._issue(
            CommandKind.HALT,
            f"halted by controller: {reason}",
            self.timeline,
            self.latest_validation_step,
            now_s,
        )

    def resume(self, reason: str, now_s: float) -> Command:
        """Resume a HALTED run: clear loop breaker and counter, keep history, send RESUME.

        Raises PolicyStateError if the run is not HALTED.
        """
        if self.state is RunState.FINISHED:
            raise PolicyStateError("run has finished: every rank sent Finish")
        if not self.halted:
            raise PolicyStateError(f"run is {self.state}, not halted; only a halted run can be resumed")
        self.halted = False
        self.recent.clear()
        self.recovery = None  # a controller judged the fault handled: a recurrence starts the ladder afresh
        self.detector = replace(self.detector, consecutive=0)
        self.judged = RunState.HEALTHY
        return self._issue(
            CommandKind.RESUME,
            f"resumed by controller: {reason}",
            self.timeline,
            self.latest_validation_step,
            now_s,
        )

    def on_command_result(
        self,
        command_id: int,
        rank: int,
        succeeded: bool,
        new_timeline: int,
        error: str,
        now_s: float,
        restored_step: int | None = None,
    ) -> list[Notice]:
        """Record one rank's CommandResult (the caller checked it against ``command``). Returns notices.

        The first successful result of a ROLLBACK or RESUME moves the run to the command's timeline + 1:
        that rank restored, and its records carry the new timeline (its peers' older records are stale
        from then on). This holds for a late result too (the command was replaced by a HALT or timed
        out), as long as the command was made on the run's timeline. The command closes when every
        unfinished rank has answered. A failure HALTs the run with a HALT command.

        A rank that restored ``restored_step`` onto the run's timeline resumes its train-stream detectors
        from the state pinned for that snapshot (``restore_detectors``); the recovery ladder learns what the
        fault's rollback restored.
        """
        command = self.command(command_id)
        charge = None if command is None else self._charge(command)
        charged = [] if charge is None else [charge]
        moved = False
        moves = command is not None and command.kind is not CommandKind.HALT and command.timeline == self.timeline
        if succeeded and moves and new_timeline == self.timeline + 1:
            self.timeline, moved = new_timeline, True
            self.judged = RunState.HEALTHY
        restores = command is not None and command.kind is not CommandKind.HALT
        if succeeded and restores and restored_step is not None and new_timeline == self.timeline:
            assert command is not None
            self.restore_detectors(rank, restored_step, new_timeline)
            recovery = self.recovery
            if recovery is not None and recovery.command_id == command_id and recovery.restored_step is None:
                self.recovery = recovery.restored(restored_step)
        open_cmd = self.open
        if open_cmd is None or open_cmd.command.command_id != command_id:
            return [
                *charged,
                Notice(
                    "late_command_result",
                    f"result of command {command_id} from rank {rank} arrived after it closed"
                    + ("" if succeeded else f": failed: {error}")
                    + (f"; run now on timeline {self.timeline}" if moved else ""),
                ),
            ]
        if not succeeded:
            kind = open_cmd.command.kind
            self._close_open()
            notices = [*charged, Notice("command_failed", f"{kind} {command_id} failed on rank {rank}: {error}")]
            if kind is not CommandKind.HALT:
                halt = self._issue(
                    CommandKind.HALT,
                    f"{kind} {command_id} failed on rank {rank}: {error}",
                    self.timeline,
                    open_cmd.command.step,
                    now_s,
                    punishment=0.0,
                )
                notices.append(Notice("halt", halt.reason, halt))
            return notices
        done = open_cmd.ranks_done | {rank}
        reached = max(open_cmd.new_timeline, new_timeline)
        expected = set(range(self.world_size)) - self.finished_ranks
        if not expected <= done:
            self.open = replace(open_cmd, ranks_done=done, new_timeline=reached)
            return [
                *charged,
                Notice(
                    "command_progress",
                    f"{open_cmd.command.kind} {command_id}: {len(done & expected)}/{len(expected)} ranks done",
                ),
            ]
        self._close_open()
        return [
            *charged,
            Notice("command_completed", f"{open_cmd.command.kind} {command_id} completed; timeline {self.timeline}"),
        ]

    def on_adopted(self, rank: int, timeline: int, step: int) -> bool:
        """A new incarnation of ``rank`` adopted its snapshot of ``step`` (from shared memory) on ``timeline``
        and goes on on ``timeline`` + 1, as a rank that restored by executing a command does. The first rank
        to say so moves the run there; a peer that adopted the same step on the same timeline follows. Either
        resumes its train-stream detectors from the state pinned for the snapshot. An adoption on a timeline
        the run has left since changes nothing here (the rank's records are stale until it resyncs). Returns
        whether the run moved."""
        moved = timeline == self.timeline
        if moved:
            self.timeline = timeline + 1
        if timeline + 1 == self.timeline:
            self.restore_detectors(rank, step, self.timeline)
        return moved

    def timeout_due(self, now_s: float) -> bool:
        """Whether ``check_timeouts`` would act now (it changes nothing)."""
        return self.open is not None and now_s - self.open.issued_at_s > self.config.command_timeout_s

    def check_timeouts(self, now_s: float) -> list[Notice]:
        """HALT the run if the open command has waited longer than command_timeout_s."""
        open_cmd = self.open
        if open_cmd is None or not self.timeout_due(now_s):
            return []
        self._close_open()
        reason = (
            f"{open_cmd.command.kind} {open_cmd.command.command_id} had no result after "
            f"{fmt(now_s - open_cmd.issued_at_s)} s (command_timeout_s {fmt(self.config.command_timeout_s)})"
        )
        if open_cmd.command.kind is CommandKind.HALT:
            self.open = None  # already halted: the trainer that never answered still stops at its next agreement
            return [Notice("command_timeout", reason + "; run stays halted")]
        halt = self._issue(CommandKind.HALT, reason, self.timeline, open_cmd.command.step, now_s, punishment=0.0)
        return [Notice("command_timeout", reason + "; run halted", halt)]

    def finish(self, rank: int) -> list[Notice]:
        """Record a rank's Finish. An open command no longer waits for a finished rank: it completes when
        every unfinished rank has answered, and when no rank is left to execute it, it is closed as
        abandoned (no trainer executed it, so it charges nothing; docs/protocol.md, "Punishment ledger")."""
        self.finished_ranks.add(rank)
        self.stalled_ranks.discard(rank)
        open_cmd = self.open
        if open_cmd is None:
            return []
        name = f"{open_cmd.command.kind} {open_cmd.command.command_id}"
        if self.state is RunState.FINISHED:
            self._close_open()
            return [Notice("command_abandoned", f"{name}: every rank finished")]
        if set(range(self.world_size)) - self.finished_ranks <= open_cmd.ranks_done:
            self._close_open()
            return [Notice("command_completed", f"{name} completed (rank {rank} finished); timeline {self.timeline}")]
        return []

    def _close_open(self) -> None:
        if self.open is not None:
            self.recent_commands.append(self.open.command)
            self.open = None

    # ----------------------------------------------------------------- undo points

    def memento(self) -> dict[str, Any]:
        """The whole state, its mutable parts copied (cheap: a few containers): ``restore_memento`` puts it
        back after an event that raised (core/undo.py)."""
        state = dict(self.__dict__)
        state["recent"] = deque(self.recent, maxlen=self.recent.maxlen)
        state["recent_commands"] = deque(self.recent_commands, maxlen=self.recent_commands.maxlen)
        state["charged"] = deque(self.charged, maxlen=self.charged.maxlen)
        state["stalled_ranks"] = set(self.stalled_ranks)
        state["finished_ranks"] = set(self.finished_ranks)
        state["step_states"] = dict(self.step_states)
        state["pins"] = {rank: list(pins) for rank, pins in self.pins.items()}
        state["candidates"] = {rank: dict(c) for rank, c in self.candidates.items()}
        return state

    def restore_memento(self, state: dict[str, Any]) -> None:
        """Put back a ``memento``."""
        self.__dict__.clear()
        self.__dict__.update(state)

    # ----------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        """The whole policy state as a JSON-ready dict (journal checkpoints and effects)."""
        open_cmd = self.open
        return {
            "config": self.config.as_dict(),
            "world_size": self.world_size,
            "task_rgl": self.task_rgl,
            "num_classes": self.num_classes,
            "timeline": self.timeline,
            "history": list(self.detector.history),
            "consecutive": self.detector.consecutive,
            "lowest_accepted": self.lowest_accepted,
            "judged": str(self.judged),
            "halted": self.halted,
            "open": None
            if open_cmd is None
            else {
                "command": open_cmd.command.as_dict(),
                "ranks_done": sorted(open_cmd.ranks_done),
                "new_timeline": open_cmd.new_timeline,
            },
            "next_command_id": self.next_command_id,
            "recent": list(self.recent),
            "stalled_ranks": sorted(self.stalled_ranks),
            "finished_ranks": sorted(self.finished_ranks),
            "num_rollbacks": self.num_rollbacks,
            "num_halts": self.num_halts,
            "total_punishment": self.total_punishment,
            "last_punishment": self.last_punishment,
            "charged": list(self.charged),
            "last_verdict": None if self.last_verdict is None else str(self.last_verdict),
            "last_reason": self.last_reason,
            "latest_validation_step": self.latest_validation_step,
            "recent_commands": [c.as_dict() for c in self.recent_commands],
            "steps": {str(rank): state.as_dict() for rank, state in self.step_states.items()},
            "pins": {str(rank): pinned_states_to_json(pins) for rank, pins in self.pins.items()},
            "recovery": None if self.recovery is None else self.recovery.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunPolicy:
        """Inverse of ``to_dict``. Raises KeyError/ValueError for a malformed dict."""
        config = PolicyConfig(**data["config"])
        policy = cls(config, int(data["world_size"]), data["task_rgl"], data["num_classes"])
        policy.timeline = int(data["timeline"])
        policy.detector = DetectorState(tuple(float(x) for x in data["history"]), int(data["consecutive"]))
        policy.lowest_accepted = data["lowest_accepted"]
        policy.judged = RunState(data["judged"])
        policy.halted = bool(data["halted"])
        raw_open = data["open"]
        policy.open = (
            None
            if raw_open is None
            else OpenCommand(
                Command.from_dict(raw_open["command"]),
                0.0,  # re-armed at daemon start
                frozenset(int(r) for r in raw_open["ranks_done"]),
                int(raw_open["new_timeline"]),
            )
        )
        policy.next_command_id = int(data["next_command_id"])
        policy.recent = deque((int(x) for x in data["recent"]), maxlen=config.rollback_window)
        policy.stalled_ranks = {int(r) for r in data["stalled_ranks"]}
        policy.finished_ranks = {int(r) for r in data["finished_ranks"]}
        policy.num_rollbacks = int(data["num_rollbacks"])
        policy.num_halts = int(data["num_halts"])
        policy.total_punishment = float(data["total_punishment"])
        policy.last_punishment = float(data["last_punishment"])
        policy.charged = deque((int(x) for x in data.get("charged", [])), maxlen=RECENT_COMMANDS)
        policy.last_verdict = None if data["last_verdict"] is None else Verdict(data["last_verdict"])
        policy.last_reason = str(data["last_reason"])
        policy.latest_validation_step = int(data["latest_validation_step"])
        policy.recent_commands = deque(
            (Command.from_dict(c) for c in data.get("recent_commands", [])), maxlen=RECENT_COMMANDS
        )
        policy.step_states = {int(rank): StepState.from_dict(s) for rank, s in data.get("steps", {}).items()}
        policy.pins = {int(rank): pinned_states_from_json(p) for rank, p in data.get("pins", {}).items()}
        raw_recovery = data.get("recovery")
        policy.recovery = None if raw_recovery is None else Recovery.from_dict(raw_recovery)
        return policy

    # ----------------------------------------------------------------- detector states of snapshots

    def pin(self, rank: int, timeline: int, step: int) -> StepState | None:
        """A rank published a snapshot of (timeline, step): keep its detector state as of that step (the
        candidate its vitals pinned), to resume from after a restore to it. Returns the state kept, or
        None when no candidate exists (the daemon restarted since, or the profile judges no train stream)."""
        state = self.candidates.get(rank, {}).pop((timeline, step), None)
        if state is None and step == 0:
            state = StepState(timeline=timeline)  # the initial snapshot: nothing learnt yet
        if state is None:
            return None
        pins = [p for p in self.pins.get(rank, []) if (p[0], p[1]) != (timeline, step)]
        pins.append((timeline, step, state))
        self.pins[rank] = pins[-PINS_KEPT:]
        return state

    def keep_candidates(self, rank: int, timeline: int, pins: Sequence[int]) -> None:
        """Pins of records that were not judged (shed): the state as it stands is the best one for them."""
        if not pins or timeline != self.timeline:
            return
        state = self.step_states.get(rank)
        if state is None or state.timeline != timeline:
            state = StepState(timeline=timeline)
        candidates = self.candidates.setdefault(rank, {})
        for step in pins:
            candidates[(timeline, step)] = state
        while len(candidates) > CANDIDATES_KEPT:
            del candidates[next(iter(candidates))]

    def restore_detectors(self, rank: int, restored_step: int, timeline: int) -> StepState:
        """A rank restored the snapshot of ``restored_step`` and goes on on ``timeline``: its detectors resume
        from the state pinned for that snapshot (the newest pin of that step), or start afresh without one.
        Pins of steps after it belong to the abandoned future and are dropped."""
        kept = [p for p in self.pins.get(rank, []) if p[1] <= restored_step]
        pinned = [p for p in kept if p[1] == restored_step]
        if kept or rank in self.pins:
            self.pins[rank] = kept
        state = pinned[-1][2].resumed(timeline, restored_step) if pinned else StepState(timeline=timeline)
        self.step_states[rank] = state
        self.candidates.pop(rank, None)
        return state

    def train_level(self) -> float | None:
        """The lowest running level of the train loss among the ranks warm on the run's timeline (None
        without one)."""
        levels = [
            math.exp(min(s.loss_center, s.loss_fast))
            for s in self.step_states.values()
            if s.timeline == self.timeline and s.count >= self.config.step_warmup_steps
        ]
        return min(levels) if levels else None

    def _broken_validation(self, loss: float, rgl: float | None) -> str | None:
        """Why a healthy-judged validation loss still must not become the last-known-good: it sits in the
        collapse band, or far above the train stream's level (None when neither)."""
        level = self.train_level()
        if level is None or rgl is None:
            return None
        band = lobotomy_band_below(level, self.config, rgl)
        if band is not None and band.contains(loss):
            return (
                f"loss {fmt(loss)} is at the random-guess loss {fmt(rgl)} while the train stream's level is "
                f"{fmt(level)} (a collapse)"
            )
        gate = level + FAR_ABOVE_TRAIN * (rgl - level)
        if level < rgl and loss > gate:
            return (
                f"loss {fmt(loss)} is far above the train stream's level {fmt(level)} (more than "
                f"{fmt(FAR_ABOVE_TRAIN)} of the way to the random-guess loss {fmt(rgl)}: {fmt(gate)})"
            )
        return None

    # ----------------------------------------------------------------- ranks and policy

    def set_stalled(self, rank: int, stalled: bool) -> None:
        """Mark a rank STALLED or clear it (from the stall tracker or the rank deadline)."""
        if stalled:
            self.stalled_ranks.add(rank)
        else:
            self.stalled_ranks.discard(rank)

    def update_policy(self, config: PolicyConfig) -> None:
        """Switch to ``config`` from the next record on; a shrunk history keeps its newest entries."""
        self.config = config
        self.detector = replace(self.detector, history=self.detector.history[-config.history_window :])
        self.recent = deque(self.recent, maxlen=config.rollback_window)

    # ----------------------------------------------------------------- internals

    def _check_timeline(self, timeline: int) -> None:
        if timeline < self.timeline:
            raise PolicyStateError(f"stale record: timeline {timeline} < current {self.timeline}")
        if timeline > self.timeline:
            raise PolicyStateError(
                f"record from timeline {timeline} but the run is on {self.timeline}: "
                "the trainer restored without a command"
            )

    def _blocked_reason(self) -> str | None:
        if self.halted:
            return "run is halted"
        if self.open is not None:
            cmd = self.open.command
            return f"{cmd.kind} {cmd.command_id} still open"
        return None

    def _would_be_action(self) -> Action:
        window = self.config.rollback_window
        prior = sum(list(self.recent)[-(window - 1) :]) if window > 1 else 0
        return Action.HALT if prior + 1 > self.config.max_rollbacks else Action.ROLLBACK

    def _intervene(
        self, reason: str, timeline: int, step: int, now_s: float, onset_step: int | None = None
    ) -> tuple[Action, Command | None, str | None, str]:
        """Turn a committed PANIC into ROLLBACK or HALT (loop breaker), honouring shadow mode. A train-stream
        PANIC's ``onset_step`` goes with the command: the trainer restores a snapshot older than it."""
        fault_step = step if onset_step is None else onset_step
        rung = next_rung(self.recovery, fault_step, step, timeline, self.config)
        action = Action.HALT if rung.halt else self._would_be_action()
        if rung.note:
            reason += f"; {rung.note}"
        if action is Action.HALT and not rung.halt:
            window = self.config.rollback_window
            reason += (
                f"; loop breaker: rollback {sum(list(self.recent)[-(window - 1) :]) + 1} within the last "
                f"{window} decisions > max_rollbacks {self.config.max_rollbacks}: HALT"
            )
        self.detector = replace(self.detector, consecutive=0)
        self.recent.append(1)
        self.judged = RunState.HEALTHY
        if self.config.shadow_mode:
            return action, None, SHADOW_NOTE, f"{reason}; {SHADOW_NOTE}"
        if action is Action.HALT:
            halt = self._issue(CommandKind.HALT, reason, timeline, step, now_s, rung=rung.number if rung.halt else 0)
            return action, halt, None, reason
        command = self._issue(
            CommandKind.ROLLBACK,
            reason,
            timeline,
            step,
            now_s,
            onset_step=onset_step,
            lr_scale=rung.lr_scale,
            rung=rung.number,
            restore_before_step=rung.restore_before_step,
            skip_through_step=rung.skip_through_step,
        )
        self.recovery = recovery_of(command.command_id, rung, fault_step, step, timeline, self.recovery)
        return action, command, None, reason

    def _issue(
        self,
        kind: CommandKind,
        reason: str,
        timeline: int,
        step: int,
        now_s: float,
        punishment: float | None = None,
        onset_step: int | None = None,
        lr_scale: float | None = None,
        rung: int = 0,
        restore_before_step: int | None = None,
        skip_through_step: int | None = None,
    ) -> Command:
        """A new open command (replacing any open one). Its punishment is charged when a trainer executes
        it (``_charge``), not now."""
        if punishment is None:
            punishment = 0.0 if kind is CommandKind.RESUME else -self.config.death_penalty
        self._close_open()
        command = Command(
            command_id=self.next_command_id,
            kind=kind,
            reason=reason,
            punishment_reward=punishment,
            recovery_skip_batches=self.config.recovery_skip_batches,
            recovery_lr_scale=self.config.recovery_lr_scale if lr_scale is None else lr_scale,
            timeline=timeline,
            step=step,
            onset_step=onset_step,
            recovery_rung=rung,
            restore_before_step=restore_before_step,
            skip_through_step=skip_through_step,
        )
        self.next_command_id += 1
        self.open = OpenCommand(command, now_s)
        if kind is CommandKind.ROLLBACK:
            self.num_rollbacks += 1
        elif kind is CommandKind.HALT:
            self.num_halts += 1
            self.halted = True
        return command

    def _charge(self, command: Command) -> Notice | None:
        """A trainer executed ``command`` (its first CommandResult, of any outcome): charge its punishment,
        once (docs/protocol.md, "Punishment ledger"). Returns the notice that journals the charge."""
        if command.command_id in self.charged:
            return None
        self.charged.append(command.command_id)
        self.total_punishment += command.punishment_reward
        self.last_punishment = command.punishment_reward
        reason = f"{command.kind} {command.command_id} executed: punishment {fmt(command.punishment_reward)} charged"
        return Notice("punishment_charged", reason, charged=command.punishment_reward)

    def _decision(
        self,
        kind: str,
        timeline: int,
        step: int,
        epoch: int | None,
        ranks: tuple[int, ...],
        losses: tuple[float, ...],
        verdict: Verdict,
        rule: Rule,
        action: Action,
        reason: str,
        *,
        command: Command | None,
        snapshot_allowed: bool,
        appended: float | None,
        suppressed: str | None,
        missing_ranks: tuple[int, ...] = (),
    ) -> Decision:
        return Decision(
            kind=kind,
            timeline=timeline,
            step=step,
            epoch=epoch,
            ranks=ranks,
            losses=losses,
            verdict=verdict,
            rule=rule,
            action=action,
            reason=reason,
            punishment_reward=command.punishment_reward if command else None,
            command=command,
            snapshot_allowed=snapshot_allowed,
            appended=appended,
            consecutive_anomalies=self.detector.consecutive,
            run_state=self.state,
            suppressed=suppressed,
            shadow=suppressed == SHADOW_NOTE,
            missing_ranks=missing_ranks,
        )


def _sane(values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Finite and within the blow-up ceiling, elementwise (``detectors.blown_up``'s negation)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.abs(values) <= BLOW_UP_CEILING)
