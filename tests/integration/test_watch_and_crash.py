"""WatchEvents resumption, crash recovery from the journal, and daemon/replay equivalence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.conftest import governor_cli
from tolaria.governor.v1 import common_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

# A trace with warm-up, a divergence pair, a NaN, a lobotomy and healthy stretches, for one run.
TRACE = [
    2.3,
    1.9,
    1.5,
    1.2,
    1.0,
    0.9,
    0.8,
    0.7,
    0.65,
    0.6,
    0.58,
    40.0,
    45.0,
    0.57,
    0.56,
    math.nan,
    0.55,
    0.54,
    math.log(10),
    0.53,
    0.52,
    0.51,
]


def drive(client: AttachClient, losses: list[float], start: int = 0, train_every: int = 0) -> None:
    """Send a validation trace as a trainer would, executing every command; waits for every ack."""
    for i, loss in enumerate(losses, start=start):
        step = (i + 1) * 10
        if train_every:
            client.vitals(list(range(step - train_every + 1, step + 1)), [1.0] * train_every)
        client.validation(step, loss, epoch=i + 1)
        verdict = client.next("verdict").verdict
        if verdict.kind == common_pb2.VERDICT_KIND_PANIC and "not committed" not in verdict.reason:
            command = client.next("command").command
            client.result(command)
    client.wait_ack(client.seq)


def comparable(status: cpb.RunStatus) -> cpb.RunStatus:
    """A RunStatus without stream and clock fields (attachments, generations, ages, cursors)."""
    copy = cpb.RunStatus()
    copy.CopyFrom(status)
    copy.ClearField("last_cursor")
    if copy.HasField("open_command"):
        copy.open_command.age_s = 0
    for rank in copy.ranks:
        rank.attached = False
        rank.generation = 0
        rank.seconds_since_progress_s = 0
        rank.incarnation_id = ""
    return copy


def test_watch_events_resume_from_cursor(tmp_path: Path) -> None:
    """Resuming WatchEvents from cursor C yields exactly the entries after C: nothing missed or repeated."""
    with InProcessDaemon(tmp_path / "data") as daemon:
        client = AttachClient(daemon.address, "run-w")
        client.connect()
        drive(client, TRACE[:13])
        channel = grpc.insecure_channel(daemon.address)
        control = cgrpc.ControlServiceStub(channel)
        first_call = control.WatchEvents(cpb.WatchEventsRequest(cursor=0))
        seen = []
        for event in first_call:
            seen.append(event)
            if event.kind == "controller_request" or (
                len(seen) > 5 and event.kind == "decision" and "rollback" in event.payload_json
            ):
                break
        first_call.cancel()
        cursor = seen[-1].cursor
        drive(client, TRACE[13:16], start=13)  # more entries while nobody watches
        resumed = control.WatchEvents(cpb.WatchEventsRequest(cursor=cursor))
        rest = []
        for event in resumed:
            rest.append(event)
            if event.kind == "command_result" and json.loads(event.payload_json)["command_id"] == 2:
                break
        resumed.cancel()
        cursors = [e.cursor for e in seen + rest]
        assert cursors == list(range(1, cursors[-1] + 1)), "every cursor exactly once, in order"
        rollbacks = [
            e for e in rest if e.kind == "decision" and json.loads(e.payload_json)["decision"]["action"] == "rollback"
        ]
        assert rollbacks, "the rollback decision after the cursor was delivered"
        filtered = control.WatchEvents(cpb.WatchEventsRequest(cursor=0, kinds=["command_result"]))
        first = next(iter(filtered))
        filtered.cancel()
        assert first.kind == "command_result"
        channel.close()
        client.close()


def test_crash_recovery_matches_control(tmp_path: Path) -> None:
    """SIGKILL during an unacknowledged burst; restart; resend from Welcome's seq: state equals a control run."""
    acked, burst, rest = TRACE[:13], TRACE[13:15], TRACE[15:]  # the burst itself orders no command
    victim = DaemonProcess(tmp_path / "victim")
    client = AttachClient(victim.address, "crash-run", incarnation_id="inc-1")
    client.connect()
    drive(client, acked, train_every=5)  # everything acknowledged, one rollback executed
    acked_seq = client.seq
    held = []  # what the trainer still holds unacknowledged: (kind, seq, timeline, step, loss)
    for i, loss in enumerate(burst, start=len(acked)):
        step = (i + 1) * 10
        last = client.vitals(list(range(step - 4, step + 1)), [1.0] * 5)
        held.append(("vitals", last - 4, client.timeline, step, 1.0))
        held.append(("validation", client.validation(step, loss, epoch=i + 1), client.timeline, step, loss))
    victim.kill()
    client.close()
    restarted = DaemonProcess(tmp_path / "victim")
    again = AttachClient(restarted.address, "crash-run", incarnation_id="inc-1")
    welcome = again.connect()
    assert welcome.last_durable_seq >= acked_seq, "acknowledged records survived the crash"
    assert welcome.timeline == client.timeline == 1
    for kind, seq, timeline, step, loss in held:  # resend everything after Welcome's seq, as it was
        if kind == "vitals" and seq + 4 > welcome.last_durable_seq:
            again.vitals(list(range(step - 4, step + 1)), [loss] * 5, timeline=timeline, first_seq=seq)
        elif kind == "validation" and seq > welcome.last_durable_seq:
            again.validation(step, loss, epoch=step // 10, timeline=timeline, seq=seq)
            again.next("verdict")
    again.seq = held[-1][1]
    drive(again, rest, start=len(acked) + len(burst), train_every=5)
    crashed = cgrpc.ControlServiceStub(again.channel).GetPanicState(cpb.GetPanicStateRequest(run_id="crash-run")).run

    control_daemon = DaemonProcess(tmp_path / "control")
    reference = AttachClient(control_daemon.address, "crash-run", incarnation_id="inc-1")
    reference.connect()
    drive(reference, TRACE, train_every=5)
    expected = (
        cgrpc.ControlServiceStub(reference.channel).GetPanicState(cpb.GetPanicStateRequest(run_id="crash-run")).run
    )
    assert comparable(crashed) == comparable(expected)
    assert expected.num_rollbacks == 3
    assert expected.ranks[0].num_record_gaps == 0
    again.close()
    reference.close()
    assert restarted.terminate() == 0
    assert control_daemon.terminate() == 0
    verify = governor_cli(["audit", "verify", "--data-dir", str(tmp_path / "victim")])
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_daemon_and_replay_agree(tmp_path: Path) -> None:
    """The same trace through the daemon and through `governor replay` gives identical verdicts, actions, reasons."""
    with InProcessDaemon(tmp_path / "data") as daemon:
        client = AttachClient(daemon.address, "agree")
        client.connect()
        drive(client, TRACE)
        client.close()
    daemon_decisions = []
    for path in list_segments(tmp_path / "data"):
        for item in read_segment(path):
            if isinstance(item, LocatedEntry) and item.entry.kind == "decision":
                d = item.entry.payload["decision"]
                daemon_decisions.append((d["verdict"], d["action"], d["reason"]))
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"epoch": i + 1, "step": (i + 1) * 10, "loss": "nan" if math.isnan(x) else x, "num_classes": 10})
            + "\n"
            for i, x in enumerate(TRACE)
        )
    )
    result = governor_cli(["replay", str(trace), "--json"])
    assert result.returncode == 0, result.stderr
    replayed = [(d["verdict"], d["action"], d["reason"]) for d in map(json.loads, result.stdout.splitlines())]
    assert daemon_decisions == replayed
    assert {a for _, a, _ in replayed} == {"none", "rollback"}


