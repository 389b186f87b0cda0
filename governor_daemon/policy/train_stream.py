"""The train stream of one run, judged: the non-finite rule (``policy/finite.py``) on every record, then the
train-stream detectors (``policy/steps.py``) on the finite ones. It finds alarms; ``RunPolicy`` commits them (a
command, or a PANIC suppressed while one may not be issued)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import Judged, Rule
from governor_daemon.policy.finite import first_blown_up, non_finite_reason
from governor_daemon.policy.pins import DetectorPins
from governor_daemon.policy.steps import StepState, judge_pinned


@dataclass(frozen=True)
class TrainAlarm:
    """A PANIC the train stream found, not yet committed: the record it names, the rule, why, and the step its
    fault began at (a trainer restores a snapshot older than it)."""

    judged: Judged
    rule: Rule
    reason: str
    onset_step: int


def non_finite_alarm(
    timeline: int, step: int, rank: int, loss: float, grad_norm: float | None, epoch: int | None, shed: bool
) -> TrainAlarm | None:
    """One train record under the non-finite rule (None: its values are sane); its fault began at its own step."""
    reason = non_finite_reason(step, rank, loss, grad_norm, shed)
    if reason is None:
        return None
    return TrainAlarm(Judged("train", timeline, step, epoch, (rank,), (loss,)), Rule.TRAIN_NON_FINITE, reason, step)


class TrainStream:
    """What judging one run's train records needs, handed over per batch: the detectors' states and pins (``pins``),
    the policy in force, the random-guess loss in force (``rgl``) and why no command may be issued now (``blocked``,
    None: one may).

    Invariant: every record meets the non-finite rule first, under every profile, shed or not; a rank's detector
    state moves only on an unshed batch of finite records of the run's timeline, under the default profile, while a
    command may be issued (records produced under an open command, or while the run is halted, say nothing about the
    healthy run).
    """

    __slots__ = ("blocked", "config", "pins", "rgl")

    def __init__(self, pins: DetectorPins, config: PolicyConfig, rgl: float | None, blocked: str | None) -> None:
        self.pins = pins
        self.config = config
        self.rgl = rgl
        self.blocked = blocked

    def judge_batch(
        self,
        timeline: int,
        rank: int,
        steps: npt.NDArray[np.int64],
        losses: npt.NDArray[np.float64],
        grads: npt.NDArray[np.float64] | None,
        epoch: int | None,
        lrs: npt.NDArray[np.float64] | None,
        pins: Sequence[int],
        shed: bool,
    ) -> tuple[TrainAlarm | None, StepState | None]:
        """Judge a batch of one rank's train-step records of ``timeline`` (the run's), in step order: the first
        non-finite one is an alarm at once; under the default profile the detectors then judge the finite ones.
        A ``shed`` batch (the daemon was behind, docs/protocol.md "Shedding") gets the non-finite check only, which
        is vectorised and cheap. ``pins`` are steps a trainer may stage a snapshot at: the state as of each is kept
        (``DetectorPins.pin``); a shed batch's keep the state as it stands. Returns the alarm (None: nothing to
        say) and the rank's new detector state (None: unchanged)."""
        bad = first_blown_up(losses, grads)
        if bad is not None:
            grad = None if grads is None else float(grads[bad])
            return non_finite_alarm(timeline, int(steps[bad]), rank, float(losses[bad]), grad, epoch, shed), None
        if shed:
            if pins:  # not judged: the state as it stands is the best one for their snapshots
                self.pins.keep_candidates(rank, timeline, pins)
            return None, None
        if self.config.profile != "default" or self.blocked is not None:
            return None, None
        state = self.pins.step_states.get(rank, StepState(timeline=timeline))
        state, alarm, pinned = judge_pinned(
            state, timeline, steps, losses, grads, self.config, self.rgl, rank, lrs, pins
        )
        self.pins.judged(rank, state, timeline, pinned)
        if alarm is None:
            return None, state
        judged = Judged("train", timeline, alarm.step, epoch, (rank,), (alarm.loss,))
        return TrainAlarm(judged, alarm.rule, alarm.reason, alarm.onset_step), state
