"""Per-run decision engine: the detector profile plus every mechanism outside the profiles.

Pure: values and times (``now_s``, seconds on the daemon's monotonic clock) go in, decisions and
commands come out. No grpc, no files, no clock reads. The daemon core calls it (it is not
thread-safe); ``governor replay`` drives it from a trace. Times are never journaled: the command
timeout restarts at daemon start (``CommandLedger.rearm``).

Mechanisms (docs/protocol.md): train-step signals, one command at a time, loop breaker, recovery
recipe, shadow mode, command timeout, Resume, policy updates. The run state is derived, never stored
twice: FINISHED > HALTED > ROLLING_BACK > STALLED > ANOMALY > HEALTHY.

``RunPolicy`` composes the parts, each in its own module: the command ledger and the run's timeline
(``policy/commands.py``), the train-stream detectors' states and their pins (``policy/pins.py``), the
validation history (``policy/validation.py``), the loop breaker and the recovery ladder
(``policy/escalation.py``, ``policy/recovery.py``) and the ranks (``policy/roster.py``). The train stream is
judged by a ``TrainStream`` (``policy/train_stream.py``) handed the pins, and its alarms are committed here. The
rules are pure functions: the validation profiles (``policy/detectors.py``), the train-stream detectors
(``policy/steps.py``) and the non-finite rule of train records (``policy/finite.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from governor_daemon.errors import PolicyStateError
from governor_daemon.policy.commands import CommandLedger, CommandResult, Notice
from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import (
    Action,
    Command,
    CommandKind,
    Decision,
    Judged,
    Outcome,
    Rule,
    RunState,
    Verdict,
)
from governor_daemon.policy.detectors import Judgement
from governor_daemon.policy.escalation import Escalation
from governor_daemon.policy.pins import DetectorPins
from governor_daemon.policy.roster import Roster
from governor_daemon.policy.steps import StepState
from governor_daemon.policy.train_stream import TrainAlarm, TrainStream, non_finite_alarm
from governor_daemon.policy.validation import ValidationHistory

STATE_KEYS = (
    *("config", "world_size", "task_rgl", "num_classes", "timeline", "history", "consecutive"),
    *("lowest_accepted", "judged", "halted", "open", "next_command_id", "recent", "stalled_ranks"),
    *("finished_ranks", "num_rollbacks", "num_halts", "total_punishment", "last_punishment", "charged"),
    *("last_verdict", "last_reason", "latest_validation_step", "recent_commands", "steps", "pins", "recovery"),
)
"""The keys of ``RunPolicy.to_dict``, in their order: journaled in every entry's effects and checkpoints."""


