"""The append side of the journal: sequence and hash assignment, segments, checkpoints, recovery.

``append`` is called from one thread (the daemon's event loop): it assigns seq and hash at once, so
the chain order is the order of calls. ``write_pending`` (from the group committer's thread, or on the
event loop for a commit a message waits for) writes what was appended, one ``O_DSYNC`` write per
segment. Every segment starts with a ``checkpoint`` entry
holding every run's state, so start-up reads only the last segment.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import operator
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
MORE = "more"
"""Payload key of the entries of a multi-entry event: how many of the event's entries follow this one.
An event whose last entry did not reach the disk is moved aside whole at start-up (nothing of it was
acknowledged: messages wait for an event's last entry)."""
CheckpointProvider = Callable[[], dict[str, Any]]


class JournalCorruptError(GovernorError):
    """The journal has a bad line that is not a torn last write; names file and line."""


class JournalLockedError(GovernorError):
    """Another process holds the data dir's lock (one writer per data dir)."""


LOCK_NAME = "LOCK"


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
        self._pending: list[tuple[int, bytes]] = []  # (segment, line) appended, not yet written
        self.appended: list[Entry] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._fd: int | None = None  # the segment being written, opened O_DSYNC
        self._write_failed: BaseException | None = None
        self._file_segment = 0
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------- start-up

    def open(self, repair: bool = False) -> Recovery:
        """Lock the data dir, verify the whole chain, handle a torn tail; return what to apply.

        Every segment is read once and every entry's link and hash checked (linear in the journal).
        A torn last line (no newline) of the last segment is moved aside. Any other bad line raises
        JournalCorruptError naming its file and line; with ``repair``, a bad tail of the last segment
        is moved aside instead (damage in an earlier segment is never repaired: restore a backup).
        Raises JournalLockedError when another process holds the data dir.
        """
        self._prepare_dir()
        try:
            return self._recover(repair)
        except BaseException:
            self._release_lock()
            raise

    def _recover(self, repair: bool) -> Recovery:
        recovery = Recovery()
        segments = list_segments(self.data_dir)
        for path in segments:
            if path.is_symlink():
                raise JournalCorruptError(f"{path} is a symbolic link; the journal never follows links")
        prev_hash, expected_seq = GENESIS_HASH, 1
        last_entries: list[Entry] = []  # the last segment's
        for index, path in enumerate(segments):
            is_last = index == len(segments) - 1
            entries: list[Entry] = []
            offsets: list[int] = []
            before_segment = prev_hash, expected_seq
            for item in read_segment(path):
                problem: str | None
                if isinstance(item, BadLine):
                    problem, line, offset, torn = item.reason, item.line, item.offset, item.is_last
                    torn = torn and is_last and "torn" in problem
                else:
                    problem = verify_link(item.entry, prev_hash, expected_seq, self.key, item.raw)
                    line, offset, torn = item.line, item.offset, False
                if problem is None and isinstance(item, LocatedEntry):
                    entries.append(item.entry)
                    offsets.append(item.offset)
                    prev_hash, expected_seq = item.entry.hash, item.entry.seq + 1
                    continue
                where = f"{path.name}:{line}"
                if torn:
                    recovery.moved_aside.append(self._move_tail_aside(path, offset, "torn", f"{where}: {problem}"))
                    break
                if not (repair and is_last):
                    hint = (
                        "start with --repair to move the bad tail aside (nothing is deleted)"
                        if is_last
                        else "an earlier segment is damaged: restore the data dir from a backup"
                    )
                    raise JournalCorruptError(f"journal corrupt at {where}: {problem}; {hint}")
                recovery.moved_aside.append(self._move_tail_aside(path, offset, "bad-tail", f"{where}: {problem}"))
                break
            if is_last:
                start = _incomplete_event_start(entries)
                if start is not None:
                    why = f"{path.name}: event from seq {entries[start].seq} has no last entry (torn write)"
                    recovery.moved_aside.append(self._move_tail_aside(path, offsets[start], "torn", why))
                    entries = entries[:start]
                    prev_hash, expected_seq = (entries[-1].hash, entries[-1].seq + 1) if entries else before_segment
                last_entries = entries
                self._segment = segment_index(path)
                self._segment_size = path.stat().st_size
        self.last_seq, self.last_hash = expected_seq - 1, prev_hash
        self.durable_seq = self.last_seq
        recovery.checkpoint, recovery.entries = _from_last_checkpoint(segments, last_entries)
        return recovery

    def _prepare_dir(self) -> None:
        """Create the data dir (0700), take its lock, tighten its mode."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.data_dir.is_symlink():
            raise JournalCorruptError(f"{self.data_dir} is a symbolic link; give the real path")
        os.chmod(self.data_dir, 0o700)
        lock_path = self.data_dir / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JournalLockedError(
                f"{self.data_dir} is in use by another governor (pid {holder}); one writer per data dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _move_tail_aside(self, path: Path, offset: int, label: str, why: str) -> str:
        data = path.read_bytes()
        number = 1
        while (aside := path.with_name(f"{path.name}.{label}-{number}")).exists() or aside.is_symlink():
            number += 1
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data[offset:])
            f.flush()
            os.fsync(f.fileno())
        with path.open("r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        return f"{why}: {len(data) - offset} bytes moved to {aside.name}"

    # ----------------------------------------------------------------- appending

    def append(self, run: str, kind: str, payload: dict[str, Any], now_epoch_s: float, rotate: bool = True) -> Entry:
        """Assign seq and hash to a new entry and buffer it (not yet durable).

        With ``rotate``, a segment that is full is closed first: the new segment's checkpoint entry is
        appended before this entry, and both are in ``appended`` until the next call (readers of the
        journal see checkpoints too). A caller whose state already includes entries it has yet to append
        (the daemon, between an event and its entries) passes ``rotate=False`` and calls
        ``rotate_if_due`` before the event instead: a checkpoint never holds state whose entries come
        after it.
        """
        with self._lock:
            self.appended = []
            if rotate and self._rotation_due():
                self._rotate(now_epoch_s)
            return self._append_locked(run, kind, payload, now_epoch_s)

    def append_event(self, items: list[tuple[str, str, dict[str, Any]]], now_epoch_s: float) -> list[Entry]:
        """Append the entries of one event together: no segment starts inside it, and a concurrent
        ``write_pending`` takes all of them or none. Entries of a multi-entry event carry ``MORE``."""
        with self._lock:
            self.appended = []
            last = len(items) - 1
            ts = utc_now_iso(now_epoch_s)
            built: list[tuple[Entry, str]] = []
            seq, prev_hash = self.last_seq, self.last_hash
            for i, (run, kind, payload) in enumerate(items):  # every entry encoded before any is appended
                seq += 1
                entry, line = Entry.create_with_line(
                    seq, ts, run, kind, {**payload, MORE: last - i} if last else payload, prev_hash, self.key
                )
                built.append((entry, line))
                prev_hash = entry.hash
            for entry, line in built:
                self._add_locked(entry, line)
            return [entry for entry, _ in built]

    def rotate_if_due(self, now_epoch_s: float) -> list[Entry]:
        """Start a new segment (with its checkpoint) if the current one is full; returns what was appended."""
        with self._lock:
            self.appended = []
            if self._rotation_due():
                self._rotate(now_epoch_s)
            return list(self.appended)

    def _rotation_due(self) -> bool:
        return self._segment == 0 or self._segment_size >= self.segment_bytes

    def _rotate(self, now_epoch_s: float) -> None:
        self._segment += 1
        self._segment_size = 0
        self._append_locked("", CHECKPOINT_KIND, self.checkpoint_provider(), now_epoch_s)

    def _append_locked(self, run: str, kind: str, payload: dict[str, Any], now_epoch_s: float) -> Entry:
        entry, line = Entry.create_with_line(
            self.last_seq + 1, utc_now_iso(now_epoch_s), run, kind, payload, self.last_hash, self.key
        )
        self._add_locked(entry, line)
        return entry

    def _add_locked(self, entry: Entry, line: str) -> None:
        data = line.encode("utf-8")
        self._pending.append((self._segment, data))
        self.appended.append(entry)
        self._segment_size += len(data)
        self.last_seq, self.last_hash = entry.seq, entry.hash

    def write_pending(self) -> int:
        """Write everything appended so far, durably; returns the durable seq. Worker-thread safe.

        One ``write`` per segment: the files are opened ``O_DSYNC``, so the write returns once the data
        and the file size are on the device (fdatasync's guarantee) and the thread takes the GIL back
        once per commit, not once for the write and again for an fsync.
        """
        with self._write_lock:
            if self._write_failed is not None:  # what it lost precedes everything appended since: never write past it
                raise OSError(f"an earlier journal write failed: {self._write_failed}")
            with self._lock:
                batch, self._pending = self._pending, []
                target = self.last_seq
            if not batch:
                return self.durable_seq
            try:
                for segment, lines in itertools.groupby(batch, key=operator.itemgetter(0)):
                    self._write_durably(segment, b"".join(line for _, line in lines))
            except BaseException as exc:
                self._write_failed = exc
                raise
            self.durable_seq = target
            return target

    def _write_durably(self, segment: int, data: bytes) -> None:
        if segment != self._file_segment or self._fd is None:
            self._switch_file(segment)
        assert self._fd is not None
        view = memoryview(data)
        while view:  # a regular file takes it whole unless the disk fills, which raises
            view = view[os.write(self._fd, view) :]

    def _switch_file(self, segment: int) -> None:
        self._close_file()
        self._fd = os.open(
            self.data_dir / segment_name(segment),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_DSYNC,
            0o600,
        )
        self._file_segment = segment
        _fsync_dir(self.data_dir)

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._file_segment = self._fd, None, 0
            os.close(fd)

    def close(self) -> None:
        """Write what is pending and close. Safe to call twice."""
        self.write_pending()
        with self._write_lock:
            self._close_file()
            self._release_lock()

    def abandon(self) -> None:
        """Close after a write failure: nothing more is written (what was not durable is lost, as in a
        crash); the lock is released. Never raises."""
        with self._write_lock:
            self._pending = []
            with contextlib.suppress(OSError):  # what the failed write left is a torn tail; restart recovers
                self._close_file()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None


def _incomplete_event_start(entries: list[Entry]) -> int | None:
    """Index of the first entry of a trailing multi-entry event whose last entry is missing, or None."""
    if not entries or not entries[-1].payload.get(MORE):
        return None
    start = len(entries) - 1
    while start > 0 and entries[start - 1].payload.get(MORE) == entries[start].payload.get(MORE, 0) + 1:
        start -= 1
    return start


def _from_last_checkpoint(segments: list[Path], last: list[Entry]) -> tuple[dict[str, Any] | None, list[Entry]]:
    """The last checkpoint's payload and the entries after it (the last segment's, or, when the last
    segment lost its checkpoint to a torn write at creation, from the previous segment's on)."""
    marks = [i for i, entry in enumerate(last) if entry.kind == CHECKPOINT_KIND]
    if marks:
        return last[marks[-1]].payload, last[marks[-1] + 1 :]
    if len(segments) > 1:
        earlier = [e.entry for e in read_segment(segments[-2]) if isinstance(e, LocatedEntry)]
        earlier_marks = [i for i, entry in enumerate(earlier) if entry.kind == CHECKPOINT_KIND]
        if earlier_marks:
            return earlier[earlier_marks[-1]].payload, earlier[earlier_marks[-1] + 1 :] + last
    return None, last


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
