"""The validation stream of one run: the detector history, the lowest accepted loss, and whether a validation's
snapshot may become the last-known-good (docs/protocol.md, "Policy")."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import Verdict
from governor_daemon.policy.detectors import DetectorState, Judgement, detector_for, fmt, lobotomy_band_below

FAR_ABOVE_TRAIN = 0.5
"""A validation loss more than this fraction of the way from the train stream's level up to the random-guess
loss publishes no snapshot (a collapsed or broken model that a young history cannot judge yet)."""


class ValidationHistory:
    """The validation detectors' state (``detector``: history and consecutive-anomaly counter), the lowest loss
    the history accepted, and the latest validation step judged.

    Invariant: only a committed validation (no command open, the run not halted) changes the history or the
    lowest accepted loss. Its snapshot may become the last-known-good only when it is HEALTHY, at most
    ``multiplier`` × the lowest loss accepted before it, and not broken against the train stream's level
    (``broken_validation``).
    """

    def __init__(self) -> None:
        self.detector = DetectorState()
        self.lowest_accepted: float | None = None
        self.latest_validation_step = -1

    def judge(self, step: int, losses: Sequence[float], config: PolicyConfig, rgl: float | None) -> Judgement:
        """Judge the losses of a validation of ``step`` against the history (which only ``commit`` changes); the
        step counts as judged from then on."""
        judgement = detector_for(config.profile)(losses, self.detector, config, rgl)
        self.latest_validation_step = max(self.latest_validation_step, step)
        return judgement

    def commit(
        self, judgement: Judgement, loss: float, level: float | None, rgl: float | None, config: PolicyConfig
    ) -> tuple[bool, str]:
        """Take a committed validation (``loss``: its highest over the ranks; ``level``: the train stream's)
        into the history. Returns whether its snapshot may become the last-known-good, and the reason."""
        lowest_before = self.lowest_accepted
        self.detector = judgement.state
        if judgement.appended is not None:
            self.lowest_accepted = (
                judgement.appended if lowest_before is None else min(lowest_before, judgement.appended)
            )
        healthy = judgement.verdict is Verdict.HEALTHY
        allowed = healthy and (lowest_before is None or loss <= config.multiplier * lowest_before)
        if healthy and not allowed:
            return False, (
                f"{judgement.reason}; no snapshot: loss {fmt(loss)} > {fmt(config.multiplier)}× lowest "
                f"accepted {fmt(lowest_before or 0.0)}"
            )
        broken = broken_validation(loss, level, rgl, config) if allowed else None
        if broken is not None:
            return False, f"{judgement.reason}; no snapshot: {broken}"
        return allowed, judgement.reason

    def reset_counter(self) -> None:
        """Clear the consecutive-anomaly counter (a command was issued), keeping the history."""
        self.detector = replace(self.detector, consecutive=0)

    def resize(self, history_window: int) -> None:
        """A shrunk history keeps its newest entries."""
        self.detector = replace(self.detector, history=self.detector.history[-history_window:])

    def copy(self) -> ValidationHistory:
        """An independent copy (an undo point: every field is immutable)."""
        return copy.copy(self)

    def to_dict(self) -> dict[str, Any]:
        """The journaled part (``RunPolicy.to_dict`` orders the keys)."""
        return {
            "history": list(self.detector.history),
            "consecutive": self.detector.consecutive,
            "lowest_accepted": self.lowest_accepted,
            "latest_validation_step": self.latest_validation_step,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValidationHistory:
        """Inverse of ``to_dict``."""
        validation = cls()
        validation.detector = DetectorState(tuple(float(x) for x in data["history"]), int(data["consecutive"]))
        validation.lowest_accepted = data["lowest_accepted"]
        validation.latest_validation_step = int(data["latest_validation_step"])
        return validation


def broken_validation(loss: float, level: float | None, rgl: float | None, config: PolicyConfig) -> str | None:
    """Why a healthy-judged validation loss still must not become the last-known-good: it sits in the collapse
    band, or far above the train stream's ``level`` (None when neither, or without a level or an RGL)."""
    if level is None or rgl is None:
        return None
    band = lobotomy_band_below(level, config, rgl)
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
