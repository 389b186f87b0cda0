"""The one place a core's effects are carried out, in the order ``core/effects.py`` defines; the daemon
(``service/runtime.py``) and the seeded simulation (``tests/simulation``) both apply effects through it.

1. The event and the append of all its entries form one transaction: an entry the journal refuses (it
   cannot encode it, the journal has failed) undoes the event (``GovernorCore.transaction``).
2. Each appended entry's seq is noted on its run (``last_cursor``); the adapter's ``appended`` hook sees the
   entries before anything can be released (the runtime counts metrics and holds log lines there).
3. If any entry is ``sync``, ``commit_now`` (otherwise the journal commits within its interval).
4. The event's messages wait in ``Outbound`` behind the last entry appended so far, and leave (``released``)
   only once the journal says it is durable: at once when it already is, else from ``durable(seq)``, which
   the adapter calls whenever the journal's durable seq moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from governor_daemon.core import events as ev
from governor_daemon.core.effects import Append, Effects, Outbound, Send

if TYPE_CHECKING:
    from governor_daemon.core.machine import GovernorCore


class Appended(Protocol):
    """An appended entry, as far as the applier looks at it."""

    @property
    def seq(self) -> int: ...


class EffectJournal(Protocol):
    """The journal as the applier needs it."""

    @property
    def last_seq(self) -> int:
        """The highest seq appended, durable or not."""
        ...

    @property
    def durable_seq(self) -> int:
        """The highest seq durable (every entry up to it is)."""
        ...

    def append_event(self, items: list[tuple[str, str, dict[str, Any]]]) -> Sequence[Appended]:
        """Append one event's entries (run, kind, payload), all or none, in order; raises if it refuses one."""
        ...

    def commit_now(self) -> None:
        """Make what is appended durable as soon as it can (it reports the durable seq as it moves)."""
        ...


Released = Callable[[int, list[Send]], None]
"""What the adapter does with the messages released once entries up to a seq are durable."""
AppendedHook = Callable[[Sequence[Append], Sequence[int]], None]
"""What the adapter does with an event's entries and their seqs, before any of them can be released."""


class Applier:
    """Carries a core's effects out against a journal.

    Invariant: a message leaves (``released``) only once every entry appended before it, by its own event
    or an earlier one, is durable; messages leave in the order the core produced them, across events.
    """

    def __init__(self, core: GovernorCore, journal: EffectJournal, released: Released) -> None:
        self.core = core
        self.journal = journal
        self.released = released
        self.outbound = Outbound()

    def apply(self, event: ev.Event, appended: AppendedHook | None = None) -> tuple[Effects, int]:
        """Run ``event`` through the core and carry out its effects; returns them and the seq its messages wait
        for. Raises what the core or the journal raised, having changed nothing."""
        with self.core.transaction(event) as effects:
            seqs = self._append(effects)
        for append, seq in zip(effects.entries, seqs, strict=True):
            if append.run:
                self.core.note_appended(append.run, seq)
        if appended is not None and effects.entries:
            appended(effects.entries, seqs)
        journal = self.journal
        if effects.sync:
            journal.commit_now()
        after = journal.last_seq
        if effects.sends:
            self.outbound.push(after, effects.sends)
            if after <= journal.durable_seq:
                self.durable(journal.durable_seq)
        return effects, after

    def durable(self, durable_seq: int) -> None:
        """Entries up to ``durable_seq`` are durable: release the messages that waited for them."""
        self.released(durable_seq, self.outbound.release(durable_seq))

    def _append(self, effects: Effects) -> list[int]:
        if not effects.entries:
            return []
        entries = self.journal.append_event([(a.run, a.kind, a.payload) for a in effects.entries])
        return [entry.seq for entry in entries]
