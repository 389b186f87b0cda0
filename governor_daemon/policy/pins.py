"""The train-stream detectors' state per rank, and the states kept for the snapshots a trainer publishes.

A trainer stages a snapshot at a step its vitals name (a pin): the detectors' state as of that step is kept
as a *candidate* (runtime only), and becomes a *pin* (journaled) when the trainer publishes the snapshot. A
restore to the snapshot resumes the rank's detectors from its pin (docs/protocol.md, "Snapshots";
``policy/steps.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from governor_daemon.policy.steps import StepState, pinned_states_from_json, pinned_states_to_json

PINS_KEPT = 8
"""Detector states kept per rank for published snapshots (a trainer keeps at most about four)."""
CANDIDATES_KEPT = 32
"""Detector states kept per rank for snapshots a trainer may still publish (runtime only)."""


class DetectorPins:
    """Per rank: the train-stream detectors' state (``step_states``), the states as of its published snapshots
    (``pins``: (timeline, step, state), oldest first, journaled) and as of the steps it may still publish one
    at (``candidates``, runtime only).

    Invariant: a pin is made only from a candidate (or, for the initial snapshot of step 0, from nothing
    learnt yet), at most ``PINS_KEPT`` per rank; a restore resumes the rank from the newest pin of the
    restored step and drops the pins after it, which belong to the abandoned future.
    """

    def __init__(self) -> None:
        self.step_states: dict[int, StepState] = {}
        self.pins: dict[int, list[tuple[int, int, StepState]]] = {}
        self.candidates: dict[int, dict[tuple[int, int], StepState]] = {}

    def judged(self, rank: int, state: StepState, timeline: int, pinned: Iterable[tuple[int, StepState]]) -> None:
        """The rank's detectors judged a batch into ``state``; ``pinned``: (step, state as of that step)."""
        self.step_states[rank] = state
        self._keep(rank, (((timeline, step), pinned_state) for step, pinned_state in pinned))

    def keep_candidates(self, rank: int, timeline: int, steps: Sequence[int]) -> None:
        """Pins of records that were not judged (shed): the state as it stands is the best one for them."""
        state = self.step_states.get(rank)
        if state is None or state.timeline != timeline:
            state = StepState(timeline=timeline)
        self._keep(rank, (((timeline, step), state) for step in steps))

    def _keep(self, rank: int, items: Iterable[tuple[tuple[int, int], StepState]]) -> None:
        candidates = self.candidates.setdefault(rank, {})
        candidates.update(items)
        while len(candidates) > CANDIDATES_KEPT:
            del candidates[next(iter(candidates))]

    def pin(self, rank: int, timeline: int, step: int) -> StepState | None:
        """A rank published a snapshot of (timeline, step): keep the candidate of that step as its pin.
        Returns the state kept, or None without a candidate."""
        state = self.candidates.get(rank, {}).pop((timeline, step), None)
        if state is None and step == 0:
            state = StepState(timeline=timeline)  # the initial snapshot: nothing learnt yet
        if state is None:
            return None
        pins = [p for p in self.pins.get(rank, []) if (p[0], p[1]) != (timeline, step)]
        pins.append((timeline, step, state))
        self.pins[rank] = pins[-PINS_KEPT:]
        return state

    def restore(self, rank: int, restored_step: int, timeline: int) -> StepState:
        """A rank restored the snapshot of ``restored_step`` and goes on on ``timeline``: its detectors resume
        from the newest pin of that step, or start afresh without one."""
        kept = [p for p in self.pins.get(rank, []) if p[1] <= restored_step]
        pinned = [p for p in kept if p[1] == restored_step]
        if kept or rank in self.pins:
            self.pins[rank] = kept
        state = pinned[-1][2].resumed(timeline, restored_step) if pinned else StepState(timeline=timeline)
        self.step_states[rank] = state
        self.candidates.pop(rank, None)
        return state

    def train_level(self, timeline: int, warmup_steps: int) -> float | None:
        """The lowest running level of the train loss among the ranks warm on ``timeline`` (None without one)."""
        levels = [
            math.exp(min(s.loss_center, s.loss_fast))
            for s in self.step_states.values()
            if s.timeline == timeline and s.count >= warmup_steps
        ]
        return min(levels) if levels else None

    # ----------------------------------------------------------------- undo points and persistence

    def copy(self) -> DetectorPins:
        """An independent copy (an undo point: its containers copied, the states shared, being frozen)."""
        twin = DetectorPins()
        twin.step_states = dict(self.step_states)
        twin.pins = {rank: list(pins) for rank, pins in self.pins.items()}
        twin.candidates = {rank: dict(c) for rank, c in self.candidates.items()}
        return twin

    def to_dict(self) -> dict[str, Any]:
        """The journaled part (``steps``, ``pins``; candidates are runtime only)."""
        return {
            "steps": {str(rank): state.as_dict() for rank, state in self.step_states.items()},
            "pins": {str(rank): pinned_states_to_json(pins) for rank, pins in self.pins.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorPins:
        """Inverse of ``to_dict``."""
        kept = cls()
        kept.load(data)
        return kept

    def load(self, data: Mapping[str, Any]) -> None:
        """Take the ranks' states and pins in ``data`` (``to_dict``'s keys, either may be absent or name only some
        ranks: a journal entry's effects) over the ones held."""
        for rank, state in data.get("steps", {}).items():
            self.step_states[int(rank)] = StepState.from_dict(state)
        for rank, pins in data.get("pins", {}).items():
            self.pins[int(rank)] = pinned_states_from_json(pins)
