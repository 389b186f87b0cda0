"""The vitals ingest worker (service/ingest.py): per-stream order, refusals from the worker, back-pressure."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from governor_daemon.core import Limits
from governor_daemon.core import events as ev
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.service import codec
from governor_daemon.service.ingest import VitalsIngest
from governor_daemon.service.runtime import Governor, GovernorOptions
from governor_daemon.service.streams import StreamHandle
from governor_daemon.service.trainer_servicer import TrainerServicer
from governor_daemon.testing import AttachClient, InProcessDaemon
from tolaria.governor.v1 import common_pb2, control_service_pb2, control_service_pb2_grpc, trainer_service_pb2

Connect = Callable[..., AttachClient]


def journal(data_dir: Path, run: str) -> list[tuple[str, dict[str, object]]]:
    return [
        (item.entry.kind, item.entry.payload)
        for path in list_segments(data_dir)
        for item in read_segment(path)
        if isinstance(item, LocatedEntry) and item.entry.run == run
    ]


async def read_stream(
    data_dir: Path, requests: AsyncIterator[trainer_service_pb2.AttachRequest]
) -> tuple[list[trainer_service_pb2.AttachResponse], StreamHandle]:
    """Feed ``requests`` to the Attach reader of a real runtime with the ingest worker running; returns what
    the stream was sent once the trainer's side ended (the reader answers everything before it closes)."""
    governor = Governor(GovernorOptions(data_dir))
    await governor.start()
    ingest = VitalsIngest(governor)
    ingest.start()
    stream = governor.open_stream("test")
    await TrainerServicer(governor, ingest).read(requests, stream)
    await ingest.stop()
    await governor.close()
    sent = []
    while (message := stream.out.get_nowait()) is not None:
        sent.append(message)
    return sent, stream


def test_vitals_are_judged_before_the_next_message_of_their_stream(tmp_path: Path) -> None:
    """40 batches then a validation record, read without a pause (so batches are still queued when the record
    is read): the record's decision is journaled after every batch's entry, and the NaN in the last batch is
    what rolls the run back."""

    async def requests() -> AsyncIterator[trainer_service_pb2.AttachRequest]:
        yield trainer_service_pb2.AttachRequest(hello=hello("r"))
        for i in range(40):
            losses = [0.5] * 32
            if i == 39:
                losses[-1] = math.nan
            batch = trainer_service_pb2.VitalsBatch(first_seq=32 * i + 1, step=range(32 * i, 32 * i + 32), loss=losses)
            yield trainer_service_pb2.AttachRequest(vitals_batch=batch)
        record = trainer_service_pb2.ValidationRecord(seq=40 * 32 + 1, step=40 * 32, epoch=1, loss=0.5)
        yield trainer_service_pb2.AttachRequest(validation_record=record)

    sent, _ = asyncio.run(read_stream(tmp_path / "data", requests()))
    commands = [m.command for m in sent if m.WhichOneof("message") == "command"]
    assert [c.type for c in commands] == [common_pb2.COMMAND_TYPE_ROLLBACK]
    assert "non-finite" in commands[0].reason
    entries = journal(tmp_path / "data", "r")
    vitals = [i for i, (kind, _) in enumerate(entries) if kind == "vitals"]
    decision = next(i for i, (kind, p) in enumerate(entries) if kind == "decision")
    assert sum(entries[i][1]["num_records"] for i in vitals) == 40 * 32, "every record judged (batches may be joined)"
    assert decision > vitals[-1], "the validation record was judged before the batches read ahead of it"


def test_a_batch_refused_by_the_worker_ends_the_stream_and_changes_nothing(connect: Connect) -> None:
    """A timeline ahead of the run passes the structural checks but not the governor: INVALID_ARGUMENT."""
    client = connect()
    last = client.vitals([1, 2], [2.0, 1.9])
    client.wait_ack(last)
    client.vitals([3, 4], [1.8, 1.7], timeline=5)
    with pytest.raises(grpc.RpcError) as info:
        client.next("ack")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vitals_batch.timeline" in (info.value.details() or "")
    again = connect(incarnation_id=client.hello.incarnation_id)
    assert again.welcome is not None
    assert again.welcome.last_durable_seq == last


