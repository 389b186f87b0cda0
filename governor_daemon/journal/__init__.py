"""The append-only, hash-chained journal: entries, segments and the writer (no asyncio here: the
daemon's group commit on the event loop is ``journal/group_commit.py``)."""

from governor_daemon.journal.entry import GENESIS_HASH, Committed, Entry, EntryError, canonical_json, parse_line
from governor_daemon.journal.writer import CHECKPOINT_KIND, Journal, JournalCorruptError, JournalLockedError, Recovery

__all__ = [
    "CHECKPOINT_KIND",
    "GENESIS_HASH",
    "Committed",
    "Entry",
    "EntryError",
    "Journal",
    "JournalCorruptError",
    "JournalLockedError",
    "Recovery",
    "canonical_json",
    "parse_line",
]
