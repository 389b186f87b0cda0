"""Which snapshot buffer sets are staged, which are published, which is the base, and which a restore picks.

The ledger holds indices into ``LastKnownGood``'s buffer sets and reads each one's ``SnapshotInfo``; it
never touches their tensors. Keeping an older staged snapshot while a newer one is staged is what lets a
slow daemon delay the LKG instead of preventing it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tolaria_trainer.snapshot.buffers import BufferSet

if TYPE_CHECKING:
    from tolaria_trainer.snapshot import SnapshotInfo

MAX_STAGED = 2  # staged validation snapshots held at once; staging another replaces the newest
KEEP_VALIDATED = 2  # published validated snapshots kept: the newest, and an older one for a recurrence


def sets_needed(step_snapshots: int) -> int:
    """Buffer sets enough for every role at once: the base, the validated and step snapshots kept, and the
    staged ones (``MAX_STAGED`` validation snapshots and, with step snapshots on, one step snapshot)."""
    staged_step = 1 if step_snapshots else 0
    return 1 + KEEP_VALIDATED + step_snapshots + MAX_STAGED + staged_step


class SnapshotLedger:
    """The roles of the buffer sets ``sets``.

    Invariant: a set is staged, published, or spare, never two of them, and its ``info`` is None exactly when
    it is spare; ``published`` and ``staged`` are oldest first (``published`` sorted by step); ``base``, when
    there is one, is published. After a publish only the base, the newest ``KEEP_VALIDATED`` validated
    snapshots and the ``step_snapshots`` newest step snapshots newer than them stay published."""

    def __init__(self, sets: list[BufferSet], step_snapshots: int) -> None:
        self.sets = sets
        self.step_snapshots = step_snapshots
        self.published: list[int] = []  # oldest first
        self.staged: list[int] = []  # oldest first
        self.base: int | None = None

    def step_of(self, index: int) -> int:
        info = self.sets[index].info
        return -1 if info is None else info.step

    def kind_of(self, index: int) -> str:
        info = self.sets[index].info
        return "" if info is None else info.kind

    def spare(self) -> int:
        """A set neither published nor staged."""
        return next(i for i in range(len(self.sets)) if i not in self.published and i not in self.staged)

    def make_room(self, kind: str) -> int:
        """A spare set to stage a snapshot of ``kind`` in; with ``MAX_STAGED`` validation snapshots (or one
        step snapshot) already staged, the newest of that kind is dropped first."""
        same_kind = [i for i in self.staged if (info := self.sets[i].info) is not None and info.kind == kind]
        if len(same_kind) == (MAX_STAGED if kind == "validation" else 1):
            self.sets[same_kind[-1]].info = None
            self.staged.remove(same_kind[-1])
        return self.spare()

    def add_staged(self, index: int) -> None:
        """A set from ``make_room`` now holds a staged snapshot."""
        self.staged.append(index)

    def publish(self, timeline: int, step: int, kind: str) -> int | None:
        """Publish the staged set of exactly (timeline, step, kind), dropping the older staged ones of its kind,
        then retain; returns its index if it is published now (None: no such staged set, or retaining dropped
        it at once)."""
        for index in self.staged:
            info = self.sets[index].info
            if info is None or (info.timeline, info.step, info.kind) != (timeline, step, kind):
                continue
            for older in list(self.staged):
                older_info = self.sets[older].info
                if older_info is not None and older_info.kind == info.kind and older_info.step < info.step:
                    self.drop(older)
            self.staged.remove(index)
            self.published.append(index)
            self.published.sort(key=lambda i: self.step_of(i))
            self._retain()
            return index if index in self.published else None
        return None

    def _retain(self) -> None:
        validated = [i for i in self.published if i != self.base and self.kind_of(i) == "validation"]
        for extra in validated[: max(0, len(validated) - KEEP_VALIDATED)]:
            self.drop(extra)
        newest = max((self.step_of(i) for i in self.published if self.kind_of(i) == "validation"), default=-1)
        steps = [i for i in self.published if self.kind_of(i) == "step"]
        for old in [i for i in steps if self.step_of(i) <= newest]:
            self.drop(old)  # a validated snapshot at least as new supersedes it
        steps = [i for i in self.published if self.kind_of(i) == "step"]
        for extra in steps[: max(0, len(steps) - self.step_snapshots)]:
            self.drop(extra)

    def drop(self, index: int) -> None:
        """Make a set spare."""
        self.sets[index].info = None
        if index in self.staged:
            self.staged.remove(index)
        if index in self.published:
            self.published.remove(index)
        if index == self.base:
            self.base = None

    def drop_published(self) -> None:
        """Drop every published set (a new base follows)."""
        for older in list(self.published):
            self.drop(older)

    def make_newest_base(self) -> None:
        """The newest published set becomes the base (``LastKnownGood.take``, after ``drop_published``)."""
        self.base = self.published[-1]

    def adopt_base(self, index: int) -> None:
        """Set ``index`` (adopted from shared memory) becomes the only published one, the base."""
        self.drop_published()
        self.published.append(index)
        self.base = index

    def drop_newer_than(self, step: int) -> None:
        """Drop the published sets newer than ``step`` (the abandoned future after a restore)."""
        for newer in [i for i in self.published if self.step_of(i) > step]:
            self.drop(newer)

    def discard(self, staged: SnapshotInfo | None = None) -> None:
        """Drop the staged set ``staged`` names, or every staged one."""
        for index in list(self.staged):
            if staged is None or self.sets[index].info == staged:
                self.drop(index)

    def choose(self, onset_step: int | None, margin: int, before_step: int | None = None) -> int | None:
        """Without ``onset_step``: the newest validated snapshot (older than ``before_step`` when one is).
        With it: the newest published one older than ``onset_step - margin``, else older than the onset;
        each also older than ``before_step`` (a recurrence) when one is. Never one taken at or after the
        onset: the base is the last resort (it always predates what it is the base of)."""
        if not self.published:
            return None
        bound = before_step if before_step is not None else math.inf
        if onset_step is None:
            validated = [i for i in self.published if self.kind_of(i) == "validation"]
            older = [i for i in validated if self.step_of(i) < bound]
            if older:
                return older[-1]
            return validated[-1] if validated else self.published[0]
        for limits in ((onset_step - margin, bound), (onset_step, bound), (onset_step - margin,), (onset_step,)):
            older = [i for i in self.published if self.step_of(i) < min(limits)]
            if older:
                return older[-1]
        return self.base if self.base is not None else self.published[0]
