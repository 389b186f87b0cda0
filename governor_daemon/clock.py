"""The clock seam: the runtime reads monotonic time here and hands it to the core with every event.

Wall time decides nothing (the journal stamps entries with it itself); docs/protocol.md, "Clocks".
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Where the runtime reads time. Tests may pass their own."""

    def monotonic(self) -> float:
        """Monotonic seconds (deadlines, stall clocks, command timeouts; never journaled)."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()
