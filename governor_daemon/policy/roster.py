"""The ranks of one run as the policy counts them: how many there are, which finished, which are STALLED."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Roster:
    """``world_size`` ranks, the ``finished`` ones (each sent Finish) and the ``stalled`` ones (no progress).

    Invariant: a finished rank is never stalled (its Finish clears the mark); the run has finished once
    ``world_size`` ranks have; an open command waits for the unfinished ranks (``expected``).
    """

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.stalled: set[int] = set()
        self.finished: set[int] = set()

    def all_finished(self) -> bool:
        """Whether every rank has finished."""
        return bool(self.finished) and len(self.finished) >= self.world_size

    def expected(self) -> set[int]:
        """The ranks an open command waits for: the unfinished ones."""
        return set(range(self.world_size)) - self.finished

    def finish(self, rank: int) -> None:
        """``rank`` sent Finish."""
        self.finished.add(rank)
        self.stalled.discard(rank)

    def set_stalled(self, rank: int, stalled: bool) -> None:
        """Mark a rank STALLED or clear it (from the stall tracker or the rank deadline)."""
        if stalled:
            self.stalled.add(rank)
        else:
            self.stalled.discard(rank)

    def copy(self) -> Roster:
        """An independent copy (an undo point)."""
        twin = Roster(self.world_size)
        twin.stalled = set(self.stalled)
        twin.finished = set(self.finished)
        return twin

    def to_dict(self) -> dict[str, Any]:
        """The journaled part (``RunPolicy.to_dict`` orders the keys)."""
        return {
            "world_size": self.world_size,
            "stalled_ranks": sorted(self.stalled),
            "finished_ranks": sorted(self.finished),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Roster:
        """Inverse of ``to_dict``."""
        roster = cls(int(data["world_size"]))
        roster.stalled = {int(r) for r in data["stalled_ranks"]}
        roster.finished = {int(r) for r in data["finished_ranks"]}
        return roster
