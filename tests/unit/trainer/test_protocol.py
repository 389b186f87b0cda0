"""TrainerProtocol, the sans-IO trainer side of the Attach stream, driven with chosen times and inputs."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria_trainer.client import EndKind, ProtocolOptions, TrainerProtocol, VitalsColumns, timeline_after

HELLO = trainer_service_pb2.Hello(run_id="r", rank=0, world_size=1, incarnation_id="i", task="t")
Response = trainer_service_pb2.AttachResponse


def chunk(first_step: int, n: int, timeline: int = 0, loss: float = 1.0) -> VitalsColumns:
    """``n`` train-step records from ``first_step`` on ``timeline``."""
    steps = list(range(first_step, first_step + n))
    return VitalsColumns(timeline, steps, [loss] * n, [1.0] * n, [0.1] * n)


def attached(
    options: ProtocolOptions | None = None, timeline: int = 0, generation: int = 1, now: float = 0.0
) -> TrainerProtocol:
    """A protocol welcomed at ``now`` on ``timeline``."""
    proto = TrainerProtocol(HELLO, options or ProtocolOptions(), now)
    welcome(proto, generation=generation, timeline=timeline, now=now)
    return proto


def welcome(
    proto: TrainerProtocol, generation: int = 1, timeline: int = 0, last_durable_seq: int = 0, now: float = 0.0
) -> None:
    """A new attempt that the daemon welcomes."""
    assert proto.connecting(now).WhichOneof("message") == "hello"
    w = trainer_service_pb2.Welcome(generation=generation, timeline=timeline, last_durable_seq=last_durable_seq)
    proto.receive(Response(welcome=w), now)


def transmit(proto: TrainerProtocol, now: float = 0.0) -> list[trainer_service_pb2.AttachRequest]:
    """Everything the protocol hands out at ``now``."""
    out = []
    while (message := proto.next_message(now)) is not None:
        out.append(message)
    return out


def kinds(messages: list[trainer_service_pb2.AttachRequest]) -> list[str]:
    return [str(m.WhichOneof("message")) for m in messages]


def command(command_id: int, generation: int = 1, timeline: int = 0, kind: int = common_pb2.COMMAND_TYPE_ROLLBACK):
    """A Command response."""
    return Response(
        command=trainer_service_pb2.Command(command_id=command_id, type=kind, generation=generation, timeline=timeline)
    )


def test_nothing_is_sent_before_the_welcome_and_everything_unacked_is_resent_after_one() -> None:
    """Messages queue while disconnected; a Welcome resends everything after its last durable seq, in order."""
    proto = TrainerProtocol(HELLO, ProtocolOptions(), 0.0)
    proto.send_vitals(chunk(1, 3))  # seqs 1-3
    seq = proto.send_validation(trainer_service_pb2.ValidationRecord(step=3, loss=0.5))
    assert seq == 4
    proto.connecting(0.0)
    assert proto.next_message(0.0) is None, "nothing before the Welcome"
    proto.receive(Response(welcome=trainer_service_pb2.Welcome(generation=1)), 0.0)
    assert kinds(transmit(proto)) == ["vitals_batch", "validation_record"]
    proto.receive(Response(ack=trainer_service_pb2.Ack(up_to_seq=3)), 0.0)
    proto.connection_lost(1.0, "UNAVAILABLE", "daemon killed")
    welcome(proto, generation=2, last_durable_seq=3, now=2.0)
    (again,) = transmit(proto, 2.0)
    assert (again.WhichOneof("message"), again.validation_record.seq) == ("validation_record", 4)


def test_backoff_resets_after_a_welcomed_session_that_died() -> None:
    """D5: a session that got a Welcome and then died with UNAVAILABLE resets the backoff to its start."""
    options = ProtocolOptions(backoff_initial_s=0.2, backoff_max_s=10.0)
    proto = TrainerProtocol(HELLO, options, 0.0)
    for attempt in range(6):  # the daemon is down: the delay grows
        proto.connecting(float(attempt))
        proto.connection_lost(float(attempt), "UNAVAILABLE", "connection refused")
    assert proto.reconnect_delay(0.5) == 10.0
    welcome(proto, now=10.0)
    outcome = proto.connection_lost(11.0, "UNAVAILABLE", "daemon killed")
    assert (outcome.kind, outcome.welcomed) == (EndKind.TRANSIENT, True)
    assert proto.reconnect_delay(0.5) == pytest.approx(0.2), "a welcomed session resets the backoff"
    assert [proto.reconnect_delay(r) for r in (0.0, 0.999)] == pytest.approx([0.1, 0.2998]), "jitter 0.5 + rand"
    proto.connecting(11.2)
    proto.connection_lost(11.2, "UNAVAILABLE", "still down")
    assert proto.reconnect_delay(0.5) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("code", "stream_end", "expected"),
    [
        (None, False, EndKind.CLEAN),
        (None, True, EndKind.STREAM_END),
        ("CANCELLED", True, EndKind.STREAM_END),
        ("UNAVAILABLE", False, EndKind.TRANSIENT),
        ("DEADLINE_EXCEEDED", False, EndKind.TRANSIENT),
        ("INVALID_ARGUMENT", False, EndKind.REFUSED),
        ("PERMISSION_DENIED", False, EndKind.REFUSED),
        ("FAILED_PRECONDITION", False, EndKind.REFUSED),
    ],
)
def test_how_a_stream_ended(code: str | None, stream_end: bool, expected: EndKind) -> None:
    """A clean end, a StreamEnd and retriable codes are retried; other codes are a permanent refusal."""
    proto = attached()
    if stream_end:
        proto.receive(Response(stream_end=trainer_service_pb2.StreamEnd(reason="shutdown")), 0.0)
        assert proto.stream_ending
        assert proto.next_message(100.0) is None, "nothing more on an ending stream"
    outcome = proto.connection_lost(1.0, code, "why")
    assert outcome.kind is expected
    assert (proto.refused is not None) == (expected is EndKind.REFUSED)
    if proto.refused is not None:
        assert proto.refused.code == code
        with pytest.raises(type(proto.refused)):
            proto.connecting(2.0)


def test_already_exists_is_retried_a_few_times_then_refused() -> None:
    """ALREADY_EXISTS (often this process's own previous stream) is retried for 5 consecutive attempts."""
    proto = TrainerProtocol(HELLO, ProtocolOptions(already_exists_retries=5), 0.0)
    outcomes = []
    for t in range(6):
        proto.connecting(float(t))
        outcomes.append(proto.connection_lost(float(t), "ALREADY_EXISTS", "live duplicate").kind)
    assert outcomes == [EndKind.TRANSIENT] * 5 + [EndKind.REFUSED]


def test_heartbeat_carries_the_last_record_sent_not_the_highest_queued() -> None:
    """Heartbeat: -1 before the first record on the stream, then the step and timeline of the last one sent."""
    proto = attached(ProtocolOptions(heartbeat_s=2.0), timeline=1)
    assert proto.next_message(1.9) is None, "not due yet"
    assert proto.send_due_at() == 2.0
    (beat,) = transmit(proto, 2.0)
    assert (beat.heartbeat.latest_step, beat.heartbeat.timeline) == (-1, 1)
    proto.send_vitals(chunk(10, 5, timeline=1))
    transmit(proto, 2.5)
    proto.connection_lost(2.6, "UNAVAILABLE", "")
    proto.send_vitals(chunk(15, 5, timeline=1))  # queued, not sent: the stream is down
    welcome(proto, generation=2, timeline=1, last_durable_seq=5, now=3.0)
    assert proto.next_message(3.0) is not None  # steps 15-19 go out
    (beat,) = transmit(proto, 5.0)
    assert (beat.heartbeat.latest_step, beat.heartbeat.timeline) == (19, 1)


def test_drops_are_reported_in_the_batch_actually_sent_next() -> None:
    """Back-pressure drops the oldest batches; the count rides on the next batch transmitted, even when that
    batch was queued before the drop, and comes back if that batch is dropped too."""
    proto = TrainerProtocol(HELLO, ProtocolOptions(capacity_records=10), 0.0)
    proto.send_vitals(chunk(1, 4))  # seqs 1-4
    proto.send_vitals(chunk(5, 4))  # seqs 5-8
    proto.send_vitals(chunk(9, 4))  # seqs 9-12: 12 > 10 records, 1-4 dropped
    assert proto.num_dropped_records == 4
    welcome(proto)
    first = transmit(proto)
    assert [(m.vitals_batch.first_seq, m.vitals_batch.num_dropped_records) for m in first] == [(5, 4), (9, 0)]
    proto.connection_lost(1.0, "UNAVAILABLE", "")
    proto.send_vitals(chunk(13, 4))  # seqs 13-16: 5-8 (it carried the 4 drops) dropped now
    welcome(proto, generation=2, now=2.0)
    again = transmit(proto, 2.0)
    assert [(m.vitals_batch.first_seq, m.vitals_batch.num_dropped_records) for m in again] == [(9, 0), (13, 8)]
    assert proto.num_dropped_records == 8


def test_validation_records_and_reports_are_never_dropped() -> None:
    """Only train-step records count against the bound."""
    proto = TrainerProtocol(HELLO, ProtocolOptions(capacity_records=2), 0.0)
    for step in range(5):
        proto.send_validation(trainer_service_pb2.ValidationRecord(step=step))
    proto.send_vitals(chunk(1, 3))
    welcome(proto)
    assert kinds(transmit(proto)) == ["validation_record"] * 5
    assert proto.num_dropped_records == 3


def test_commands_of_this_generation_once_each_lowest_first() -> None:
    """Another generation's command is dropped; a re-sent id is handed out once; lowest id first."""
    proto = attached(generation=2)
    for response in (command(7, generation=1), command(5, generation=2), command(4, generation=2)):
        proto.receive(response, 0.0)
    assert [c.command_id for c in proto.take_commands()] == [4, 5]
    proto.receive(command(5, generation=2), 0.0)  # re-sent
    assert proto.take_commands() == []
    proto.connection_lost(1.0, "UNAVAILABLE", "")
    welcome(proto, generation=3)
    proto.receive(command(5, generation=3), 0.0)  # the open command, re-sent on the new stream
    proto.receive(command(6, generation=3), 0.0)
    assert [c.command_id for c in proto.take_commands()] == [6]


def test_command_result_moves_to_the_commands_timeline_plus_one() -> None:
    """new_timeline is the command's timeline + 1 for ROLLBACK and RESUME, the command's for HALT or failure."""
    rollback = trainer_service_pb2.Command(command_id=1, type=common_pb2.COMMAND_TYPE_ROLLBACK, timeline=4)
    halt = trainer_service_pb2.Command(command_id=2, type=common_pb2.COMMAND_TYPE_HALT, timeline=4)
    resume = trainer_service_pb2.Command(command_id=3, type=common_pb2.COMMAND_TYPE_RESUME, timeline=4)
    assert [timeline_after(c, True) for c in (rollback, halt, resume)] == [5, 4, 5]
    assert timeline_after(rollback, False) == 4
    proto = attached(timeline=0)  # a rank behind the command's timeline catches up
    proto.send_command_result(rollback, True, restored_step=64, duration_ms=1.0)
    (result,) = transmit(proto)
    assert (result.command_result.new_timeline, result.command_result.seq) == (5, 1)
    assert proto.run_timeline == 5


def test_welcome_and_resync_raise_the_run_timeline_and_count_unjudged_records() -> None:
    """D1: a restarted trainer learns the run's timeline; a Resync counts its stale records once."""
    proto = TrainerProtocol(HELLO, ProtocolOptions(), 0.0)
    proto.send_vitals(chunk(1, 10, timeline=0))  # seqs 1-10
    proto.send_validation(trainer_service_pb2.ValidationRecord(step=10, timeline=0))  # seq 11
    proto.send_snapshot(trainer_service_pb2.SnapshotTaken(step=10, timeline=0))  # seq 12: not a record
    welcome(proto, timeline=2)
    assert proto.run_timeline == 2
    transmit(proto)
    proto.receive(Response(ack=trainer_service_pb2.Ack(up_to_seq=12)), 0.0)
    resync = trainer_service_pb2.Resync(timeline=2, up_to_seq=11, reason="stale")
    proto.receive(Response(resync=resync), 0.0)
    assert proto.num_unjudged_records == 11
    proto.send_vitals(chunk(11, 5, timeline=0))  # seqs 13-17, still on the old timeline
    proto.send_vitals(chunk(16, 5, timeline=2))  # seqs 18-22, adopted
    proto.receive(Response(resync=trainer_service_pb2.Resync(timeline=2, up_to_seq=20)), 0.0)
    assert proto.num_unjudged_records == 16, "only the 5 new stale records; the run's own timeline never counts"
    proto.receive(Response(resync=resync), 0.0)  # an old Resync again
    assert proto.num_unjudged_records == 16


def test_verdicts_by_seq_and_forgotten_ones() -> None:
    """A Verdict is handed out once by seq; a forgotten one is dropped whether it came before or after."""
    proto = attached()

    def verdict(seq: int) -> trainer_service_pb2.AttachResponse:
        return Response(verdict=trainer_service_pb2.Verdict(seq=seq, kind=common_pb2.VERDICT_KIND_HEALTHY))

    proto.receive(verdict(3), 0.0)
    proto.forget_verdict(4)
    proto.receive(verdict(4), 0.0)
    assert proto.verdict(4) is None
    received = proto.verdict(3)
    assert received is not None
    assert received.seq == 3
    assert proto.verdict(3) is None


def test_unreachable_time_counts_from_the_lost_welcomed_stream() -> None:
    """unreachable_for_s: from construction before any Welcome, 0 while attached, then from the loss."""
    proto = TrainerProtocol(HELLO, ProtocolOptions(), 100.0)
    assert proto.unreachable_for_s(103.0) == 3.0
    welcome(proto, now=104.0)
    assert proto.unreachable_for_s(150.0) == 0.0
    proto.connection_lost(150.0, "UNAVAILABLE", "")
    proto.connecting(151.0)
    proto.connection_lost(151.0, "UNAVAILABLE", "")  # a failed attempt does not restart the count
    assert proto.unreachable_for_s(160.0) == 10.0


class ProtocolMachine(RuleBasedStateMachine):
    """Random interleavings of queueing, transmitting, Acks, lost streams and Welcomes (the daemon's
    last durable seq anywhere between its last Ack and what it received). Nothing is lost: every seq is
    acknowledged, dropped (train-step records only) or still retained, and a stream transmits in seq order."""

    def __init__(self) -> None:
        super().__init__()
        self.proto = TrainerProtocol(HELLO, ProtocolOptions(capacity_records=12, heartbeat_s=1.0), 0.0)
        self.now = 0.0
        self.step = 0
        self.validation_seqs: set[int] = set()
        self.received = 0  # highest seq the daemon got on the current stream
        self.acked = 0
        self.generation = 0
        self.stream_seqs: list[int] = []

    @rule(n=st.integers(1, 6))
    def train(self, n: int) -> None:
        self.proto.send_vitals(chunk(self.step + 1, n))
        self.step += n

    @rule()
    def validate(self) -> None:
        self.validation_seqs.add(self.proto.send_validation(trainer_service_pb2.ValidationRecord(step=self.step)))

    @rule(dt=st.floats(0.0, 2.0))
    def transmit(self, dt: float) -> None:
        self.now += dt
        for message in transmit(self.proto, self.now):
            kind = message.WhichOneof("message")
            if kind == "heartbeat":
                continue
            payload = getattr(message, str(kind))
            first = payload.first_seq if kind == "vitals_batch" else payload.seq
            last = first + len(payload.step) - 1 if kind == "vitals_batch" else first
            self.stream_seqs.append(first)
            self.received = max(self.received, last)

    @precondition(lambda self: self.proto.connected)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        self.acked = data.draw(st.integers(self.acked, max(self.acked, self.received)))
        self.proto.receive(Response(ack=trainer_service_pb2.Ack(up_to_seq=self.acked)), self.now)

    @precondition(lambda self: self.proto.connected)
    @rule()
    def lose(self) -> None:
        self.proto.connection_lost(self.now, "UNAVAILABLE", "")

    @precondition(lambda self: not self.proto.connected)
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        durable = data.draw(st.integers(self.acked, max(self.acked, self.received)))
        self.generation += 1
        self.stream_seqs = []
        welcome(self.proto, generation=self.generation, last_durable_seq=durable, now=self.now)
        self.acked = durable

    @invariant()
    def transmitted_in_seq_order(self) -> None:
        assert self.stream_seqs == sorted(set(self.stream_seqs))

    @invariant()
    def a_welcomed_stream_resends_everything_retained(self) -> None:
        if self.proto.connected and not self.proto.outbox.has_unsent:
            assert {item.first_seq for item in self.proto.outbox._items} <= set(self.stream_seqs)

    @invariant()
    def nothing_is_lost(self) -> None:
        retained = {seq for item in self.proto.outbox._items for seq in range(item.first_seq, item.last_seq + 1)}
        dropped = self.proto.num_dropped_records
        unaccounted = set(range(self.acked + 1, self.proto.outbox.last_seq + 1)) - retained
        assert self.validation_seqs & unaccounted == set(), "validation records are never dropped"
        assert len(unaccounted) <= dropped


TestProtocolMachine = ProtocolMachine.TestCase
TestProtocolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_commands_of_a_run_the_governor_forgot_are_void() -> None:
    """Found by the simulation: a command received on the run's previous life, still held when a Welcome shows
    the governor no longer holds the run (commands numbered from 1 again), must not be executed: it would move
    the rank to a timeline the run, created anew, never reached, and every later record would be refused."""
    proto = attached()
    proto.send_vitals(chunk(1, 4))
    transmit(proto)
    proto.receive(Response(ack=trainer_service_pb2.Ack(up_to_seq=4)), 0.0)
    proto.receive(command(1), 0.0)
    proto.connection_lost(1.0, "UNAVAILABLE", "")
    welcome(proto, generation=1, last_durable_seq=0, now=2.0)  # the run was forgotten and created again
    assert proto.num_history_losses == 1
    assert proto.take_commands() == []


def test_the_stall_watchdogs_stream_end_is_an_order_to_end_the_process_once() -> None:
    """StreamEnd with end_process (policy end_stalled_ranks) ends the stream as END_PROCESS, carrying the
    governor's reason; the client then ends the process instead of reconnecting. A later stream's plain
    StreamEnd is a plain one again."""
    proto = attached()
    end = trainer_service_pb2.StreamEnd(reason="stall watchdog: rank 0 made no progress", end_process=True)
    proto.receive(Response(stream_end=end), 0.0)
    outcome = proto.connection_lost(1.0, None, "")
    assert (outcome.kind, outcome.details) == (EndKind.END_PROCESS, "stall watchdog: rank 0 made no progress")
    proto.connecting(2.0)
    proto.receive(Response(stream_end=trainer_service_pb2.StreamEnd(reason="shutdown")), 2.0)
    assert proto.connection_lost(3.0, None, "").kind is EndKind.STREAM_END
