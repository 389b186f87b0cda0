"""Start-up verifies the whole journal, one writer per data dir, private files, no links, no overwrites."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from governor_daemon.journal import Journal, JournalCorruptError, JournalLockedError
from governor_daemon.journal.verify import verify_journal
from tests.conftest import governor_cli


def three_segments(data_dir: Path) -> list[Path]:
    """A journal of three segments of about 20 entries each."""
    journal = Journal(data_dir, segment_bytes=4000)
    journal.open()
    journal.checkpoint_provider = lambda: {"runs": {}}
    for i in range(55):
        journal.append("r", "note", {"i": i, "pad": "x" * 150}, 1_700_000_000.0 + i)
    journal.close()
    segments = sorted(data_dir.glob("journal-*.jsonl"))
    assert len(segments) >= 3
    return segments


def rewrite_line(path: Path, index: int, change: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    if change == "flip":
        lines[index] = lines[index].replace('"i":', '"i":1', 1)
    elif change == "garbage":
        lines[index] = "garbage\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize(("change", "line"), [("flip", 4), ("garbage", 2)])
def test_damage_in_an_earlier_segment_stops_start_up_naming_the_line(tmp_path: Path, change: str, line: int) -> None:
    """Review finding: only the last segment was checked, so this started silently (verify said FAILED)."""
    segments = three_segments(tmp_path)
    rewrite_line(segments[1], line - 1, change)
    with pytest.raises(JournalCorruptError, match=rf"{segments[1].name}:{line}: .*restore the data dir"):
        Journal(tmp_path).open(repair=True)  # never repaired: that would discard whole segments
    assert not list(tmp_path.glob("*.bad-tail-*"))


def test_a_deleted_segment_breaks_continuity(tmp_path: Path) -> None:
    segments = three_segments(tmp_path)
    segments[1].unlink()
    with pytest.raises(JournalCorruptError, match=rf"{segments[2].name}:1: "):
        Journal(tmp_path).open()


def test_a_changed_last_line_of_a_segment_is_named_where_it_is(tmp_path: Path) -> None:
    """Review finding: the damage was reported at the next segment's first line."""
    segments = three_segments(tmp_path)
    last_line = segments[1].read_text().count("\n")
    rewrite_line(segments[1], last_line - 1, "flip")
    with pytest.raises(JournalCorruptError, match=rf"{segments[1].name}:{last_line}: "):
        Journal(tmp_path).open()


def test_a_complete_bad_last_line_is_corruption_not_a_torn_write(tmp_path: Path) -> None:
    segments = three_segments(tmp_path)
    with segments[-1].open("a") as f:
        f.write("garbage\n")
    with pytest.raises(JournalCorruptError, match="--repair"):
        Journal(tmp_path).open()


def test_second_writer_is_refused_and_the_first_keeps_going(tmp_path: Path) -> None:
    """Review finding: two `governor serve` on one dir both appended and forked the hash chain."""
    first = Journal(tmp_path)
    first.open()
    first.checkpoint_provider = lambda: {"runs": {}}
    with pytest.raises(JournalLockedError, match=f"pid {os.getpid()}"):
        Journal(tmp_path).open()
    result = governor_cli(
        ["serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--metrics-listen", "off"], timeout_s=30
    )
    assert result.returncode == 2
    assert "in use by another governor" in result.stdout
    first.append("r", "note", {}, 1_700_000_000.0)
    first.write_pending()
    first.close()
    assert verify_journal(tmp_path).ok
    again = Journal(tmp_path)
    again.open()  # the lock went with the first writer
    again.close()


def test_files_are_private_and_links_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    three_segments(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for path in data.glob("journal-*.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    last = sorted(data.glob("journal-*.jsonl"))[-1]
    target = tmp_path / "elsewhere.jsonl"
    last.rename(target)
    last.symlink_to(target)
    with pytest.raises(JournalCorruptError, match="symbolic link"):
        Journal(data).open()


def test_moving_a_torn_tail_aside_never_overwrites(tmp_path: Path) -> None:
    segments = three_segments(tmp_path)
    earlier = segments[-1].with_name(segments[-1].name + ".torn-1")
    earlier.write_text("an earlier torn tail\n")
    with segments[-1].open("a") as f:
        f.write('{"hash":"abc"')
    recovery = Journal(tmp_path).open()
    assert "torn-2" in recovery.moved_aside[0]
    assert earlier.read_text() == "an earlier torn tail\n"
