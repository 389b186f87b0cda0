"""service/runtime.py without sockets: events into a real Governor over a real journal in a temporary directory.

What it promises: a message leaves only once the entries before it are durable, a controller's call returns only
once its entries are, a refused event changes nothing, and a restart rebuilds the same state from the journal.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from governor_daemon.core import Limits
from governor_daemon.core import events as ev
from governor_daemon.errors import ConflictError, InvalidInputError, LimitExceededError, PolicyStateError
from governor_daemon.service import codec
from governor_daemon.service.runtime import Governor
from governor_daemon.service.streams import StreamHandle
from tests.unit.service.harness import (
    CALLER,
    PEER,
    Daemon,
    finish,
    hello,
    kinds,
    on_daemon,
    started,
    validation,
    vitals,
)
from tolaria.governor.v1 import common_pb2
from tolaria.governor.v1 import trainer_service_pb2 as tpb


def feed(governor: Governor, stream: StreamHandle, request: tpb.AttachRequest) -> int:
    """Decode ``request`` as the Attach reader does and hand it to the runtime; returns the seq its answers wait
    for."""
    limits, now = governor.options.limits, governor.now()
    if request.HasField("hello"):
        return governor.handle(codec.decode_hello(request.hello, stream.id, PEER, CALLER, now, limits))
    return governor.handle(codec.decode_request(request, stream.id, now, limits))


def sent(stream: StreamHandle) -> list[tpb.AttachResponse]:
    """What the runtime has released to ``stream`` so far (taken off its queue)."""
    out = []
    while not stream.out.empty():
        message = stream.out.get_nowait()
        assert message is not None, "the stream was closed"
        out.append(message)
    return out


def attached(daemon: Daemon, *requests: tpb.AttachRequest) -> StreamHandle:
    """A stream that sent hello() and then ``requests``."""
    stream = daemon.governor.open_stream(PEER)
    for request in (hello(), *requests):
        feed(daemon.governor, stream, request)
    return stream


def test_a_message_waits_until_the_entries_before_it_are_durable(tmp_path: Path) -> None:
    """The Welcome and an Ack wait for the group commit; handle() returns with both still held, and nothing of
    theirs on disk. They leave once the journal says the entries are durable, and the files then hold them."""

    async def scenario(daemon: Daemon) -> None:
        governor = daemon.governor
        stream = governor.open_stream(PEER)
        after = feed(governor, stream, hello())
        assert (sent(stream), daemon.on_disk("run-1")) == ([], [])
        assert governor.committer.durable_seq < after
        await governor.settled()
        assert kinds(sent(stream)) == ["welcome"]
        assert [e.kind for e in daemon.on_disk("run-1")] == ["run_created", "attach"]
        after = feed(governor, stream, vitals(1, [1, 2], [2.0, 1.9]))
        assert sent(stream) == []
        assert daemon.on_disk("run-1")[-1].kind == "attach"
        await governor.settled()
        assert [m.ack.up_to_seq for m in sent(stream)] == [2]
        assert daemon.on_disk("run-1")[-1].seq == after

    on_daemon(tmp_path / "data", scenario)


def test_a_verdict_is_committed_at_once_and_leaves_after_its_decision(tmp_path: Path) -> None:
    """A decision is a sync entry: handle() itself writes it, so the Verdict (and the Command after it) are out
    when handle() returns, and the decision is already in the files."""

    async def scenario(daemon: Daemon) -> None:
        governor = daemon.governor
        stream = attached(daemon)
        await governor.settled()
        sent(stream)
        after = feed(governor, stream, validation(1, 10, math.nan))
        assert kinds(sent(stream)) == ["verdict", "command", "ack"]
        assert governor.committer.durable_seq == after
        assert [e.kind for e in daemon.on_disk("run-1")][-2:] == ["decision", "command"]

    on_daemon(tmp_path / "data", scenario)


def test_a_controller_call_returns_once_its_entries_are_durable(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        governor = daemon.governor
        stream = attached(daemon)
        reply = await governor.call(ev.Halt("run-1", "operator", CALLER, governor.now()))
        request = next(e for e in daemon.on_disk("run-1") if e.kind == "controller_request")
        assert request.payload["command"]["command_id"] == reply.command.command_id
        assert governor.committer.durable_seq == governor.committer.last_seq
        assert kinds(sent(stream)) == ["welcome", "command"]

    on_daemon(tmp_path / "data", scenario)


def test_refused_events_change_nothing(tmp_path: Path) -> None:
    """The core refuses (a Resume of a healthy run, a record of a timeline ahead of the run, a new run over the
    active-run limit): handle() raises, and the journal, the runs, the bindings and the streams are as before."""

    async def scenario(daemon: Daemon) -> None:
        governor = daemon.governor
        stream = attached(daemon, vitals(1, [1, 2], [2.0, 1.9]))
        await governor.settled()
        sent(stream)
        before = daemon.state(), daemon.on_disk()
        with pytest.raises(PolicyStateError):
            await governor.call(ev.Resume("run-1", "why", CALLER, governor.now()))
        with pytest.raises(InvalidInputError, match=r"^validation_record\.timeline"):
            feed(governor, stream, validation(3, 10, 1.0, timeline=5))
        other = governor.open_stream(PEER)
        with pytest.raises(LimitExceededError):
            feed(governor, other, hello("run-2"))
        await governor.settled()
        assert (daemon.state(), daemon.on_disk()) == before
        assert (sent(stream), sent(other)) == ([], [])

    on_daemon(tmp_path / "data", scenario, limits=Limits(max_active_runs=1))


def test_a_closed_streams_late_messages_are_moot(tmp_path: Path) -> None:
    """A record read after its stream ended changes nothing; nor does a Hello read after its stream ended (the
    servicer stops waiting for a reader parked in grpc, which may still hand over what it reads): the core
    would bind the rank to a stream that is gone, and the trainer's next process would find it taken."""

    async def scenario(daemon: Daemon) -> None:
        governor = daemon.governor
        stream = attached(daemon)
        governor.close_stream(stream)
        unread = governor.open_stream(PEER)
        governor.close_stream(unread)
        await governor.settled()
        before = daemon.state()
        assert feed(governor, stream, validation(1, 10, math.nan)) == before[0]
        assert feed(governor, unread, hello("run-2")) == before[0]
        assert daemon.state() == before

    on_daemon(tmp_path / "data", scenario)