def hello(run_id: str) -> trainer_service_pb2.Hello:
    return trainer_service_pb2.Hello(
        run_id=run_id, rank=0, world_size=1, incarnation_id=uuid.uuid4().hex, task="t", num_classes=10
    )


def test_a_full_stream_waits_and_nothing_is_lost(tmp_path: Path) -> None:
    """A reader that never yields on its own still never has more than max_pending batches queued; the
    worker hands every batch to the core, in order."""

    async def scenario() -> tuple[int, int, int]:
        governor = Governor(GovernorOptions(tmp_path / "data"))
        await governor.start()
        ingest = VitalsIngest(governor, max_pending=2)
        stream = governor.open_stream("test")
        governor.handle(codec.decode_hello(hello("r"), stream.id, "test", "test", governor.now(), Limits()))
        ingest.start()
        most = 0
        for b in range(50):
            batch = trainer_service_pb2.VitalsBatch(first_seq=4 * b + 1, step=range(4 * b, 4 * b + 4), loss=[1.0] * 4)
            request = trainer_service_pb2.AttachRequest(vitals_batch=batch)
            vitals = codec.decode_request(request, stream.id, governor.now(), Limits())
            assert isinstance(vitals, ev.Vitals)
            await ingest.put(stream, vitals)
            most = max(most, len(stream.pending))
        ingest.drain(stream)
        await ingest.stop()
        rank = governor.core.registry.runs["r"].rank(0)
        await governor.close()
        return most, rank.num_records, rank.last_durable_seq

    most, records, last_seq = asyncio.run(scenario())
    assert most == 2
    assert (records, last_seq) == (200, 200)


def test_principals_and_runs_take_turns(tmp_path: Path) -> None:
    """Hardening 2, defect 1: one FIFO served every stream, so a batch's fate depended on its age alone and
    principal A's 32 flooding runs pushed principal B's batch past --shed-after-ms. The worker serves
    principals in turn, then runs, then streams: B's batch, queued after A's 256, is the second hand-over
    (each of A's streams hands over its 8 batches joined), not the 33rd."""

    async def scenario() -> list[str]:
        governor = Governor(GovernorOptions(tmp_path / "data"))
        await governor.start()
        ingest = VitalsIngest(governor)
        ingest.start()
        streams = []
        for principal, run_id in [("a", f"a.{i}") for i in range(32)] + [("b", "b.0")]:
            stream = governor.open_stream("test")
            governor.handle(codec.decode_hello(hello(run_id), stream.id, "test", principal, governor.now(), Limits()))
            stream.bind(principal, run_id)
            streams.append(stream)
        for stream in streams:
            for b in range(1 if stream.principal == "b" else 8):
                batch = trainer_service_pb2.VitalsBatch(
                    first_seq=4 * b + 1, step=range(4 * b, 4 * b + 4), loss=[1.0] * 4
                )
                vitals = codec.decode_request(
                    trainer_service_pb2.AttachRequest(vitals_batch=batch), stream.id, governor.now(), Limits()
                )
                assert isinstance(vitals, ev.Vitals)
                await ingest.put(stream, vitals)  # never waits: no stream is full
        while any(stream.pending for stream in streams):
            await asyncio.sleep(0.01)
        await governor.settled()
        await ingest.stop()
        await governor.close()
        return [
            item.entry.run
            for path in list_segments(tmp_path / "data")
            for item in read_segment(path)
            if isinstance(item, LocatedEntry) and item.entry.kind == "vitals"
        ]

    order = asyncio.run(scenario())
    assert order == ["a.0", "b.0"] + [f"a.{i}" for i in range(1, 32)], order


