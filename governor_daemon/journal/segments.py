"""Segment files of the journal: naming, listing and reading with line numbers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from governor_daemon.journal.entry import Entry, EntryError, parse_line

SEGMENT_RE = re.compile(r"^journal-(\d{8})\.jsonl$")
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024


def segment_name(index: int) -> str:
    """File name of segment ``index`` (1-based)."""
    return f"journal-{index:08d}.jsonl"


def list_segments(data_dir: Path) -> list[Path]:
    """Segment files in order (symbolic links included: the journal's writer refuses them)."""
    if not data_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in data_dir.iterdir() if (m := SEGMENT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def segment_index(path: Path) -> int:
    """The index in a segment's file name."""
    match = SEGMENT_RE.match(path.name)
    if match is None:
        raise ValueError(f"not a journal segment: {path}")
    return int(match.group(1))


@dataclass(frozen=True)
class LocatedEntry:
    """An entry with its file, 1-based line number, byte offset and the line's bytes (without newline)."""

    entry: Entry
    path: Path
    line: int
    offset: int = 0
    raw: bytes = b""


@dataclass(frozen=True)
class BadLine:
    """A line that did not parse, with its position."""

    path: Path
    line: int
    offset: int
    reason: str
    is_last: bool


def read_segment(path: Path) -> Iterator[LocatedEntry | BadLine]:
    """Entries of one segment, and BadLine for each line that does not parse.

    A last line without a trailing newline is a torn write: reported as a BadLine with is_last.
    """
    data = path.read_bytes()
    offset = 0
    number = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        torn = end == -1
        raw = data[offset:] if torn else data[offset:end]
        number += 1
        next_offset = len(data) if torn else end + 1
        is_last = next_offset >= len(data)
        try:
            if torn:
                raise EntryError("incomplete last line (no newline): a torn write")
            yield LocatedEntry(parse_line(raw.decode("utf-8")), path, number, offset, raw)
        except (EntryError, UnicodeDecodeError) as exc:
            yield BadLine(path, number, offset, str(exc), is_last)
        offset = next_offset