async def _history(daemon: Daemon) -> StreamHandle:
    """A run through most of what the journal records: records, a PANIC and its ROLLBACK with its result, a
    policy change, a HALT; then its stream ends. Returns the (closed) stream."""
    governor = daemon.governor
    losses = [2.3, 1.9, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.65, 0.6, 0.58, 0.55]
    stream = attached(daemon, vitals(1, [1, 2, 3], [2.4, 2.35, 2.3]))
    seq = 3
    for i, loss in enumerate(losses):
        seq += 1
        feed(governor, stream, validation(seq, 10 * (i + 1), loss, epoch=i))
    seq += 1
    feed(governor, stream, validation(seq, 200, math.nan))
    await governor.settled()
    command = next(m.command for m in sent(stream) if m.HasField("command"))
    seq += 1
    result = tpb.CommandResult(
        seq=seq,
        command_id=command.command_id,
        outcome=common_pb2.COMMAND_OUTCOME_SUCCEEDED,
        new_timeline=1,
        restored_step=120,
        duration_ms=12.0,
    )
    feed(governor, stream, tpb.AttachRequest(command_result=result))
    await governor.call(ev.UpdatePolicy("run-1", {"sensitivity": 4.0}, CALLER, governor.now()))
    await governor.call(ev.Halt("run-1", "operator", CALLER, governor.now()))
    governor.close_stream(stream)
    await governor.settled()
    return stream


@pytest.mark.parametrize("segment_bytes", [64 * 1024 * 1024, 4096], ids=["one-segment", "checkpointed-segments"])
def test_a_restart_rebuilds_the_same_state(tmp_path: Path, segment_bytes: int) -> None:
    """The journaled state after a restart is the state before it (from the entries alone, or from a segment's
    checkpoint and the entries after it); the trainer's incarnation is welcomed with what was acknowledged."""

    async def scenario() -> None:
        async with started(tmp_path / "data", segment_bytes=segment_bytes) as daemon:
            await _history(daemon)
            before = daemon.governor.core.checkpoint()
            assert str(daemon.governor.run("run-1").policy.state) == "halted"
        async with started(tmp_path / "data", segment_bytes=segment_bytes) as daemon:
            assert daemon.governor.core.checkpoint() == before
            stream = attached(daemon)
            await daemon.governor.settled()
            welcome = sent(stream)[0].welcome
            assert (welcome.last_durable_seq, welcome.generation, welcome.timeline) == (17, 2, 1)
            assert welcome.run_state == common_pb2.RUN_STATE_HALTED

    asyncio.run(scenario())
    if segment_bytes == 4096:
        assert len(list((tmp_path / "data").glob("journal-*.jsonl"))) > 1, "the journal never rotated"


def test_a_finished_run_stays_finished_after_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path / "data") as daemon:
            stream = attached(daemon, finish(1))
            daemon.governor.close_stream(stream)
            await daemon.governor.settled()
        async with started(tmp_path / "data") as daemon:
            assert str(daemon.governor.run("run-1").policy.state) == "finished"
            with pytest.raises(ConflictError, match="has finished; start a new run id"):
                attached(daemon)

    asyncio.run(scenario())
