"""Regression tests for defects a red-team review found in shedding and the synchronous urgent commit:
each failed on the code it was written against, for the reason its docstring gives."""

from __future__ import annotations

import asyncio
import errno
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from governor_daemon.journal.group_commit import GroupCommitter
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.journal.writer import Journal, JournalCorruptError
from governor_daemon.service.ingest import VitalsIngest
from governor_daemon.service.runtime import Governor, GovernorOptions
from governor_daemon.service.trainer_servicer import TrainerServicer
from tolaria.governor.v1 import trainer_service_pb2


class _DiskFailsOnce(Journal):
    """The real journal on a real directory, whose next write fails with ENOSPC once ``fail_next`` is set
    (the disk was full for a moment: another process freed space right after). The failing write first
    waits for ``gate``, so a test can hold it in flight; nothing else differs from ``Journal``."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.fail_next = False
        self.in_write = threading.Event()
        self.gate = threading.Event()

    def _write_durably(self, segment: int, data: bytes) -> None:
        if self.fail_next:
            self.fail_next = False
            self.in_write.set()
            self.gate.wait(10)
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write_durably(segment, data)


def test_a_failed_background_write_is_never_published_by_an_urgent_commit(tmp_path: Path) -> None:
    """Defect (governor_daemon/journal/group_commit.py ``commit_now`` / writer.py ``write_pending``):
    ``write_pending`` takes the pending lines out of ``_pending`` *before* writing them, and a write that
    raises leaves them gone. When the commit loop's thread write of entry A fails while an urgent
    ``commit_now`` (a verdict's or command's entry B) is waiting for the write lock on the event loop
    thread, ``commit_now`` then writes only B, succeeds, sets ``durable_seq`` to B and ``_publish(B)``:
    every message held for A is released and every ``wait_durable(A)`` (a controller's call) returns
    success, although A never reached the disk. Only afterwards does the loop see its thread's exception
    and declare the failure. On disk, B follows a line that is missing, so the restart that docs/protocol.md
    promises "recovers from what is durable" refuses to start (JournalCorruptError, with B acknowledged).
    A failed write must fail everything not yet durable; nothing after it may be written or published."""

    async def scenario() -> tuple[list[int], int, int, BaseException | None, str]:
        journal = _DiskFailsOnce(tmp_path / "data")
        journal.open()
        committer = GroupCommitter(journal, interval_s=0.0)
        released: list[int] = []
        committer.on_durable = released.append
        committer.on_failure = lambda exc: None
        await committer.start()
        committer.append("r", "vitals", {"n": 0})
        await committer.commit()

        journal.fail_next = True
        a = committer.append("r", "vitals", {"n": 1})  # the loop's thread takes it, and its write fails
        waiter = asyncio.ensure_future(committer.wait_durable(a.seq))  # a controller waiting for A
        deadline = time.monotonic() + 10
        while not journal.in_write.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert journal.in_write.is_set(), "the commit loop never started writing A"
        b = committer.append("r", "decision", {"n": 2})  # a verdict's entry: urgent
        threading.Timer(0.05, journal.gate.set).start()  # A's write fails while commit_now waits for it
        committer.commit_now()
        await asyncio.sleep(0.1)  # the loop learns of its thread's failure
        outcome: BaseException | None = None
        try:
            await asyncio.wait_for(waiter, 5)
        except BaseException as exc:
            outcome = exc
        failure = committer.failure
        await committer.close()
        try:
            Journal(tmp_path / "data").open()
            restart = "ok"
        except JournalCorruptError as exc:
            restart = f"JournalCorruptError: {exc}"
        assert failure is not None, "the loop never declared the write failure"
        return released, a.seq, b.seq, outcome, restart

    released, a_seq, b_seq, outcome, restart = asyncio.run(scenario())
    assert released
    assert max(released) < a_seq, (
        f"messages were released up to seq {max(released)} although entry {a_seq} failed to reach the disk "
        f"(entry {b_seq} was written after the gap); restart: {restart}"
    )
    assert isinstance(outcome, Exception), "a controller waiting for the failed entry was told it is durable"
    assert restart == "ok", restart


def test_a_message_behind_a_refused_batch_is_not_applied(tmp_path: Path) -> None:
    """Defect (governor_daemon/service/trainer_servicer.py ``read``, the ``ingest.drain(stream)`` before
    ``governor.handle(event)``): when the drain hands over a queued batch that the core refuses (here a
    timeline ahead of the run: INVALID_ARGUMENT, "changes nothing"), ``stream.fail`` closes the stream,
    but the reader goes on to hand the core the message that triggered the drain. The runtime only ignores
    streams it has *removed* (``close_stream``, which runs later in the handler's ``finally``), so the
    validation record read after the refused batch is journaled and judged on a stream that was already
    refused: per-stream order says nothing after a refused message is applied. The trainer gets
    INVALID_ARGUMENT and no verdict, and on reconnect its Welcome's last_durable_seq (5) covers the refused
    records 3-4 too, so it never resends them; a PANIC decision (loss NaN here) even rolls the run back."""

    async def requests() -> AsyncIterator[trainer_service_pb2.AttachRequest]:
        hello = trainer_service_pb2.Hello(
            run_id="r", rank=0, world_size=1, incarnation_id=uuid.uuid4().hex, task="t", num_classes=10
        )
        yield trainer_service_pb2.AttachRequest(hello=hello)
        ok = trainer_service_pb2.VitalsBatch(first_seq=1, step=[1, 2], loss=[2.0, 1.9])
        yield trainer_service_pb2.AttachRequest(vitals_batch=ok)
        ahead = trainer_service_pb2.VitalsBatch(first_seq=3, step=[3, 4], loss=[1.8, 1.7], timeline=5)
        yield trainer_service_pb2.AttachRequest(vitals_batch=ahead)
        record = trainer_service_pb2.ValidationRecord(seq=5, step=4, epoch=1, loss=math.nan)
        yield trainer_service_pb2.AttachRequest(validation_record=record)

    async def scenario() -> tuple[str, int, list[tuple[str, int]]]:
        governor = Governor(GovernorOptions(tmp_path / "data"))
        await governor.start()
        ingest = VitalsIngest(governor)
        ingest.start()
        stream = governor.open_stream("test")
        await TrainerServicer(governor, ingest).read(requests(), stream)
        durable = governor.core.registry.runs["r"].rank(0).last_durable_seq
        await ingest.stop()
        await governor.close()
        failure = str(stream.failure)
        entries = [
            (item.entry.kind, int(item.entry.payload.get("seq", 0)))
            for path in list_segments(tmp_path / "data")
            for item in read_segment(path)
            if isinstance(item, LocatedEntry) and item.entry.run == "r"
        ]
        return failure, durable, entries

    failure, durable, entries = asyncio.run(scenario())
    assert "vitals_batch.timeline" in failure, failure
    assert durable == 2, f"the refused stream's later record was accepted: last_durable_seq {durable}; {entries}"
    assert not [kind for kind, seq in entries if seq == 5], entries


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