class SetClock:
    """A monotonic clock the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_a_stream_is_shed_at_most_once_per_shed_every_s(tmp_path: Path) -> None:
    """Hardening 2, defect 1: every shed hand-over was a journal entry, so a flood grew the journal by about
    0.5 MB/s. A stream's overdue batches are shed together, at most once every shed_every_s; in between,
    overdue batches are judged (so shedding never starves a stream while the worker has time)."""

    async def scenario() -> list[tuple[int, int]]:
        clock = SetClock(10.0)
        governor = Governor(GovernorOptions(tmp_path / "data"), clock)
        await governor.start()
        ingest = VitalsIngest(governor, shed_after_s=0.5, shed_every_s=1.0)
        stream = governor.open_stream("test")
        governor.handle(codec.decode_hello(hello("r"), stream.id, "test", "test", clock.now, Limits()))
        ingest.start()

        async def put(b: int, read_at: float) -> None:
            batch = trainer_service_pb2.VitalsBatch(first_seq=4 * b + 1, step=range(4 * b, 4 * b + 4), loss=[1.0] * 4)
            request = trainer_service_pb2.AttachRequest(vitals_batch=batch)
            vitals = codec.decode_request(request, stream.id, read_at, Limits())
            assert isinstance(vitals, ev.Vitals)
            await ingest.put(stream, vitals)

        async def handed_over() -> None:
            while stream.pending:
                await asyncio.sleep(0.005)

        for when, batches in (
            (10.0, [(0, 8.0), (1, 8.0)]),
            (10.2, [(2, 9.0), (3, 9.0)]),
            (11.0, [(4, 9.0), (5, 10.9)]),
        ):
            clock.now = when
            for b, read_at in batches:
                await put(b, read_at)
            await handed_over()
        await governor.settled()
        await ingest.stop()
        await governor.close()
        entries = journal(tmp_path / "data", "r")
        return [(p["num_records"], p.get("num_shed", 0)) for kind, p in entries if kind == "vitals"]

    # shed at 10.0; at 10.2 overdue but shed 0.2 s ago: judged; at 11.0 shed again (only the overdue one)
    assert asyncio.run(scenario()) == [(0, 8), (8, 0), (0, 4), (4, 0)]


def flood_beside_a_validation(address: str, num_batches: int) -> AttachClient:
    """Run "busy" sends ``num_batches`` batches of 256 records while run "quiet" sends a validation record:
    the verdict arrives and every batch is acknowledged. Returns busy's (closed) client, with what it got."""
    busy = AttachClient(address, "busy")
    quiet = AttachClient(address, "quiet")
    try:
        busy.connect()
        quiet.connect()
        for i in range(num_batches):
            busy.vitals(range(256 * i, 256 * i + 256), [1.0] * 256)
        quiet.validation(1, 2.0, epoch=1)
        assert quiet.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_HEALTHY
        busy.wait_ack(busy.seq, timeout_s=30)
    finally:
        busy.close()
        quiet.close()
    return busy


def test_streams_progress_independently(daemon: InProcessDaemon) -> None:
    """One stream sends 200 batches of 256 records, another a validation record: the verdict arrives and
    every batch is acknowledged."""
    flood_beside_a_validation(daemon.address, 200)


def test_a_command_leaves_before_the_verdict_of_a_later_message(tmp_path: Path) -> None:
    """A NaN batch's HALT waits for its commit; the stream's next message (a validation record) arrives in
    that gap. Messages are released in production order once durable: the HALT before the record's verdict,
    and acknowledgements never ahead of their entries."""

    async def requests() -> AsyncIterator[trainer_service_pb2.AttachRequest]:
        start = hello("r")
        start.policy_overrides.max_rollbacks = 0
        yield trainer_service_pb2.AttachRequest(hello=start)
        batch = trainer_service_pb2.VitalsBatch(first_seq=1, step=[1, 2], loss=[0.5, math.nan])
        yield trainer_service_pb2.AttachRequest(vitals_batch=batch)
        await asyncio.sleep(0)  # the worker takes the batch; its HALT waits for the commit
        record = trainer_service_pb2.ValidationRecord(seq=3, step=2, epoch=1, loss=0.5)
        yield trainer_service_pb2.AttachRequest(validation_record=record)

    sent, _ = asyncio.run(read_stream(tmp_path / "data", requests()))
    kinds = [m.WhichOneof("message") for m in sent]
    acks = [m.ack.up_to_seq for m in sent if m.WhichOneof("message") == "ack"]
    assert kinds.index("command") < kinds.index("verdict")
    assert acks == sorted(acks)
    assert acks[-1] == 3