def test_watch_sees_every_entry_checkpoints_included_from_files_and_tail(tmp_path: Path) -> None:
    """Review finding: WatchEvents skipped the checkpoint entries the running daemon wrote (they never
    entered the in-memory tail), so live and catch-up readers disagreed. Every seq from 1 on, in order."""
    with InProcessDaemon(tmp_path / "data", segment_bytes=8192) as daemon:
        client = AttachClient(daemon.address, "ckpt")
        client.connect()
        drive(client, TRACE, train_every=8)
        client.close()
        with grpc.insecure_channel(daemon.address) as channel:
            stub = cgrpc.ControlServiceStub(channel)
            last = stub.GetPanicState(cpb.GetPanicStateRequest(run_id="ckpt")).run.last_cursor
            seen = []
            for event in stub.WatchEvents(cpb.WatchEventsRequest(cursor=0), timeout=20):
                seen.append((event.cursor, event.kind))
                if event.cursor >= last:
                    break
    assert [cursor for cursor, _ in seen] == list(range(1, last + 1))
    checkpoints = [cursor for cursor, kind in seen if kind == "checkpoint"]
    assert len(checkpoints) >= 3, "the journal rotated while the daemon ran"
    with (
        InProcessDaemon(tmp_path / "data", segment_bytes=8192) as daemon,  # now from the files
        grpc.insecure_channel(daemon.address) as channel,
    ):
        stub = cgrpc.ControlServiceStub(channel)
        again = []
        for event in stub.WatchEvents(cpb.WatchEventsRequest(cursor=0), timeout=20):
            again.append((event.cursor, event.kind))
            if event.cursor >= last:
                break
    assert again == seen
