"""The journal on real files: chain, segments with checkpoints, torn tails, corruption, --repair."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from governor_daemon.journal import Journal, JournalCorruptError
from governor_daemon.journal.group_commit import GroupCommitter
from governor_daemon.journal.segments import list_segments
from governor_daemon.journal.verify import verify_journal
from governor_daemon.service import codec
from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.conftest import governor_cli


def write_entries(data_dir: Path, n: int, segment_bytes: int = 64 * 1024 * 1024, key: bytes | None = None) -> Journal:
    journal = Journal(data_dir, segment_bytes, key)
    journal.open()
    journal.checkpoint_provider = lambda: {"runs": {}}
    for i in range(n):
        journal.append("r", "note", {"i": i, "pad": "x" * 100}, 1_700_000_000.0 + i)
    journal.close()
    return journal


def test_chain_verifies_and_head_matches(tmp_path: Path) -> None:
    """A fresh journal verifies; `audit head` prints the last entry's seq and hash."""
    write_entries(tmp_path, 5)
    report = verify_journal(tmp_path)
    assert report.ok
    assert (report.num_entries, report.head_seq) == (6, 6)  # checkpoint + 5
    last = json.loads((tmp_path / "journal-00000001.jsonl").read_text().splitlines()[-1])
    head = governor_cli(["audit", "head", "--data-dir", str(tmp_path)])
    assert head.stdout.split() == ["6", last["hash"]]


def test_segments_roll_over_with_checkpoints(tmp_path: Path) -> None:
    """Past segment_bytes a new segment starts with a checkpoint; the chain runs across segments."""
    write_entries(tmp_path, 200, segment_bytes=4096)
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    for path in segments:
        first = json.loads(path.read_text().splitlines()[0])
        assert first["kind"] == "checkpoint"
    assert verify_journal(tmp_path).ok


def test_one_changed_byte_fails_verify_naming_line(tmp_path: Path) -> None:
    """Tampering with one byte makes `audit verify` fail and name the line."""
    write_entries(tmp_path, 5)
    path = tmp_path / "journal-00000001.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"i":2', '"i":7')
    path.write_text("".join(lines))
    result = governor_cli(["audit", "verify", "--data-dir", str(tmp_path)])
    assert result.returncode == 7  # CHECK_FAILED, not the internal-error code
    assert "journal-00000001.jsonl:4" in result.stderr
    assert "hash does not match" in result.stderr


def test_hmac_key_required_to_verify(tmp_path: Path) -> None:
    """With an HMAC key the chain verifies only with that key."""
    write_entries(tmp_path, 3, key=b"k" * 32)
    assert verify_journal(tmp_path, b"k" * 32).ok
    assert not verify_journal(tmp_path).ok


def test_torn_last_line_is_moved_aside_at_start(tmp_path: Path) -> None:
    """A torn last write is reported, moved aside (not deleted), and appending continues the chain."""
    write_entries(tmp_path, 3)
    path = tmp_path / "journal-00000001.jsonl"
    with path.open("ab") as f:
        f.write(b'{"hash":"abc","kind":"no')
    journal = Journal(tmp_path)
    recovery = journal.open()
    assert len(recovery.moved_aside) == 1
    assert "torn" in recovery.moved_aside[0]
    aside = list(tmp_path.glob("journal-00000001.jsonl.torn-*"))
    assert aside
    assert aside[0].read_bytes() == b'{"hash":"abc","kind":"no'
    journal.checkpoint_provider = lambda: {"runs": {}}
    journal.append("r", "after", {}, 1_700_000_100.0)
    journal.close()
    assert verify_journal(tmp_path).ok


def test_corruption_stops_start_unless_repair(tmp_path: Path) -> None:
    """A bad line that is not the last stops start-up naming it; --repair moves the tail aside."""
    write_entries(tmp_path, 4)
    path = tmp_path / "journal-00000001.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "garbage\n"
    path.write_text("".join(lines))
    with pytest.raises(JournalCorruptError, match=r"journal-00000001\.jsonl:3"):
        Journal(tmp_path).open()
    assert path.read_text().count("\n") == 5, "nothing changed without --repair"
    recovery = Journal(tmp_path).open(repair=True)
    assert recovery.moved_aside[0].startswith("journal-00000001.jsonl:3: ")
    assert path.read_text().count("\n") == 2
    aside = next(tmp_path.glob("journal-00000001.jsonl.bad-tail-*"))
    assert aside.read_text().startswith("garbage\n")
    assert verify_journal(tmp_path).ok