def test_overdue_batches_are_shed_and_the_next_ones_judged(tmp_path: Path) -> None:
    """Batches that waited in the queue longer than shed_after_s skip the statistical detectors, joined into
    one journaled count, but a NaN among them is still a ROLLBACK (hardening 2: it was acknowledged
    unjudged); a fresh batch behind them is judged, and the stream's validation record gets its verdict."""

    async def scenario() -> tuple[list[trainer_service_pb2.AttachResponse], list[tuple[str, dict[str, object]]]]:
        governor = Governor(GovernorOptions(tmp_path / "data"))
        await governor.start()
        ingest = VitalsIngest(governor, shed_after_s=0.5)
        stream = governor.open_stream("test")
        governor.handle(codec.decode_hello(hello("r"), stream.id, "test", "test", governor.now(), Limits()))
        ingest.start()
        for b in range(4):
            losses = [math.nan if b == 1 else 1.0] * 4
            batch = trainer_service_pb2.VitalsBatch(first_seq=4 * b + 1, step=range(4 * b, 4 * b + 4), loss=losses)
            read_at = governor.now() - (1.0 if b < 3 else 0.0)  # the first three waited a second
            vitals = codec.decode_request(
                trainer_service_pb2.AttachRequest(vitals_batch=batch), stream.id, read_at, Limits()
            )
            assert isinstance(vitals, ev.Vitals)
            stream.pending.append(vitals)
        ingest.drain(stream)
        record = trainer_service_pb2.ValidationRecord(seq=17, step=16, epoch=1, loss=0.9)
        governor.handle(
            codec.decode_request(
                trainer_service_pb2.AttachRequest(validation_record=record), stream.id, governor.now(), Limits()
            )
        )
        await governor.settled()
        await ingest.stop()
        await governor.close()
        sent = []
        while not stream.out.empty() and (message := stream.out.get_nowait()) is not None:
            sent.append(message)
        return sent, journal(tmp_path / "data", "r")

    sent, entries = asyncio.run(scenario())
    acks = [(m.ack.up_to_seq, m.ack.num_shed) for m in sent if m.WhichOneof("message") == "ack"]
    assert acks[-1] == (17, 0)
    assert sum(shed for _, shed in acks) == 12
    [command] = [m.command for m in sent if m.WhichOneof("message") == "command"]
    assert command.type == common_pb2.COMMAND_TYPE_ROLLBACK
    assert "step 4" in command.reason
    assert "shed" in command.reason
    assert [m.verdict.seq for m in sent if m.WhichOneof("message") == "verdict"] == [17]
    vitals = [(p["num_records"], p.get("num_shed", 0)) for kind, p in entries if kind == "vitals"]
    assert vitals == [(0, 12), (4, 0)]


def test_a_daemon_behind_sheds_counts_and_tells_the_trainer(tmp_path: Path) -> None:
    """Through gRPC, a daemon whose worker may use 5 % of the loop and sheds after 1 ms: a flood of batches
    is partly shed. Every record is either judged or shed; the Acks' num_shed, GetPanicState and the metric
    agree on how many; the quiet stream's verdict arrives. The flood doubles until some of it is shed (a fast
    machine judged a whole flood of 50 batches in time, in the monitoring test)."""
    with InProcessDaemon(tmp_path / "data", vitals_share=0.05, shed_after_ms=1.0) as daemon:
        busy = AttachClient(daemon.address, "busy")
        quiet = AttachClient(daemon.address, "quiet")
        sent = shed = 0
        flood = 100
        try:
            busy.connect()
            quiet.connect()
            while shed == 0:
                assert flood <= 100 * 2**6, f"floods of up to {flood // 2} batches were all judged in time"
                for _ in range(flood):
                    busy.vitals(range(sent, sent + 256), [1.0] * 256)
                    sent += 256
                busy.wait_ack(busy.seq, timeout_s=60)
                shed = sum(m.ack.num_shed for m in busy.received if m.WhichOneof("message") == "ack")
                flood *= 2
            quiet.validation(1, 2.0, epoch=1)
            assert quiet.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_HEALTHY
        finally:
            busy.close()
            quiet.close()
        with grpc.insecure_channel(daemon.address) as channel:
            stub = control_service_pb2_grpc.ControlServiceStub(channel)
            rank = stub.GetPanicState(control_service_pb2.GetPanicStateRequest(run_id="busy")).run.ranks[0]
        metric = daemon.call(_shed_metric(daemon))
    assert 0 < shed < sent
    assert rank.num_shed_records == shed == metric
    assert rank.num_records + rank.num_shed_records == sent


async def _shed_metric(daemon: InProcessDaemon) -> float | None:
    assert daemon.daemon is not None
    return daemon.daemon.metrics.registry.get_sample_value("governor_records_shed_total")
