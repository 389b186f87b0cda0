"""Undo points: every core event is atomic, whatever raises inside it.

A handler checks what can refuse an event before it changes anything, and records every change as a
journal entry. Still, something can raise after the state changed: an entry the journal cannot encode, a
number that overflows, a bug. The event's effects are then never applied (no entry, no message), so the
state must be what it was before the event, or memory and journal disagree from then on (a red-team review
found one: a punishment total of -inf that the journal refused after the policy had charged it). So
``GovernorCore.transaction`` takes an undo point of the state an event can touch, cheap copies of the
mutable parts, and puts it back when the event (or the journal append that follows it) raises.

What an event can touch: the runs it names (a trainer event's bound run, a controller's run; every run
for timers and start-up), the set of runs (creation, eviction, forgetting, expiry), and the stream
bindings (attach, detach, start-up, the stall watchdog's tick).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from governor_daemon.core import events as ev
from governor_daemon.core.registry import RankState, Run
from governor_daemon.core.state import CoreState
from governor_daemon.core.timers import tick_due

Undo = Callable[[], None]


@dataclass(frozen=True)
class _RunMemento:
    run: Run
    meta: Any
    policy: Any
    policy_state: dict[str, Any]
    ranks: dict[int, RankState]
    all_ranks: bool  # the rank table itself (new ranks may appear), else only the ranks copied
    aggregator: Any
    last_cursor: int
    idle_since: float

    @classmethod
    def of(cls, run: Run, ranks: Iterable[int] | None, aggregator: bool) -> _RunMemento:
        """The run's state; only ``ranks`` of its ranks (None: all), and its pending steps if ``aggregator``."""
        chosen = run.ranks if ranks is None else {r: run.ranks[r] for r in ranks if r in run.ranks}
        return cls(
            run,
            run.meta,
            run.policy,
            run.policy.memento(),
            {r: _rank_copy(s) for r, s in chosen.items()},
            ranks is None,
            copy.deepcopy(run.aggregator) if aggregator else None,
            run.last_cursor,
            run.idle_since,
        )

    def restore(self) -> None:
        run = self.run
        run.meta = self.meta
        run.policy = self.policy
        run.policy.restore_memento(self.policy_state)
        if self.all_ranks:
            run.ranks.clear()
        run.ranks.update(self.ranks)
        if self.aggregator is not None:
            run.aggregator = self.aggregator
        run.last_cursor, run.idle_since = self.last_cursor, self.idle_since


def _rank_copy(rank: RankState) -> RankState:
    twin = copy.copy(rank)
    twin.seqs, twin.tracker = dict(rank.seqs), copy.copy(rank.tracker)
    twin.snapshots = list(rank.snapshots)
    return twin


def undo_point(state: CoreState, event: ev.Event) -> Undo:
    """What puts back the state ``event`` can change."""
    runs, lives = state.registry.runs, state.registry.lives
    membership = dict(runs) if isinstance(event, ev.Attach | ev.Finish | ev.ForgetRun | ev.Tick | ev.Start) else None
    # A tick can end a STALLED rank's stream (the stall watchdog).
    streams = dict(state.streams) if isinstance(event, ev.Attach | ev.Detach | ev.Start | ev.Stop | ev.Tick) else None
    # A trainer's records touch its own rank and its run's policy; the pending validation steps only a
    # validation, a command result, a finish, timers and start-up do.
    stream_rank = state.streams.get(event.stream) if isinstance(event, ev.Vitals | ev.SnapshotTaken) else None
    ranks = (stream_rank.rank,) if stream_rank is not None else None
    aggregator = not isinstance(event, ev.Vitals | ev.SnapshotTaken | ev.Heartbeat | ev.Detach)
    mementos = [_RunMemento.of(run, ranks, aggregator) for run in _touched(state, event)]

    def undo() -> None:
        state.registry.lives = lives
        if membership is not None:
            runs.clear()
            runs.update(membership)
        if streams is not None:
            state.streams.clear()
            state.streams.update(streams)
        for memento in mementos:
            memento.restore()

    return undo


def _touched(state: CoreState, event: ev.Event) -> Iterable[Run]:
    runs = state.registry.runs
    if isinstance(event, ev.Tick):
        return tick_due(state, event.now)
    if isinstance(event, ev.Start | ev.Stop):
        return list(runs.values())
    run_id: str | None = None
    if isinstance(event, ev.Attach | ev.RequestRollback | ev.Halt | ev.Resume | ev.UpdatePolicy | ev.ForgetRun):
        run_id = event.run_id
    elif isinstance(event, ev.Heartbeat):
        return ()
    else:
        binding = state.streams.get(event.stream)
        run_id = binding.run_id if binding is not None else None
    run = runs.get(run_id) if run_id is not None else None
    return (run,) if run is not None else ()
