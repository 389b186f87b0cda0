"""Per-run decision engine: the detector profile plus every mechanism outside the profiles.

Pure: values and times (``now_s``, seconds on the daemon's monotonic clock) go in, decisions and
commands come out. No grpc, no files, no clock reads. The daemon core calls it (it is not
thread-safe); ``governor replay`` drives it from a trace. Times are never journaled: the command
timeout restarts at daemon start (``rearm``).

Mechanisms (docs/protocol.md): train-step signals, one command at a time, loop breaker, recovery
recipe, shadow mode, command timeout, Resume, policy updates. The run state is derived, never stored
twice: FINISHED > HALTED > ROLLING_BACK > STALLED > ANOMALY > HEALTHY.

``RunPolicy`` composes the parts, each in its own module: the command ledger and the run's timeline
(``policy/commands.py``), the train-stream detectors' states and their pins (``policy/pins.py``), the
recovery ladder (``policy/recovery.py``), the train-stream detectors (``policy/steps.py``) and the
validation profiles (``policy/detectors.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from governor_daemon.errors import PolicyStateError
from governor_daemon.policy.commands import CommandLedger, CommandResult, Notice, OpenCommand, Recipe
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
from governor_daemon.policy.delegation import Delegated
from governor_daemon.policy.detectors import (
    BLOW_UP_CEILING,
    DetectorState,
    Judgement,
    blown_up,
    detector_for,
    fmt,
    lobotomy_band_below,
)
from governor_daemon.policy.pins import DetectorPins
from governor_daemon.policy.recovery import Recovery, next_rung, recovery_of
from governor_daemon.policy.steps import StepState, judge_pinned

SHADOW_NOTE = "shadow mode: no command sent"
FAR_ABOVE_TRAIN = 0.5
"""A validation loss more than this fraction of the way from the train stream's level up to the random-guess
loss publishes no snapshot (a collapsed or broken model that a young history cannot judge yet)."""

STATE_KEYS = (
    *("config", "world_size", "task_rgl", "num_classes", "timeline", "history", "consecutive"),
    *("lowest_accepted", "judged", "halted", "open", "next_command_id", "recent", "stalled_ranks"),
    *("finished_ranks", "num_rollbacks", "num_halts", "total_punishment", "last_punishment", "charged"),
    *("last_verdict", "last_reason", "latest_validation_step", "recent_commands", "steps", "pins", "recovery"),
)
"""The keys of ``RunPolicy.to_dict``, in their order: journaled in every entry's effects and checkpoints."""


