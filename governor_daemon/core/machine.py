"""The daemon's protocol as a deterministic state machine: ``GovernorCore.handle(event) -> Effects``.

Everything the daemon decides happens here, synchronously, with no grpc, protobuf, asyncio, file or
clock access: events come in (``core/events.py``), and journal entries, messages and replies come
out as data (``core/effects.py``). The same object runs in ``governor serve`` and in the seeded
simulation of ``tests/simulation``. The rules it implements, and the invariants they keep, are
written down in docs/protocol.md.

The handlers live by event family, over one shared ``CoreState`` (``core/state.py``): ``attach`` (Hello,
the stream's end), ``records`` (train-step batches, validation records, decisions), ``reports`` (snapshots,
adoptions, command results, finishes), ``control`` (controllers' commands, policy changes, forgetting) and
``timers`` (ticks, start, stop). Every handler first checks everything that can refuse the event (raising
``GovernorError``, having changed nothing), then changes state and records each change as an entry in the
same call: no state change without its entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from governor_daemon.core import attach, control, records, reports, timers
from governor_daemon.core import events as ev
from governor_daemon.core.control import CommandReply
from governor_daemon.core.effects import Effects
from governor_daemon.core.registry import Registry, Run
from governor_daemon.core.state import MAX_SEQ_JUMP, Binding, CoreOptions, CoreState, Limits
from governor_daemon.core.undo import undo_point
from governor_daemon.journal.entry import Entry


class GovernorCore:
    """All runs and which stream each rank is attached by (``state``), and the one way events change them
    (``transaction``). Not thread-safe: one caller at a time."""

    def __init__(self, options: CoreOptions | None = None) -> None:
        self.state = CoreState(options or CoreOptions())

    @property
    def options(self) -> CoreOptions:
        """The serve configuration's part for the core."""
        return self.state.options

    @options.setter
    def options(self, options: CoreOptions) -> None:
        self.state.options = options

    @property
    def registry(self) -> Registry:
        """Every run held, with its journaled state."""
        return self.state.registry

    @property
    def streams(self) -> dict[int, Binding]:
        """Stream id -> what it is attached as."""
        return self.state.streams

    # ----------------------------------------------------------------- state

    def restore(self, checkpoint: dict[str, Any] | None, entries: Sequence[Entry]) -> None:
        """Rebuild the journaled state from a checkpoint and the entries after it (before ``Start``)."""
        self.registry.restore(checkpoint, list(entries))
        self.streams.clear()

    def checkpoint(self) -> dict[str, Any]:
        """Every run's journaled state (a checkpoint entry's payload)."""
        return self.registry.checkpoint()

    def note_appended(self, run_id: str, seq: int) -> None:
        """The adapter appended an entry of ``run_id`` as ``seq`` (a run's ``last_cursor``)."""
        run = self.registry.runs.get(run_id)
        if run is not None:
            run.last_cursor = seq

    def run(self, run_id: str) -> Run:
        """The run, or NotFoundError."""
        return self.state.run(run_id)

    def tick_due(self, now: float) -> list[Run]:
        """The runs a tick at ``now`` changes (``timers.tick_due``)."""
        return timers.tick_due(self.state, now)

    # ----------------------------------------------------------------- dispatch

    @contextmanager
    def transaction(self, event: ev.Event) -> Iterator[Effects]:
        """Apply one event and yield its effects for the caller to journal; if anything raises, in the
        handler or in the caller's block (the journal refusing an entry), the state is put back as it was
        (core/undo.py) and the exception goes on: an event changes nothing unless its entries are appended."""
        undo = undo_point(self.state, event)
        try:
            yield self._dispatch(event)
        except BaseException:
            undo()
            raise

    def handle(self, event: ev.Event) -> Effects:
        """Apply one event. Raises GovernorError for a refused event, or whatever else raised inside it; either
        way it changed nothing (``transaction``)."""
        with self.transaction(event) as fx:
            return fx

    def _dispatch(self, event: ev.Event) -> Effects:
        fx = Effects()
        state = self.state
        match event:
            case ev.Vitals():
                records.vitals(state, event, fx)
            case ev.Validation():
                records.validation(state, event, fx)
            case ev.Attach():
                attach.attach(state, event, fx)
            case ev.SnapshotTaken():
                reports.snapshot(state, event, fx)
            case ev.SnapshotAdopted():
                reports.adopted(state, event, fx)
            case ev.CommandResult():
                reports.command_result(state, event, fx)
            case ev.Heartbeat():
                pass  # liveness only: never progress, never journaled
            case ev.Finish():
                reports.finish(state, event, fx)
            case ev.Detach():
                attach.detach(state, event, fx)
            case ev.RequestRollback() | ev.Halt() | ev.Resume():
                control.controller_command(state, event, fx)
            case ev.UpdatePolicy():
                control.update_policy(state, event, fx)
            case ev.ForgetRun():
                control.forget(state, event, fx)
            case ev.Tick():
                timers.tick(state, event.now, fx)
            case ev.Start():
                timers.start(state, event, fx)
            case ev.Stop():
                timers.stop(state, event, fx)
        return fx


__all__ = ["MAX_SEQ_JUMP", "Binding", "CommandReply", "CoreOptions", "GovernorCore", "Limits"]