class RunPolicy:
    """The policy state of one run and the operations that change it: judging records, the controller's
    commands, command results, finishes, stalls and policy updates.

    It composes five parts (``ledger``, ``detector_pins``, ``validation``, ``escalation``, ``roster``) and keeps
    the run's own flags (``judged``, the last verdict and reason); the run state is derived from them
    (``state``), never stored. Callers read a part's state from the part (``ledger.open``);
    only the run's timeline and whether it is halted are read here too.
    """

    def __init__(
        self,
        config: PolicyConfig,
        world_size: int = 1,
        random_guess_loss: float | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.config = config
        self.task_rgl = random_guess_loss
        self.num_classes = num_classes
        self.ledger = CommandLedger()
        self.detector_pins = DetectorPins()
        self.validation = ValidationHistory()
        self.escalation = Escalation(config.rollback_window)
        self.roster = Roster(world_size)
        self.judged = RunState.HEALTHY
        self.last_verdict: Verdict | None = None
        self.last_reason = ""

    # ----------------------------------------------------------------- derived views

    @property
    def timeline(self) -> int:
        """The run's timeline (``CommandLedger`` moves it)."""
        return self.ledger.timeline

    @property
    def halted(self) -> bool:
        """Whether a HALT halted the run (until a RESUME)."""
        return self.ledger.halted

    @property
    def state(self) -> RunState:
        """The run state, derived from the flags in priority order."""
        if self.roster.all_finished():
            return RunState.FINISHED
        if self.halted:
            return RunState.HALTED
        if self.ledger.open is not None:
            return RunState.ROLLING_BACK
        if self.roster.stalled:
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
        self.ledger.check_current(timeline)
        if not losses_by_rank:
            raise ValueError("judge_validation needs at least one rank's loss")
        ranks = tuple(sorted(losses_by_rank))
        judged = Judged(
            "validation", timeline, step, epoch, ranks, tuple(losses_by_rank[r] for r in ranks), tuple(missing_ranks)
        )
        rgl = self.random_guess_loss(record_rgl)
        judgement = self.validation.judge(step, judged.losses, self.config, rgl)
        self.last_verdict = judgement.verdict
        self.last_reason = judgement.reason
        blocked = self.ledger.blocked_reason()
        if blocked is None:
            return self._decision(judged, self._commit_validation(judged, judgement, rgl, now_s))
        action, suppressed, reason = self._uncommitted(judgement.verdict, judgement.reason, blocked)
        return self._decision(judged, Outcome(judgement.verdict, judgement.rule, action, reason, suppressed=suppressed))

    def _commit_validation(self, judged: Judged, judgement: Judgement, rgl: float | None, now_s: float) -> Outcome:
        """A validation judged while no command is open and the run is not halted: it enters the history,
        may become the last-known-good, and a PANIC turns into a command."""
        level = self.detector_pins.train_level(self.timeline, self.config.step_warmup_steps)
        snapshot_allowed, reason = self.validation.commit(judgement, max(judged.losses), level, rgl, self.config)
        if judgement.verdict is Verdict.PANIC:
            action, command, suppressed, reason = self._intervene(reason, judged.step, now_s)
        else:
            self.judged = RunState.ANOMALY if judgement.verdict is Verdict.ANOMALY else RunState.HEALTHY
            self.escalation.passed()
            action, command, suppressed = Action.NONE, None, None
        self.last_reason = reason
        return Outcome(
            judgement.verdict, judgement.rule, action, reason, command, snapshot_allowed, judgement.appended, suppressed
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
        """Judge one train-step record under the non-finite rule (policy/finite.py); train records never enter
        the validation history. Raises PolicyStateError like ``judge_validation`` for a stale or future timeline."""
        self.ledger.check_current(timeline)
        alarm = non_finite_alarm(timeline, step, rank, loss, grad_norm, epoch, shed)
        if alarm is not None:
            return self._train_panic(alarm, now_s)
        judged = Judged("train", timeline, step, epoch, (rank,), (loss,))
        return self._decision(judged, Outcome(Verdict.HEALTHY, Rule.TRAIN_FINITE, Action.NONE, "train step finite"))

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
        """Judge a batch of one rank's train-step records (``TrainStream.judge_batch``, which says what ``shed`` and
        ``pins`` do). Returns the decision (None: nothing to say) and the rank's new detector state (None: unchanged,
        which it stays while a command is open or the run is halted). Raises PolicyStateError like
        ``judge_validation`` for a stale or future timeline."""
        self.ledger.check_current(timeline)
        stream = TrainStream(self.detector_pins, self.config, self.random_guess_loss(), self.ledger.blocked_reason())
        alarm, state = stream.judge_batch(timeline, rank, steps, losses, grads, epoch, lrs, pins, shed)
        return (None if alarm is None else self._train_panic(alarm, now_s)), state

    def _train_panic(self, alarm: TrainAlarm, now_s: float) -> Decision:
        """Commit a PANIC from the train stream: a command at once (unless one is open, or the run is halted)."""
        blocked = self.ledger.blocked_reason()
        command = None
        if blocked is None:
            self.last_verdict = Verdict.PANIC
            action, command, suppressed, reason = self._intervene(
                alarm.reason, alarm.judged.step, now_s, alarm.onset_step
            )
            self.last_reason = reason
        else:
            action, suppressed, reason = self._uncommitted(Verdict.PANIC, alarm.reason, blocked)
        onset = alarm.onset_step
        outcome = Outcome(Verdict.PANIC, alarm.rule, action, reason, command, suppressed=suppressed, onset_step=onset)
        return self._decision(alarm.judged, outcome)

    # ----------------------------------------------------------------- commands and their results

    def request_rollback(self, reason: str, now_s: float) -> Command:
        """A controller's ROLLBACK. Raises PolicyStateError if HALTED or a command is open."""
        if self.state is RunState.FINISHED:
            raise PolicyStateError("run has finished: every rank sent Finish")
        blocked = self.ledger.blocked_reason()
        if blocked is not None:
            raise PolicyStateError(f"cannot roll back now: {blocked}")
        self.validation.reset_counter()
        return self._issue(CommandKind.ROLLBACK, f"requested by controller: {reason}", now_s)

    def halt(self, reason: str, now_s: float) -> Command:
        """A controller's HALT; replaces an open ROLLBACK (the trainer executes the highest id)."""
        if self.halted:
            raise PolicyStateError("run is already halted; use Resume to continue it")
        if self.state is RunState.FINISHED:
            raise PolicyStateError("run has finished: every rank sent Finish")
        return self._issue(CommandKind.HALT, f"halted by controller: {reason}", now_s)

    def resume(self, reason: str, now_s: float) -> Command:
        """Resume a HALTED run: clear loop breaker and counter, keep history, send RESUME.

        Raises PolicyStateError if the run is not HALTED.
        """
        if self.state is RunState.FINISHED:
            raise PolicyStateError("run has finished: every rank sent Finish")
        if not self.halted:
            raise PolicyStateError(f"run is {self.state}, not halted; only a halted run can be resumed")
        self.escalation.clear()
        self.validation.reset_counter()
        self.judged = RunState.HEALTHY
        return self._issue(CommandKind.RESUME, f"resumed by controller: {reason}", now_s)  # un-halts the run

    def _issue(self, kind: CommandKind, reason: str, now_s: float) -> Command:
        """A controller's command, at the run's latest validation step."""
        return self.ledger.issue(kind, reason, self.validation.latest_validation_step, now_s, self.config)

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
        """Record one rank's CommandResult (the caller checked it against ``ledger.command``); the ledger says
        what it closes and whether the run moves (``CommandLedger.on_result``). Returns notices. A rank that
        restored ``restored_step`` onto the run's timeline resumes its train-stream detectors from the state
        pinned for that snapshot (``DetectorPins.restore``); the recovery ladder learns what the fault's
        rollback restored."""
        command = self.ledger.command(command_id)
        result = CommandResult(command_id, rank, succeeded, new_timeline, error, restored_step)
        notices, moved = self.ledger.on_result(result, now_s, self.roster.expected(), self.config)
        if moved:
            self.judged = RunState.HEALTHY
        restores = succeeded and command is not None and command.kind is not CommandKind.HALT
        if restores and restored_step is not None and new_timeline == self.timeline:
            self.detector_pins.restore(rank, restored_step, new_timeline)
            self.escalation.restored(command_id, restored_step)
        return notices

    def on_adopted(self, rank: int, timeline: int, step: int) -> tuple[bool, list[Notice]]:
        """A new incarnation of ``rank`` adopted its snapshot of ``step`` (from shared memory) on ``timeline`` and
        goes on on ``timeline`` + 1, as a rank that restored by executing a command does (``CommandLedger.on_adopted``
        moves the run, or answers an open command). A rank that reaches the run's timeline so resumes its detectors
        from the state pinned for the snapshot; an adoption on a timeline the run has left since changes nothing
        here. Returns whether the run moved, and the notices."""
        moved, notices = self.ledger.on_adopted(rank, timeline, self.roster.expected())
        if timeline + 1 == self.timeline:
            self.detector_pins.restore(rank, step, self.timeline)
        return moved, notices

    def timeout_due(self, now_s: float) -> bool:
        """Whether ``check_timeouts`` would act now (it changes nothing)."""
        return self.ledger.timeout_due(now_s, self.config.command_timeout_s)

    def check_timeouts(self, now_s: float) -> list[Notice]:
        """HALT the run if the open command has waited longer than command_timeout_s."""
        return self.ledger.check_timeouts(now_s, self.config)

    def finish(self, rank: int) -> list[Notice]:
        """Record a rank's Finish. An open command no longer waits for a finished rank: it completes when
        every unfinished rank has answered, and when no rank is left to execute it, it is closed as
        abandoned (no trainer executed it, so it charges nothing; docs/protocol.md, "Punishment ledger")."""
        self.roster.finish(rank)
        return self.ledger.on_finish(rank, self.roster.expected(), self.roster.all_finished())

    # ----------------------------------------------------------------- undo points

    def memento(self) -> dict[str, Any]:
        """The whole state, its mutable parts copied (cheap: a few containers): ``restore_memento`` puts it
        back after an event that raised (core/undo.py)."""
        parts = ("ledger", "detector_pins", "validation", "escalation", "roster")
        return {**self.__dict__, **{name: getattr(self, name).copy() for name in parts}}

    def restore_memento(self, state: dict[str, Any]) -> None:
        """Put back a ``memento``."""
        self.__dict__.clear()
        self.__dict__.update(state)

    # ----------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        """The whole policy state as a JSON-ready dict (journal checkpoints and effects), keys in the order
        of ``STATE_KEYS``."""
        state = {
            "config": self.config.as_dict(),
            "task_rgl": self.task_rgl,
            "num_classes": self.num_classes,
            "judged": str(self.judged),
            "last_verdict": None if self.last_verdict is None else str(self.last_verdict),
            "last_reason": self.last_reason,
            **self.validation.to_dict(),
            **self.escalation.to_dict(),
            **self.ledger.to_dict(),
            **self.detector_pins.to_dict(),
            **self.roster.to_dict(),
        }
        return {key: state[key] for key in STATE_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunPolicy:
        """Inverse of ``to_dict``. Raises KeyError/ValueError for a malformed dict."""
        config = PolicyConfig(**data["config"])
        policy = cls(config, int(data["world_size"]), data["task_rgl"], data["num_classes"])
        policy.roster = Roster.from_dict(data)
        policy.ledger = CommandLedger.from_dict(data)
        policy.detector_pins = DetectorPins.from_dict(data)
        policy.validation = ValidationHistory.from_dict(data)
        policy.escalation = Escalation.from_dict(data, config.rollback_window)
        policy.judged = RunState(data["judged"])
        policy.last_verdict = None if data["last_verdict"] is None else Verdict(data["last_verdict"])
        policy.last_reason = str(data["last_reason"])
        return policy

    # ----------------------------------------------------------------- policy updates

    def update_policy(self, config: PolicyConfig) -> None:
        """Switch to ``config`` from the next record on; a shrunk history keeps its newest entries."""
        self.config = config
        self.validation.resize(config.history_window)
        self.escalation.resize(config.rollback_window)

    # ----------------------------------------------------------------- internals

    def _intervene(
        self, reason: str, step: int, now_s: float, onset_step: int | None = None
    ) -> tuple[Action, Command | None, str | None, str]:
        """Turn a committed PANIC into ROLLBACK or HALT (``Escalation.intervene``); the anomaly counter restarts."""
        self.validation.reset_counter()
        self.judged = RunState.HEALTHY
        return self.escalation.intervene(reason, step, onset_step, now_s, self.ledger, self.config)

    def _uncommitted(self, verdict: Verdict, reason: str, blocked: str) -> tuple[Action, str | None, str]:
        """A record judged while a command may not be issued (``blocked`` says why): a PANIC names the action it
        would have had, suppressed. Returns the action, what suppressed it, and the reason."""
        action = self.escalation.would_be_action(self.config) if verdict is Verdict.PANIC else Action.NONE
        return action, (blocked if action is not Action.NONE else None), f"{reason}; not committed: {blocked}"

    def _decision(self, judged: Judged, outcome: Outcome) -> Decision:
        return outcome.decision(judged, self.validation.detector.consecutive, self.state)
