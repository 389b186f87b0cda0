"""The clock seam: wall time for journaled times, monotonic time for stall clocks."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Where the daemon reads time. Tests may pass their own."""

    def time(self) -> float:
        """Seconds since the epoch (journaled: command issue times, rank deadlines)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (stall clocks, never journaled)."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """time.time()."""
        return time.time()

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()
