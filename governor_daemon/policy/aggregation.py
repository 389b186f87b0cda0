"""Multi-rank aggregation: gather one (timeline, step) from every rank before deciding.

A step is decided when all ``world_size`` ranks reported or ``rank_deadline_s`` after the first
report; the ranks missing then are named (the caller marks them STALLED). A report for a step that
was already decided is late: journaled, never decided. A group of a timeline the run has left is
discarded, never decided. Pure: the caller passes the (monotonic) time, which is never journaled:
the deadlines of restored groups restart at daemon start (``rearm``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from governor_daemon.policy.decisions import float_from_json, float_to_json

MAX_REMEMBERED_STEPS = 4096
"""Decided (timeline, step) keys remembered to recognise late reports."""
PERSISTED_DECIDED = 64
"""Decided keys kept across a daemon restart (late reports come within rank_deadline_s)."""


@dataclass
class StepGroup:
    """The reports of one (timeline, step); ``losses`` and ``seqs`` are keyed by rank."""

    timeline: int
    step: int
    first_at_s: float
    epoch: int | None = None
    record_rgl: float | None = None
    losses: dict[int, float] = field(default_factory=dict)
    seqs: dict[int, int] = field(default_factory=dict)
    missing: tuple[int, ...] = ()
    incarnations: dict[int, str] = field(default_factory=dict)
    """Which incarnation of each rank sent its report (a verdict goes only to that incarnation)."""


class AddOutcome(StrEnum):
    """What ``StepAggregator.add`` did with a report."""

    PENDING = "pending"
    READY = "ready"
    LATE = "late"
    DUPLICATE = "duplicate"


class StepAggregator:
    """Collects per-rank validation reports of one run. Not thread-safe; one per run."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._pending: OrderedDict[tuple[int, int], StepGroup] = OrderedDict()
        self._decided: OrderedDict[tuple[int, int], None] = OrderedDict()

    def add(
        self,
        rank: int,
        timeline: int,
        step: int,
        loss: float,
        now_s: float,
        epoch: int | None = None,
        record_rgl: float | None = None,
        seq: int = 0,
        incarnation: str = "",
        finished: frozenset[int] = frozenset(),
    ) -> tuple[AddOutcome, StepGroup | None]:
        """Add one rank's report. Returns (outcome, the group when it became READY): a group is complete
        when every rank that has not finished reported."""
        key = (timeline, step)
        if key in self._decided:
            return AddOutcome.LATE, None
        group = self._pending.get(key)
        if group is None:
            group = StepGroup(timeline, step, now_s, epoch, record_rgl)
            self._pending[key] = group
        if rank in group.losses:
            return AddOutcome.DUPLICATE, None
        group.losses[rank] = loss
        group.seqs[rank] = seq
        group.incarnations[rank] = incarnation
        if group.epoch is None:
            group.epoch = epoch
        if group.record_rgl is None:
            group.record_rgl = record_rgl
        if not self._expected(finished) - set(group.losses):
            return AddOutcome.READY, self._close(key, finished)
        return AddOutcome.PENDING, None

    def due(self, now_s: float, deadline_s: float, finished: frozenset[int] = frozenset()) -> list[StepGroup]:
        """Groups whose deadline passed, or that every unfinished rank has reported (a rank finished since
        they opened), oldest first, each with the unfinished ranks still missing."""
        return [self._close(k, finished) for k in self._ready(now_s, deadline_s, finished)]

    def any_due(self, now_s: float, deadline_s: float, finished: frozenset[int] = frozenset()) -> bool:
        """Whether ``due`` would close a group now (it changes nothing)."""
        return bool(self._pending) and bool(self._ready(now_s, deadline_s, finished))

    def _ready(self, now_s: float, deadline_s: float, finished: frozenset[int]) -> list[tuple[int, int]]:
        expected = self._expected(finished)
        return [
            k for k, g in self._pending.items() if now_s - g.first_at_s >= deadline_s or not expected - set(g.losses)
        ]

    def _expected(self, finished: frozenset[int]) -> set[int]:
        return set(range(self.world_size)) - finished

    def discard_before(self, timeline: int) -> list[StepGroup]:
        """Drop the pending groups of timelines before ``timeline`` (superseded by a rollback)."""
        old = [k for k in self._pending if k[0] < timeline]
        return [self._pending.pop(k) for k in old]

    def rearm(self, now_s: float) -> None:
        """Restart every pending group's deadline at ``now_s``."""
        for group in self._pending.values():
            group.first_at_s = now_s

    def flush(self) -> list[StepGroup]:
        """Close every pending group now (end of an offline trace)."""
        return [self._close(k) for k in list(self._pending)]

    def next_deadline_s(self, deadline_s: float) -> float | None:
        """Earliest time at which ``due`` will return something, or None."""
        if not self._pending:
            return None
        return min(g.first_at_s for g in self._pending.values()) + deadline_s

    def to_dict(self) -> dict[str, Any]:
        """Pending groups and the latest decided keys, JSON-ready (journal effects)."""
        return {
            "pending": [
                {
                    "timeline": g.timeline,
                    "step": g.step,
                    "epoch": g.epoch,
                    "record_rgl": g.record_rgl,
                    "losses": {str(r): float_to_json(x) for r, x in g.losses.items()},
                    "seqs": {str(r): s for r, s in g.seqs.items()},
                    "incarnations": {str(r): i for r, i in g.incarnations.items()},
                }
                for g in self._pending.values()
            ],
            "decided": [list(k) for k in list(self._decided)[-PERSISTED_DECIDED:]],
        }

    def load(self, data: dict[str, Any]) -> None:
        """Replace the state with ``to_dict`` output."""
        self._pending.clear()
        for g in data["pending"]:
            group = StepGroup(int(g["timeline"]), int(g["step"]), 0.0, g["epoch"], g["record_rgl"])
            group.losses = {int(r): float_from_json(x) for r, x in g["losses"].items()}
            group.seqs = {int(r): int(s) for r, s in g["seqs"].items()}
            group.incarnations = {int(r): str(i) for r, i in g.get("incarnations", {}).items()}
            self._pending[(group.timeline, group.step)] = group
        self._decided = OrderedDict(((int(t), int(s)), None) for t, s in data["decided"])

    def _close(self, key: tuple[int, int], finished: frozenset[int] = frozenset()) -> StepGroup:
        group = self._pending.pop(key)
        group.missing = tuple(sorted(self._expected(finished) - set(group.losses)))
        self._decided[key] = None
        while len(self._decided) > MAX_REMEMBERED_STEPS:
            self._decided.popitem(last=False)
        return group
