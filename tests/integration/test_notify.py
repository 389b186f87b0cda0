"""--notify-url against a real HTTP server: ROLLBACK, HALT and STALLED posted; retries when the receiver is
down; a bounded queue when it hangs, while the daemon keeps answering."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import grpc
import structlog

from governor_daemon.notify import Notifier
from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.integration.conftest import warm_up
from tests.integration.receiver import Receiver
from tolaria.governor.v1 import common_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc


def _notifier(daemon: InProcessDaemon) -> Notifier:
    assert daemon.daemon is not None
    assert daemon.daemon.notifier is not None
    return daemon.daemon.notifier


def _metric(daemon: InProcessDaemon, outcome: str) -> float | None:
    assert daemon.daemon is not None
    return daemon.daemon.metrics.value("governor_notifications_total", outcome=outcome)


def test_rollbacks_and_the_halt_are_posted_with_slack_text(tmp_path: Path) -> None:
    """Three ROLLBACKs then the loop breaker's HALT: four JSON events, in order, each naming run, seq, reason,
    with a Slack-compatible text; the receiver gets them at the path given (the secret part of the URL)."""
    with Receiver() as receiver, InProcessDaemon(tmp_path / "data", notify_url=receiver.url()) as daemon:
        client = AttachClient(daemon.address, "run-n")
        client.connect()
        try:
            step = warm_up(client)
            for i in range(4):
                client.validation(step + 10 * (i + 1), math.nan)
                client.wait_ack(client.result(client.next("command").command))
        finally:
            client.close()
        assert receiver.wait_for(lambda events: len(events) >= 4), receiver.events
        events = receiver.events
        assert [e["event"] for e in events] == ["rollback"] * 3 + ["halt"]
        assert {e["run"] for e in events} == {"run-n"}
        assert receiver.paths == ["/hooks/T000/B000/s3cr3t-token"] * 4
        first = events[0]
        assert first["text"].startswith("Tolaria Governor on ")
        assert "ROLLBACK of run run-n (command 1, rule non_finite," in first["text"], first["text"]
        assert first["reason"] == "non-finite: validation loss nan"
        assert first["details"]["command"] == "ROLLBACK"
        assert first["details"]["cause"] == "decision"
        assert "HALT of run run-n" in events[3]["text"]
        assert "governor resume run-n" in events[3]["text"]
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs)
        assert all(isinstance(s, int) and s > 0 for s in seqs)
        assert _notifier(daemon).wait_for(lambda c: c["sent"] == 4)
        assert _metric(daemon, "sent") == 4.0
        assert _metric(daemon, "dropped") == 0.0


def test_journal_entries_the_events_name_exist(tmp_path: Path) -> None:
    """Each event's seq is the journal's command entry (the log and the notifications say nothing the journal
    does not): WatchEvents from 0 holds a command entry at that seq."""
    with Receiver() as receiver, InProcessDaemon(tmp_path / "data", notify_url=receiver.url()) as daemon:
        client = AttachClient(daemon.address, "run-j")
        client.connect()
        try:
            client.vitals([1, 2, 3], [2.0, math.nan, 1.8])
            client.next("command")
        finally:
            client.close()
        assert receiver.wait_for(lambda events: len(events) >= 1)
        event = receiver.events[0]
        with grpc.insecure_channel(daemon.address) as channel:
            stub = cgrpc.ControlServiceStub(channel)
            stream = stub.WatchEvents(cpb.WatchEventsRequest(run_ids=["run-j"], kinds=["command"]), timeout=10)
            first = next(iter(stream))
            stream.cancel()
        assert (first.cursor, first.run_id, first.kind) == (event["seq"], "run-j", "command")
        assert event["details"]["rule"] == "train_non_finite"


def test_a_missing_rank_is_posted_as_stalled_once(tmp_path: Path) -> None:
    """One of two ranks silent past rank_deadline_s: one "stalled" event naming rank 1, not one per step."""
    with Receiver() as receiver, InProcessDaemon(tmp_path / "data", notify_url=receiver.url()) as daemon:
        overrides = {"rank_deadline_s": 0.2}
        r0 = AttachClient(daemon.address, "run-s", rank=0, world_size=2, overrides=overrides)
        r1 = AttachClient(daemon.address, "run-s", rank=1, world_size=2, overrides=overrides)
        r0.connect()
        r1.connect()
        try:
            for step in (10, 20, 30):
                r0.validation(step, 2.0)
                assert r0.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_HEALTHY
            r0.validation(40, math.nan)  # an event after the three deadlines, to have something to wait for
            r0.next("command")
        finally:
            r0.close()
            r1.close()
        assert receiver.wait_for(lambda events: any(e["event"] == "rollback" for e in events))
        stalled = [e for e in receiver.events if e["event"] == "stalled"]
        assert len(stalled) == 1, receiver.events
        assert stalled[0]["details"]["missing_ranks"] == [1]
        assert "ranks [1] of run run-s STALLED" in stalled[0]["text"]


def test_a_rank_stalled_before_a_restart_is_not_posted_again(tmp_path: Path) -> None:
    """Rank 1 silent, posted STALLED once; the daemon restarts (recovering from its journal) and rank 1 is still
    silent: its missed deadlines after the restart post nothing new (the restored run says it is STALLED)."""
    overrides = {"rank_deadline_s": 0.2}
    with Receiver() as receiver:
        with InProcessDaemon(tmp_path / "data", notify_url=receiver.url()) as daemon:
            r0 = AttachClient(daemon.address, "run-s", rank=0, world_size=2, overrides=overrides)
            r1 = AttachClient(daemon.address, "run-s", rank=1, world_size=2, overrides=overrides)
            r0.connect()
            r1.connect()
            try:
                for step in (10, 20):
                    r0.validation(step, 2.0)
                    assert r0.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_HEALTHY
            finally:
                r0.close()
                r1.close()
            assert receiver.wait_for(lambda events: any(e["event"] == "stalled" for e in events))
        with InProcessDaemon(tmp_path / "data", notify_url=receiver.url()) as daemon:
            r0 = AttachClient(daemon.address, "run-s", rank=0, world_size=2, overrides=overrides)
            r0.connect()
            try:
                for step in (30, 40):
                    r0.validation(step, 2.0)
                    assert r0.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_HEALTHY
                r0.validation(50, math.nan)  # an event after the deadlines, to have something to wait for
                r0.next("command")
            finally:
                r0.close()
            assert receiver.wait_for(lambda events: any(e["event"] == "rollback" for e in events))
        stalled = [e for e in receiver.events if e["event"] == "stalled"]
        assert len(stalled) == 1, receiver.events


def test_receiver_down_then_up_gets_the_event(tmp_path: Path) -> None:
    """The receiver refuses connections (nothing listens), then comes up on the same port: the retry delivers
    the event, once."""
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused, the port is ours
    port = placeholder.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    with InProcessDaemon(tmp_path / "data", notify_url=url) as daemon:
        notifier = _notifier(daemon)
        client = AttachClient(daemon.address, "run-d")
        client.connect()
        try:
            client.vitals([1], [math.inf])
            client.next("command")
            assert notifier.wait_for(lambda c: c["retried"] >= 1), notifier.counts
            placeholder.close()
            with Receiver(port=port) as receiver:
                assert receiver.wait_for(lambda events: len(events) >= 1)
                assert notifier.wait_for(lambda c: c["sent"] == 1), notifier.counts
                assert [e["event"] for e in receiver.events] == ["rollback"]
        finally:
            client.close()
            placeholder.close()
        assert _metric(daemon, "retried") == notifier.counts["retried"] >= 1
        assert _metric(daemon, "failed") == 0.0


def test_a_hanging_receiver_bounds_the_queue_and_verdicts_still_flow(tmp_path: Path) -> None:
    """The receiver holds the first POST open: the queue keeps one event, drops the oldest beyond (counted in
    governor_notifications_total{outcome="dropped"}), and every verdict and command still arrives at once."""
    with (
        Receiver(hang=True) as receiver,
        InProcessDaemon(
            tmp_path / "data", notify_url=receiver.url(), notify_max_queued=1, notify_timeout_s=60
        ) as daemon,
    ):
        clients = [AttachClient(daemon.address, f"run-{i}") for i in range(4)]
        try:
            for i, client in enumerate(clients):
                client.connect()
                client.validation(10, math.nan)
                assert client.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_PANIC
                assert client.next("command").command.type == common_pb2.COMMAND_TYPE_ROLLBACK
                if i == 0:  # the worker holds run-0's event in its POST from now on
                    assert receiver.entered.wait(10)
            for client in clients:  # the daemon answers while the POST hangs
                client.validation(20, 1.0)
                client.next("verdict")
            notifier = _notifier(daemon)
            assert notifier.wait_for(lambda c: c["dropped"] == 2), notifier.counts  # run-1's, then run-2's
            assert _metric(daemon, "dropped") == 2.0
            receiver.release.set()
            assert receiver.wait_for(lambda events: len(events) == 2)
            assert [e["run"] for e in receiver.events] == ["run-0", "run-3"], "the oldest queued event is dropped"
            assert notifier.wait_for(lambda c: c["sent"] == 2)
        finally:
            for client in clients:
                client.close()


def test_a_final_http_error_is_not_retried(tmp_path: Path) -> None:
    """A 404 (a deleted webhook) is final: one attempt, counted as failed, no retry storm."""
    with (
        Receiver(status=404) as receiver,
        InProcessDaemon(tmp_path / "data", notify_url=receiver.url()) as daemon,
    ):
        client = AttachClient(daemon.address, "run-f")
        client.connect()
        try:
            client.vitals([1], [math.nan])
            client.next("command")
        finally:
            client.close()
        notifier = _notifier(daemon)
        assert notifier.wait_for(lambda c: c["failed"] == 1), notifier.counts
        assert (len(receiver.events), notifier.counts["retried"]) == (1, 0)
        assert _metric(daemon, "failed") == 1.0


def test_a_user_and_password_in_the_url_are_sent_as_basic_auth() -> None:
    """https://user:password@host/path (a receiver behind basic auth): the event arrives with an Authorization
    header, instead of every attempt resolving the host name "user:password@host" (the password went to the
    DNS resolver) and failing; the logs never show the password."""
    import base64

    with Receiver() as receiver, structlog.testing.capture_logs() as captured:
        notifier = Notifier(f"http://ops%40team:pa%3Ass@127.0.0.1:{receiver.port}/hook", max_attempts=2)
        notifier.submit({"event": "halt", "run": "run-a"})
        assert notifier.wait_for(lambda c: c["sent"] + c["failed"] >= 1), notifier.counts
        notifier.close()
    assert notifier.counts["sent"] == 1, captured
    assert receiver.paths == ["/hook"]
    assert receiver.authorizations == ["Basic " + base64.b64encode(b"ops@team:pa:ss").decode()]
    assert notifier.shown_url == f"http://127.0.0.1:{receiver.port}/…"
    assert all("pa" not in str(c.get("notify_url")) for c in captured)


def test_drops_are_logged_and_close_gives_up_within_its_drain_time() -> None:
    """A receiver that refuses: a full queue logs 'notifications dropped' (URL redacted), and close() returns
    after its drain time with every event accounted for as failed or dropped."""
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{placeholder.getsockname()[1]}/hooks/s3cr3t"
    try:
        with structlog.testing.capture_logs() as captured:
            notifier = Notifier(url, max_queued=1, timeout_s=1.0)
            for i in range(3):
                notifier.submit({"event": "rollback", "run": f"run-{i}"})
            assert notifier.wait_for(lambda c: c["retried"] >= 1)
            started = time.monotonic()
            notifier.close(drain_s=0.3)
            assert time.monotonic() - started < 0.3 + 1.0 + 1.0 + 0.5, "drain + one attempt's timeout + join slack"
    finally:
        placeholder.close()
    counts = notifier.counts
    assert (counts["sent"], counts["failed"] + counts["dropped"]) == (0, 3), counts
    dropped = [c for c in captured if c["event"] == "notifications dropped"]
    assert dropped, captured
    assert dropped[0]["notify_url"] == notifier.shown_url == f"http://127.0.0.1:{url.split(':')[2].split('/')[0]}/…"
    assert all("s3cr3t" not in str(c) for c in captured)


def test_a_flood_of_stalled_events_never_pushes_a_halt_out_of_a_full_queue() -> None:
    """A full queue drops the oldest event of the lowest priority: a rank that stalls again and again fills it,
    but a queued HALT and the ROLLBACK after the flood are delivered (the oldest-first queue dropped the HALT)."""

    def event(name: str, run: str) -> dict[str, object]:
        return {"event": name, "run": run, "text": f"{name} {run}"}

    with Receiver(hang=True) as receiver:
        notifier = Notifier(receiver.url(), max_queued=2, timeout_s=60)
        try:
            notifier.submit(event("halt", "first"))
            assert receiver.entered.wait(10)  # the worker holds the first HALT in its POST from now on
            notifier.submit(event("halt", "second"))
            for i in range(3):
                notifier.submit(event("stalled", f"s{i}"))
            notifier.submit(event("rollback", "after"))
            assert notifier.counts["dropped"] == 3
            receiver.release.set()
            assert receiver.wait_for(lambda events: len(events) == 3)
            assert [e["run"] for e in receiver.events] == ["first", "second", "after"]
        finally:
            notifier.close(drain_s=5)