class RunPolicy:
    """The policy state of one run and the operations that change it."""

    # Kept by the command ledger (policy/commands.py).
    timeline: Delegated[int] = Delegated("ledger")
    halted: Delegated[bool] = Delegated("ledger")
    open: Delegated[OpenCommand | None] = Delegated("ledger")
    next_command_id: Delegated[int] = Delegated("ledger")
    recent_commands: Delegated[deque[Command]] = Delegated("ledger")
    num_rollbacks: Delegated[int] = Delegated("ledger")
    num_halts: Delegated[int] = Delegated("ledger")
    total_punishment: Delegated[float] = Delegated("ledger")
    last_punishment: Delegated[float] = Delegated("ledger")
    charged: Delegated[deque[int]] = Delegated("ledger")
    # Kept with the detector pins (policy/pins.py).
    step_states: Delegated[dict[int, StepState]] = Delegated("detector_pins")
    pins: Delegated[dict[int, list[tuple[int, int, StepState]]]] = Delegated("detector_pins")
    candidates: Delegated[dict[int, dict[tuple[int, int], StepState]]] = Delegated("detector_pins")

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
        self.ledger = CommandLedger()
        self.detector_pins = DetectorPins()
        self.detector = DetectorState()
        self.lowest_accepted: float | None = None
        self.judged = RunState.HEALTHY
        self.recent: deque[int] = deque(maxlen=config.rollback_window)
        self.stalled_ranks: set[int] = set()
        self.finished_ranks: set[int] = set()
        self.last_verdict: Verdict | None = None
        self.last_reason = ""
        self.latest_validation_step = -1
        self.recovery: Recovery | None = None  # the recovery ladder (policy/recovery.py)

    # ----------------------------------------------------------------- derived views

    @property
    def state(self) -> RunState:
        """The run state, derived from the flags in priority order."""
        if self._all_finished():
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
        return self.ledger.command(command_id)

    def halting_command(self) -> Command | None:
        """While HALTED: the HALT that halted the run (re-sent to a trainer that attaches, so that a new
        process knows it is halted too); None otherwise."""
        return self.ledger.halting_command()

    def rearm(self, now_s: float) -> None:
        """Restart the command timeout at ``now_s`` (daemon start: monotonic clocks restart too)."""
        self.ledger.rearm(now_s)

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
        judged = Judged(
            "validation", timeline, step, epoch, ranks, tuple(losses_by_rank[r] for r in ranks), tuple(missing_ranks)
        )
        rgl = self.random_guess_loss(record_rgl)
        judgement = detector_for(self.config.profile)(judged.losses, self.detector, self.config, rgl)
        self.latest_validation_step = max(self.latest_validation_step, step)
        self.last_verdict = judgement.verdict
        self.last_reason = judgement.reason
        blocked = self.ledger.blocked_reason()
        if blocked is None:
            return self._decision(judged, self._commit_validation(judged, judgement, rgl, now_s))
        action = self._would_be_action() if judgement.verdict is Verdict.PANIC else Action.NONE
        reason = judgement.reason + f"; not committed: {blocked}"
        suppressed = blocked if action is not Action.NONE else None
        return self._decision(judged, Outcome(judgement.verdict, judgement.rule, action, reason, suppressed=suppressed))

    def _commit_validation(self, judged: Judged, judgement: Judgement, rgl: float | None, now_s: float) -> Outcome:
        """A validation judged while no command is open and the run is not halted: it enters the history,
        may become the last-known-good, and a PANIC turns into a command."""
        lowest_before = self.lowest_accepted
        self.detector = judgement.state
        if judgement.appended is not None:
            self.lowest_accepted = (
                judgement.appended if lowest_before is None else min(lowest_before, judgement.appended)
            )
        loss = max(judged.losses)
        snapshot_allowed = judgement.verdict is Verdict.HEALTHY and (
            lowest_before is None or loss <= self.config.multiplier * lowest_before
        )
        reason = judgement.reason
        if judgement.verdict is Verdict.HEALTHY and not snapshot_allowed:
            reason += (
                f"; no snapshot: loss {fmt(loss)} > {fmt(self.config.multiplier)}× lowest "
                f"accepted {fmt(lowest_before or 0.0)}"
            )
        broken = self._broken_validation(loss, rgl) if snapshot_allowed else None
        if broken is not None:
            snapshot_allowed = False
            reason += f"; no snapshot: {broken}"
        if judgement.verdict is Verdict.PANIC:
            action, command, suppressed, reason = self._intervene(reason, judged.step, now_s)
        else:
            self.judged = RunState.ANOMALY if judgement.verdict is Verdict.ANOMALY else RunState.HEALTHY
            self.recent.append(0)
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
        """Judge one train-step record: a non-finite loss or grad norm is a PANIC at once.

        Train records never enter the validation history. ``shed``: the record came in a shed batch,
        which the reason says. Raises PolicyStateError like ``judge_validation`` for a stale or future
        timeline.
        """
        self._check_timeline(timeline)
        judged = Judged("train", timeline, step, epoch, (rank,), (loss,))
        values = [("loss", loss)] + ([("grad_norm", grad_norm)] if grad_norm is not None else [])
        bad = [(name, v) for name, v in values if blown_up(v)]
        if not bad:
            return self._decision(judged, Outcome(Verdict.HEALTHY, Rule.TRAIN_FINITE, Action.NONE, "train step finite"))
        name, value = bad[0]
        beyond = "" if not math.isfinite(value) else f" (beyond the ceiling {BLOW_UP_CEILING:g}: a blow-up)"
        reason = f"non-finite train {name} {value}{beyond} at step {step} (rank {rank})"
        if shed:
            reason += "; in a shed batch: the daemon was behind, so only the statistical detectors skipped it"
        return self._train_panic(judged, Rule.TRAIN_NON_FINITE, reason, now_s, step)

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
        if self.config.profile != "default" or self.ledger.blocked_reason() is not None:
            return None, None
        state = self.step_states.get(rank, StepState(timeline=timeline))
        state, alarm, pinned = judge_pinned(
            state, timeline, steps, losses, grads, self.config, self.random_guess_loss(), rank, lrs, pins
        )
        self.detector_pins.judged(rank, state, timeline, pinned)
        if alarm is None:
            return None, state
        judged = Judged("train", timeline, alarm.step, epoch, (rank,), (alarm.loss,))
        return self._train_panic(judged, alarm.rule, alarm.reason, now_s, alarm.onset_step), state

    def _train_panic(self, judged: Judged, rule: Rule, reason: str, now_s: float, onset_step: int) -> Decision:
        """A PANIC from the train stream: a command at once (unless one is open, or the run is halted)."""
        blocked = self.ledger.blocked_reason()
        if blocked is None:
            self.last_verdict = Verdict.PANIC
            action, command, suppressed, reason = self._intervene(reason, judged.step, now_s, onset_step)
            self.last_reason = reason
        else:
            action, command, suppressed = self._would_be_action(), None, blocked
            reason += f"; not committed: {blocked}"
        return self._decision(
            judged, Outcome(Verdict.PANIC, rule, action, reason, command, suppressed=suppressed, onset_step=onset_step)
        )

    # ----------------------------------------------------------------- commands and their results

    def request_rollback(self, reason: str, now_s: float) -> Command:
        """A controller's ROLLBACK. Raises PolicyStateError if HALTED or a command is open."""
        if self.state is RunState.FINISHED:
            raise PolicyStateError("run has finished: every rank sent Finish")
        blocked = self.ledger.blocked_reason()
        if blocked is not None:
            raise PolicyStateError(f"cannot roll back now: {blocked}")
        self.detector = replace(self.detector, consecutive=0)
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
        self.recent.clear()
        self.recovery = None  # a controller judged the fault handled: a recurrence starts the ladder afresh
        self.detector = replace(self.detector, consecutive=0)
        self.judged = RunState.HEALTHY
        return self._issue(CommandKind.RESUME, f"resumed by controller: {reason}", now_s)  # un-halts the run

    def _issue(self, kind: CommandKind, reason: str, now_s: float) -> Command:
        """A controller's command, at the run's latest validation step."""
        return self.ledger.issue(kind, reason, self.latest_validation_step, now_s, self.config)

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
        unfinished rank has answered. A failure HALTs the run with a HALT command (``CommandLedger``).

        A rank that restored ``restored_step`` onto the run's timeline resumes its train-stream detectors
        from the state pinned for that snapshot (``restore_detectors``); the recovery ladder learns what the
        fault's rollback restored.
        """
        command = self.ledger.command(command_id)
        result = CommandResult(command_id, rank, succeeded, new_timeline, error, restored_step)
        notices, moved = self.ledger.on_result(result, now_s, self._expected_ranks(), self.config)
        if moved:
            self.judged = RunState.HEALTHY
        restores = succeeded and command is not None and command.kind is not CommandKind.HALT
        if restores and restored_step is not None and new_timeline == self.timeline:
            self.restore_detectors(rank, restored_step, new_timeline)
            recovery = self.recovery
            if recovery is not None and recovery.command_id == command_id and recovery.restored_step is None:
                self.recovery = recovery.restored(restored_step)
        return notices

    def on_adopted(self, rank: int, timeline: int, step: int) -> bool:
        """A new incarnation of ``rank`` adopted its snapshot of ``step`` (from shared memory) on ``timeline``
        and goes on on ``timeline`` + 1, as a rank that restored by executing a command does. The first rank
        to say so moves the run there; a peer that adopted the same step on the same timeline follows. Either
        resumes its train-stream detectors from the state pinned for the snapshot. An adoption on a timeline
        the run has left since changes nothing here (the rank's records are stale until it resyncs). Returns
        whether the run moved."""
        moved = self.ledger.on_adopted(timeline)
        if timeline + 1 == self.timeline:
            self.restore_detectors(rank, step, self.timeline)
        return moved

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
        self.finished_ranks.add(rank)
        self.stalled_ranks.discard(rank)
        return self.ledger.on_finish(rank, self._expected_ranks(), self._all_finished())

    # ----------------------------------------------------------------- undo points

    def memento(self) -> dict[str, Any]:
        """The whole state, its mutable parts copied (cheap: a few containers): ``restore_memento`` puts it
        back after an event that raised (core/undo.py)."""
        state = dict(self.__dict__)
        state["ledger"] = self.ledger.copy()
        state["detector_pins"] = self.detector_pins.copy()
        state["recent"] = deque(self.recent, maxlen=self.recent.maxlen)
        state["stalled_ranks"] = set(self.stalled_ranks)
        state["finished_ranks"] = set(self.finished_ranks)
        return state

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
            "world_size": self.world_size,
            "task_rgl": self.task_rgl,
            "num_classes": self.num_classes,
            "history": list(self.detector.history),
            "consecutive": self.detector.consecutive,
            "lowest_accepted": self.lowest_accepted,
            "judged": str(self.judged),
            "recent": list(self.recent),
            "stalled_ranks": sorted(self.stalled_ranks),
            "finished_ranks": sorted(self.finished_ranks),
            "last_verdict": None if self.last_verdict is None else str(self.last_verdict),
            "last_reason": self.last_reason,
            "latest_validation_step": self.latest_validation_step,
            "recovery": None if self.recovery is None else self.recovery.as_dict(),
            **self.ledger.to_dict(),
            **self.detector_pins.to_dict(),
        }
        return {key: state[key] for key in STATE_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunPolicy:
        """Inverse of ``to_dict``. Raises KeyError/ValueError for a malformed dict."""
        config = PolicyConfig(**data["config"])
        policy = cls(config, int(data["world_size"]), data["task_rgl"], data["num_classes"])
        policy.ledger = CommandLedger.from_dict(data)
        policy.detector_pins = DetectorPins.from_dict(data)
        policy.detector = DetectorState(tuple(float(x) for x in data["history"]), int(data["consecutive"]))
        policy.lowest_accepted = data["lowest_accepted"]
        policy.judged = RunState(data["judged"])
        policy.recent = deque((int(x) for x in data["recent"]), maxlen=config.rollback_window)
        policy.stalled_ranks = {int(r) for r in data["stalled_ranks"]}
        policy.finished_ranks = {int(r) for r in data["finished_ranks"]}
        policy.last_verdict = None if data["last_verdict"] is None else Verdict(data["last_verdict"])
        policy.last_reason = str(data["last_reason"])
        policy.latest_validation_step = int(data["latest_validation_step"])
        raw_recovery = data.get("recovery")
        policy.recovery = None if raw_recovery is None else Recovery.from_dict(raw_recovery)
        return policy

    # ----------------------------------------------------------------- detector states of snapshots

    def pin(self, rank: int, timeline: int, step: int) -> StepState | None:
        """A rank published a snapshot of (timeline, step): keep its detector state as of that step (the
        candidate its vitals pinned), to resume from after a restore to it. Returns the state kept, or
        None when no candidate exists (the daemon restarted since, or the profile judges no train stream)."""
        return self.detector_pins.pin(rank, timeline, step)

    def keep_candidates(self, rank: int, timeline: int, pins: Sequence[int]) -> None:
        """Pins of records that were not judged (shed): the state as it stands is the best one for them."""
        if pins and timeline == self.timeline:
            self.detector_pins.keep_candidates(rank, timeline, pins)

    def restore_detectors(self, rank: int, restored_step: int, timeline: int) -> StepState:
        """A rank restored the snapshot of ``restored_step`` and goes on on ``timeline``: its detectors resume
        from the state pinned for that snapshot (the newest pin of that step), or start afresh without one.
        Pins of steps after it belong to the abandoned future and are dropped."""
        return self.detector_pins.restore(rank, restored_step, timeline)

    def train_level(self) -> float | None:
        """The lowest running level of the train loss among the ranks warm on the run's timeline (None
        without one)."""
        return self.detector_pins.train_level(self.timeline, self.config.step_warmup_steps)

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

    def _all_finished(self) -> bool:
        return bool(self.finished_ranks) and len(self.finished_ranks) >= self.world_size

    def _expected_ranks(self) -> set[int]:
        """The ranks an open command waits for: the unfinished ones."""
        return set(range(self.world_size)) - self.finished_ranks

    def _check_timeline(self, timeline: int) -> None:
        if timeline < self.timeline:
            raise PolicyStateError(f"stale record: timeline {timeline} < current {self.timeline}")
        if timeline > self.timeline:
            raise PolicyStateError(
                f"record from timeline {timeline} but the run is on {self.timeline}: "
                "the trainer restored without a command"
            )

    def _would_be_action(self) -> Action:
        window = self.config.rollback_window
        prior = sum(list(self.recent)[-(window - 1) :]) if window > 1 else 0
        return Action.HALT if prior + 1 > self.config.max_rollbacks else Action.ROLLBACK

    def _intervene(
        self, reason: str, step: int, now_s: float, onset_step: int | None = None
    ) -> tuple[Action, Command | None, str | None, str]:
        """Turn a committed PANIC (of the run's timeline) into ROLLBACK or HALT (loop breaker), honouring shadow
        mode. A train-stream PANIC's ``onset_step`` goes with the command: the trainer restores a snapshot older
        than it."""
        fault_step = step if onset_step is None else onset_step
        rung = next_rung(self.recovery, fault_step, step, self.timeline, self.config)
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
            recipe = Recipe(rung=rung.number if rung.halt else 0)
            halt = self.ledger.issue(CommandKind.HALT, reason, step, now_s, self.config, recipe=recipe)
            return action, halt, None, reason
        recipe = Recipe(rung.number, rung.lr_scale, onset_step, rung.restore_before_step, rung.skip_through_step)
        command = self.ledger.issue(CommandKind.ROLLBACK, reason, step, now_s, self.config, recipe=recipe)
        self.recovery = recovery_of(command.command_id, rung, fault_step, step, self.timeline, self.recovery)
        return action, command, None, reason

    def _decision(self, judged: Judged, outcome: Outcome) -> Decision:
        """The decision on ``judged``, as the run stands after judging it."""
        command = outcome.command
        return Decision(
            kind=judged.kind,
            timeline=judged.timeline,
            step=judged.step,
            epoch=judged.epoch,
            ranks=judged.ranks,
            losses=judged.losses,
            verdict=outcome.verdict,
            rule=outcome.rule,
            action=outcome.action,
            reason=outcome.reason,
            punishment_reward=command.punishment_reward if command else None,
            command=command,
            snapshot_allowed=outcome.snapshot_allowed,
            appended=outcome.appended,
            consecutive_anomalies=self.detector.consecutive,
            run_state=self.state,
            suppressed=outcome.suppressed,
            shadow=outcome.suppressed == SHADOW_NOTE,
            missing_ranks=judged.missing_ranks,
            onset_step=outcome.onset_step,
        )


def _sane(values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Finite and within the blow-up ceiling, elementwise (``detectors.blown_up``'s negation)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.abs(values) <= BLOW_UP_CEILING)
