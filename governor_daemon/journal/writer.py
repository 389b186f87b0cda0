"""The append side of the journal: sequence and hash assignment, segments, checkpoints, recovery.

``append`` is called from one thread (the daemon's event loop): it assigns seq and hash at once, so
the chain order is the order of calls. ``write_pending`` (called from a worker thread by the group
committer) writes what was appended and fsyncs it. Every segment starts with a ``checkpoint`` entry
holding every run's state, so start-up reads only the last segment.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from governor_daemon.errors import GovernorError
from governor_daemon.journal.entry import GENESIS_HASH, Entry, utc_now_iso, verify_link
from governor_daemon.journal.segments import (
    DEFAULT_SEGMENT_BYTES,
    BadLine,
    LocatedEntry,
    list_segments,
    read_segment,
    segment_index,
    segment_name,
)

CHECKPOINT_KIND = "checkpoint"
CheckpointProvider = Callable[[], dict[str, Any]]


class JournalCorruptError(GovernorError):
    """The journal has a bad line that is not a torn last write; names file and line."""


@dataclass
class Recovery:
    """What start-up found: the last checkpoint payload and the entries after it."""

    checkpoint: dict[str, Any] | None = None
    entries: list[Entry] = field(default_factory=list)
    moved_aside: list[str] = field(default_factory=list)


class Journal:
    """Append-only, hash-chained JSON Lines journal in segments. See the module docstring for threads."""

    def __init__(
        self,
        data_dir: Path,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        key: bytes | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.segment_bytes = segment_bytes
        self.key = key
        self.checkpoint_provider: CheckpointProvider = dict
        self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.durable_seq = 0
        self._segment = 0
        self._segment_size = 0
        self._pending: list[tuple[int, str]] = []
        self.appended: list[Entry] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._file: Any = None
        self._file_segment = 0

    # ----------------------------------------------------------------- start-up

    def open(self, repair: bool = False) -> Recovery:
        """Scan the last segment, handle a torn tail, verify its chain; return what to apply.

        Raises JournalCorruptError (unless ``repair``) for a bad line other than a torn last one.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        recovery = Recovery()
        segments = list_segments(self.data_dir)
        if not segments:
            self._segment = 0
            return recovery
        last = segments[-1]
        prev_hash, expected_seq = GENESIS_HASH, None
        if len(segments) > 1:
            tail = _last_entry(segments[-2])
            if tail is not None:
                prev_hash, expected_seq = tail.hash, tail.seq + 1
        entries: list[Entry] = []
        for item in read_segment(last):
            problem: str | None
            if isinstance(item, BadLine):
                problem, line, offset, torn = item.reason, item.line, item.offset, item.is_last
            else:
                problem = verify_link(item.entry, prev_hash, expected_seq, self.key)
                line, offset, torn = item.line, _offset_of_line(last, item.line), False
            if problem is None and isinstance(item, LocatedEntry):
                entries.append(item.entry)
                prev_hash, expected_seq = item.entry.hash, item.entry.seq + 1
                continue
            if torn:
                recovery.moved_aside.append(self._move_tail_aside(last, offset, "torn", f"line {line}: {problem}"))
                break
            if not repair:
                raise JournalCorruptError(
                    f"journal corrupt at {last}:{line}: {problem}; "
                    "start with --repair to move the bad tail aside (nothing is deleted)"
                )
            recovery.moved_aside.append(self._move_tail_aside(last, offset, "bad-tail", f"line {line}: {problem}"))
            break
        self._segment = segment_index(last)
        self._segment_size = last.stat().st_size
        if entries:
            self.last_seq, self.last_hash = entries[-1].seq, entries[-1].hash
        elif expected_seq is not None:
            self.last_seq, self.last_hash = expected_seq - 1, prev_hash
        self.durable_seq = self.last_seq
        start = 0
        for i, entry in enumerate(entries):
            if entry.kind == CHECKPOINT_KIND:
                recovery.checkpoint = entry.payload
                start = i + 1
        if recovery.checkpoint is None and len(segments) > 1:
            # The last segment lost its checkpoint (torn at creation): fall back to the previous one.
            earlier = [e.entry for e in read_segment(segments[-2]) if isinstance(e, LocatedEntry)]
            marks = [i for i, entry in enumerate(earlier) if entry.kind == CHECKPOINT_KIND]
            if marks:
                recovery.checkpoint = earlier[marks[-1]].payload
                recovery.entries.extend(earlier[marks[-1] + 1 :])
        recovery.entries.extend(entries[start:])
        return recovery

    def _move_tail_aside(self, path: Path, offset: int, label: str, why: str) -> str:
        data = path.read_bytes()
        aside = path.with_name(f"{path.name}.{label}-{len(list(self.data_dir.glob(path.name + '.*'))) + 1}")
        aside.write_bytes(data[offset:])
        with path.open("r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        return f"{why}: {len(data) - offset} bytes moved to {aside.name}"

    # ----------------------------------------------------------------- appending

    def append(self, run: str, kind: str, payload: dict[str, Any], now_epoch_s: float) -> Entry:
        """Assign seq and hash to a new entry and buffer it (not yet durable).

        A segment's checkpoint entry, when this entry starts a segment, is appended before it; both
        are in ``appended`` until the next call (readers of the journal see checkpoints too).
        """
        with self._lock:
            self.appended = []
            if self._segment == 0 or self._segment_size >= self.segment_bytes:
                self._rotate(now_epoch_s)
            entry = self._append_locked(run, kind, payload, now_epoch_s)
            return entry

    def _rotate(self, now_epoch_s: float) -> None:
        self._segment += 1
        self._segment_size = 0
        self._append_locked("", CHECKPOINT_KIND, self.checkpoint_provider(), now_epoch_s)

    def _append_locked(self, run: str, kind: str, payload: dict[str, Any], now_epoch_s: float) -> Entry:
        entry, line = Entry.create_with_line(
            self.last_seq + 1, utc_now_iso(now_epoch_s), run, kind, payload, self.last_hash, self.key
        )
        self._pending.append((self._segment, line))
        self.appended.append(entry)
        self._segment_size += len(line.encode("utf-8"))
        self.last_seq, self.last_hash = entry.seq, entry.hash
        return entry

    def write_pending(self) -> int:
        """Write and fsync everything appended so far; returns the durable seq. Worker-thread safe."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                target = self.last_seq
            if not batch:
                return self.durable_seq
            for segment, line in batch:
                if segment != self._file_segment:
                    self._switch_file(segment)
                self._file.write(line.encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
            self.durable_seq = target
            return target

    def _switch_file(self, segment: int) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self._file = (self.data_dir / segment_name(segment)).open("ab")
        self._file_segment = segment
        _fsync_dir(self.data_dir)

    def close(self) -> None:
        """Flush and close. Safe to call twice."""
        self.write_pending()
        with self._write_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._file_segment = 0


def _last_entry(path: Path) -> Entry | None:
    last: Entry | None = None
    for item in read_segment(path):
        if isinstance(item, LocatedEntry):
            last = item.entry
    return last


def _offset_of_line(path: Path, line: int) -> int:
    data = path.read_bytes()
    offset = 0
    for _ in range(line - 1):
        offset = data.index(b"\n", offset) + 1
    return offset


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
