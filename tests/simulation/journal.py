"""The simulated journal: the daemon's journal as ``core/apply.EffectJournal``, in memory, that can crash.

Entries are JSON-encoded as the real journal encodes them (an entry it cannot encode is refused, and the
event undone); what is not durable is lost in a crash. ``commit_now`` (a ``sync`` entry) commits at once
when the world honours sync, or else leaves the write in flight: it becomes durable at the world's next
commit, or is lost in a crash before it (as a real urgent write that has not returned yet).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from governor_daemon.journal.entry import canonical_json


@dataclass
class SimEntry:
    """A journal entry as the registry reads it back."""

    seq: int
    run: str
    kind: str
    payload: dict[str, Any]


class SimJournal:
    """Entries appended in memory; every entry up to ``durable`` survives a crash.

    ``on_durable`` is told of the entries that became durable, in seq order, each time ``durable`` moves.
    """

    def __init__(self, on_durable: Callable[[list[SimEntry]], None], honour_sync: bool) -> None:
        self.entries: list[SimEntry] = []
        self.durable = 0
        self.on_durable = on_durable
        self.honour_sync = honour_sync

    @property
    def last_seq(self) -> int:
        return len(self.entries)

    @property
    def durable_seq(self) -> int:
        return self.durable

    def append_event(self, items: list[tuple[str, str, dict[str, Any]]]) -> list[SimEntry]:
        """Append an event's entries, all or none: each is encoded first (raises for NaN, as the journal does)."""
        payloads = [json.loads(canonical_json(payload)) for _, _, payload in items]
        first = len(self.entries) + 1
        entries = [SimEntry(first + i, run, kind, payloads[i]) for i, (run, kind, _) in enumerate(items)]
        self.entries.extend(entries)
        return entries

    def commit_now(self) -> None:
        if self.honour_sync:
            self.commit()

    def commit(self) -> None:
        """Everything appended becomes durable."""
        newly = self.entries[self.durable :]
        self.durable = len(self.entries)
        self.on_durable(newly)

    def crash(self) -> None:
        """SIGKILL: what is not durable is lost."""
        del self.entries[self.durable :]