def test_serve_refuses_corrupt_journal_and_repairs(tmp_path: Path) -> None:
    """`governor serve` exits 2 naming the line of a corrupt journal; with --repair it starts."""
    write_entries(tmp_path / "data", 4)
    path = tmp_path / "data" / "journal-00000001.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:-10] + "}\n"
    path.write_text("".join(lines))
    result = governor_cli(
        ["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        timeout_s=30,
    )
    assert result.returncode == 2
    assert "journal-00000001.jsonl:2" in result.stdout
    assert "--repair" in result.stdout


def test_group_commit_acks_only_durable(tmp_path: Path) -> None:
    """wait_durable returns only after write+fsync; many appends share one commit."""

    async def scenario() -> tuple[int, int, int]:
        journal = Journal(tmp_path)
        journal.open()
        committer = GroupCommitter(journal, interval_s=0.01)
        await committer.start()
        entries = [committer.append("r", "note", {"i": i}) for i in range(50)]
        assert journal.durable_seq < entries[-1].seq
        await committer.wait_durable(entries[-1].seq)
        durable = journal.durable_seq
        on_disk = len((tmp_path / "journal-00000001.jsonl").read_text().splitlines())
        await committer.close()
        return durable, entries[-1].seq, on_disk

    durable, last, on_disk = asyncio.run(scenario())
    assert durable >= last
    assert on_disk >= last


def test_close_returns_when_an_entry_lands_between_its_commit_and_its_stop(tmp_path: Path) -> None:
    """Regression (the one-off 30 s InProcessDaemon stop, caught with its stacks): an entry appended after
    close()'s commit (a stream's detach during shutdown) left the commit loop writing it and then waiting
    for a wake-up that never came, and close() waiting for the loop."""

    class LateAppend(GroupCommitter):
        async def commit(self) -> None:
            await super().commit()
            if not self._closed:
                self.append("r", "note", {"late": True})  # what another task does while close() resumes

    async def scenario() -> int:
        journal = Journal(tmp_path)
        journal.open()
        committer = LateAppend(journal, interval_s=0.01)
        await committer.start()
        first = committer.append("r", "note", {"i": 1})
        await committer.wait_durable(first.seq)
        await asyncio.sleep(0.05)  # the loop is idle: close()'s own commit has nothing to wait for
        await asyncio.wait_for(committer.close(), timeout=5)
        return len((tmp_path / "journal-00000001.jsonl").read_text().splitlines())

    assert asyncio.run(scenario()) >= 2, "the late entry is on disk too"


def test_restart_restores_state_from_checkpoint_and_effects(tmp_path: Path) -> None:
    """After a clean restart with small segments, the run's state is what it was."""
    with InProcessDaemon(tmp_path / "data", segment_bytes=4096) as daemon:
        client = AttachClient(daemon.address, "persist")
        client.connect()
        for i, loss in enumerate([2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, math.nan]):
            client.vitals([i * 10 + j for j in range(1, 10)], [1.0] * 9)
            client.validation(i * 10 + 10, loss)
        command = client.next("command").command
        client.wait_ack(client.result(command))
        before = daemon.call(_status(daemon, "persist"))
        client.close()
    assert len(list_segments(tmp_path / "data")) > 1
    with InProcessDaemon(tmp_path / "data", segment_bytes=4096) as daemon:
        after = daemon.call(_status(daemon, "persist"))
    for field in ("timeline", "num_rollbacks", "history_size", "history_mean", "total_punishment_reward", "state"):
        assert getattr(after, field) == getattr(before, field), field
    assert after.ranks[0].num_records == before.ranks[0].num_records == 120


async def _status_coro(daemon: InProcessDaemon, run_id: str):  # type: ignore[no-untyped-def]
    assert daemon.daemon is not None
    governor = daemon.daemon.governor
    return codec.run_status_to_proto(governor.run(run_id), 0.0, governor.now())


def _status(daemon: InProcessDaemon, run_id: str):  # type: ignore[no-untyped-def]
    return _status_coro(daemon, run_id)
