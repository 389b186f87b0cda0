"""The entry kinds live with the journal's records in ``tolaria.journal`` (the contract of every entry's payload;
the core reaches it through ``governor_daemon.journal_records``); this module stays for the old imports."""

from __future__ import annotations

from governor_daemon.journal_records import ENTRY_KINDS, EntryKind

__all__ = ["ENTRY_KINDS", "EntryKind"]
