"""Stall detection for one rank, from step advances and an injected clock.

A rank is STALLED when its latest step has not advanced for ``stall_timeout_s``, or for
``LEARN_FACTOR`` x the longest interval between step advances once ``MIN_INTERVALS`` intervals were
seen, whichever is shorter. The learned threshold never drops below ``LEARNED_FLOOR_S``: progress
arrives in bursts (a vitals batch every few dozen steps, then a validation pause), and sub-second
intervals would otherwise flag every pause. Progress is a later (timeline, step): after a rollback
to an earlier step, steps on the new timeline are progress. Heartbeats are never progress. The clock
starts at attach (and therefore again at daemon start).
"""

from __future__ import annotations

LEARN_FACTOR = 5.0
MIN_INTERVALS = 5
LEARNED_FLOOR_S = 10.0


class StallTracker:
    """Tracks one rank's progress. Not thread-safe."""

    def __init__(self, now_s: float) -> None:
        self.latest: tuple[int, int] | None = None
        self.last_advance_s = now_s
        self.longest_interval_s = 0.0
        self.num_intervals = 0
        self.stalled = False

    def threshold_s(self, stall_timeout_s: float) -> float:
        """Seconds without progress that make the rank STALLED now."""
        if self.num_intervals >= MIN_INTERVALS:
            return min(stall_timeout_s, max(LEARNED_FLOOR_S, LEARN_FACTOR * self.longest_interval_s))
        return stall_timeout_s

    def observe_step(self, step: int, now_s: float, timeline: int = 0) -> bool:
        """Record the latest (timeline, step) seen. Returns True if this cleared a stall."""
        position = (timeline, step)
        if self.latest is not None and position <= self.latest:
            return False
        if self.latest is not None:
            self.longest_interval_s = max(self.longest_interval_s, now_s - self.last_advance_s)
            self.num_intervals += 1
        self.latest = position
        self.last_advance_s = now_s
        was = self.stalled
        self.stalled = False
        return was

    def check(self, now_s: float, stall_timeout_s: float) -> bool:
        """Returns True if the rank became STALLED at this check (once per stall)."""
        if self.due(now_s, stall_timeout_s):
            self.stalled = True
            return True
        return False

    def due(self, now_s: float, stall_timeout_s: float) -> bool:
        """Whether ``check`` would mark the rank STALLED now (it changes nothing)."""
        return not self.stalled and now_s - self.last_advance_s > self.threshold_s(stall_timeout_s)

    def seconds_since_progress(self, now_s: float) -> float:
        """Seconds since the latest step advance (or since attach)."""
        return now_s - self.last_advance_s
