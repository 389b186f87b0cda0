"""The append-only, hash-chained journal: entries, segments, the writer and group commit."""

from governor_daemon.journal.entry import GENESIS_HASH, Committed, Entry, EntryError, canonical_json, parse_line
from governor_daemon.journal.group_commit import GroupCommitter
from governor_daemon.journal.writer import CHECKPOINT_KIND, Journal, JournalCorruptError, Recovery

__all__ = [
    "CHECKPOINT_KIND",
    "GENESIS_HASH",
    "Committed",
    "Entry",
    "EntryError",
    "GroupCommitter",
    "Journal",
    "JournalCorruptError",
    "Recovery",
    "canonical_json",
    "parse_line",
]
