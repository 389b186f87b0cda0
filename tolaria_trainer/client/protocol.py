"""TrainerProtocol: one rank's side of the Attach stream as a sans-IO state machine.

No threads, sockets, grpc or clock reads: whoever drives it passes the time (``now``, monotonic
seconds) and the randomness in, feeds it what the daemon sent and transmits what it hands back, so a
simulation with fake time reaches every state and gets the same output for the same inputs. The
contract it implements is docs/protocol.md. ``GovernorConnection`` (``client/connection.py``) drives it
from a sender thread over grpc; a simulation drives it directly.

Driving one connection::

    hello = proto.connecting(now)                    # transmit first
    proto.receive(response, now)                     # every AttachResponse, in order
    message = proto.next_message(now)                # transmit while not None; then wait until
    proto.send_due_at()                              #   this time (or new input) and ask again
    outcome = proto.connection_lost(now, code, details)   # grpc status code name, None for a clean end
    delay = proto.reconnect_delay(rand)              # rand in [0, 1); then connecting() again

What it owns:

- Seqs and the outbox (``client/outbox.py``): everything is retained until an Ack; a Welcome rewinds
  to its last durable seq; train-step records are bounded and drops are reported in the next batch
  transmitted.
- Timelines: ``run_timeline`` is the highest timeline the daemon named (Welcome, Resync) or this rank
  moved to by executing a command; the trainer adopts it at its next agreement point. Records carry
  the timeline they were produced on (the VitalsSource's), never one stamped here. A Resync's stale
  records are counted in ``num_unjudged_records``.
- Commands: only those of the current generation, each id once, lowest first (``take_commands``).
  ``timeline_after`` gives the timeline a command moves the rank to.
- Verdicts by seq (``verdict``, ``forget_verdict``).
- Heartbeats when nothing else was transmitted for ``heartbeat_s``, carrying the step and timeline of
  the last record transmitted on this stream (-1 and ``run_timeline`` before the first).
- How a stream ended (``StreamOutcome``): a refusal is permanent (``refused``); anything else is
  retried after ``reconnect_delay``, a jittered exponential backoff over the attempts since the last
  Welcome (a welcomed session resets it).
- ``unreachable_for_s``: time since the last welcomed stream was lost (for --fail-closed).
- ``coverage``: how governed the run was, for its summary: whether the daemon ever acknowledged a record,
  the records it never judged, the seconds without a welcomed stream and the streams lost.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria_trainer.client.outbox import Outbox
from tolaria_trainer.governance import GovernorRefused, VitalsSource

# Status codes worth another attempt: the daemon or the network is away, or a race. Every other code
# (bad input, auth, a policy conflict, a limit) is a refusal that another attempt would repeat.
RETRIABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL", "ABORTED"})
# A live duplicate attachment: usually this process's own previous stream that the daemon has not yet
# seen die, so it is retried for a few consecutive attempts before it counts as a refusal.
ALREADY_EXISTS = "ALREADY_EXISTS"
# Record groups (batches, validation records) remembered after their Ack for counting a later Resync.
MAX_RECORD_GROUPS = 4096


class EndKind(enum.Enum):
    """How a stream ended."""

    CLEAN = "clean"  # the daemon closed the stream without a status or a StreamEnd: reconnect
    STREAM_END = "stream_end"  # the daemon asked to reconnect later (shutdown, a newer attachment)
    END_PROCESS = "end_process"  # the stall watchdog: end this process, its launcher restarts it
    TRANSIENT = "transient"  # a retriable status: reconnect with backoff
    REFUSED = "refused"  # a permanent refusal: never reconnect


@dataclass(frozen=True)
class StreamOutcome:
    """What ``connection_lost`` concluded: the kind, the status, and whether the stream was welcomed."""

    kind: EndKind
    code: str | None
    details: str
    welcomed: bool


@dataclass(frozen=True)
class ProtocolOptions:
    """Timing and bounds of the protocol."""

    heartbeat_s: float = 2.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    capacity_records: int = 65536
    already_exists_retries: int = 5


def timeline_after(command: trainer_service_pb2.Command, succeeded: bool) -> int:
    """The timeline executing ``command`` moves a rank to: the command's timeline + 1 for a successful
    ROLLBACK or RESUME (whatever timeline the rank was on), the command's timeline otherwise."""
    moves = command.type in (common_pb2.COMMAND_TYPE_ROLLBACK, common_pb2.COMMAND_TYPE_RESUME)
    return command.timeline + 1 if succeeded and moves else command.timeline


class TrainerProtocol:
    """The trainer's protocol state. Not thread-safe: one caller at a time (``GovernorConnection`` holds a lock)."""

    def __init__(self, hello: trainer_service_pb2.Hello, options: ProtocolOptions, now: float) -> None:
        self.hello = hello
        self.options = options
        self.outbox = Outbox(options.capacity_records)
        self.welcome: trainer_service_pb2.Welcome | None = None
        self.generation = 0
        self.run_timeline = 0
        self.num_unjudged_records = 0
        self.num_shed_records = 0  # acknowledged without being judged: the daemon was behind
        self.num_welcomes = 0
        self.num_history_losses = 0
        self._run_life = 0  # the run's life the last Welcome named (0: none yet, or an older daemon)
        self._max_acked = 0
        self._refused: GovernorRefused | None = None
        self._welcomed = False  # the current stream got its Welcome
        self._stream_end_reason: str | None = None
        self._end_process = False  # the StreamEnd was the stall watchdog's (end_process)
        self._failures = 0  # attempts since the last Welcome that ended without one
        self._disconnected_since: float | None = now
        self._disconnected_s = 0.0  # seconds without a welcomed stream before _disconnected_since
        self.num_streams_lost = 0  # welcomed streams that ended
        self.ever_acked = False  # the daemon acknowledged a record of this incarnation once
        self._last_transmit_at = now
        self._last_record_sent: tuple[int, int] | None = None  # (step, timeline) on this stream
        self._verdicts: dict[int, trainer_service_pb2.Verdict] = {}
        self._forgotten: set[int] = set()
        self._commands: dict[int, trainer_service_pb2.Command] = {}
        self._highest_command_taken = 0
        # (first_seq, last_seq, timeline) of queued record groups a Resync may still call stale.
        self._records: deque[tuple[int, int, int]] = deque()
        self._confirmed_timeline = 0  # highest timeline the daemon named in a Welcome or Resync
        self._counted_up_to = 0  # Resyncs counted every stale record up to this seq

    # ----------------------------------------------------------------- connection

    @property
    def refused(self) -> GovernorRefused | None:
        """The permanent refusal, once a stream ended with one; None otherwise."""
        return self._refused

    @property
    def connected(self) -> bool:
        """True from a Welcome until that stream is lost."""
        return self._welcomed

    @property
    def stream_ending(self) -> bool:
        """True once the daemon sent StreamEnd: the driver should end the stream (nothing more is sent)."""
        return self._stream_end_reason is not None

    def connecting(self, now: float) -> trainer_service_pb2.AttachRequest:
        """Start an attempt: returns the Hello to transmit first. Raises GovernorRefused once refused."""
        if self._refused is not None:
            raise self._refused
        self._welcomed = False
        self._stream_end_reason = None
        self._last_record_sent = None
        self._last_transmit_at = now
        hello = trainer_service_pb2.Hello()
        hello.CopyFrom(self.hello)
        hello.timeline = self.run_timeline  # a run the daemon creates anew starts where this trainer is
        return trainer_service_pb2.AttachRequest(hello=hello)

    def connection_lost(self, now: float, code: str | None, details: str, closing: bool = False) -> StreamOutcome:
        """The stream ended: ``code`` is the grpc status code's name, None when it ended without one;
        ``closing``: this trainer ended it (``close``), so it was not lost."""
        welcomed = self._welcomed
        if self._stream_end_reason is not None:
            kind = EndKind.END_PROCESS if self._end_process else EndKind.STREAM_END
            details = details or self._stream_end_reason
        elif code is None:
            kind = EndKind.CLEAN
        elif code in RETRIABLE_CODES or (
            code == ALREADY_EXISTS and self._failures < self.options.already_exists_retries
        ):
            kind = EndKind.TRANSIENT
        else:
            kind = EndKind.REFUSED
            self._refused = GovernorRefused(code, details)
        self._failures = 0 if welcomed else self._failures + 1
        if welcomed:
            self._disconnected_since = now
            self.num_streams_lost += not closing
        self._welcomed = False
        self._stream_end_reason = None
        self._end_process = False
        return StreamOutcome(kind, code, details, welcomed)

    def reconnect_delay(self, rand: float) -> float:
        """Seconds to wait before the next attempt: exponential over the attempts since the last Welcome
        (so one welcomed session resets it), capped at ``backoff_max_s``, times a jitter of 0.5 + rand."""
        o = self.options
        return min(o.backoff_max_s, o.backoff_initial_s * 2.0 ** min(self._failures, 30)) * (0.5 + rand)

    def unreachable_for_s(self, now: float) -> float:
        """Seconds since the last welcomed stream was lost (since construction before any); 0 while connected."""
        since = self._disconnected_since
        return 0.0 if since is None else max(0.0, now - since)

    def seconds_without_governor(self, now: float) -> float:
        """Seconds without a welcomed stream since construction, all gaps together (the first connection's
        included)."""
        return self._disconnected_s + self.unreachable_for_s(now)

    @property
    def num_never_judged(self) -> int:
        """Records the daemon has not judged, as far as this trainer knows: stale (a Resync), dropped
        under back-pressure, shed (the daemon was behind: only the non-finite check), and not acknowledged."""
        return (
            self.num_unjudged_records
            + self.outbox.num_dropped_records
            + self.num_shed_records
            + self.outbox.num_unacked_records
        )

    # ----------------------------------------------------------------- receiving

    def receive(self, response: trainer_service_pb2.AttachResponse, now: float) -> None:
        """Take one message from the daemon."""
        kind = response.WhichOneof("message")
        if kind == "welcome":
            self._on_welcome(response.welcome, now)
        elif kind == "ack":
            self.ever_acked = self.ever_acked or response.ack.up_to_seq > 0
            self._max_acked = max(self._max_acked, response.ack.up_to_seq)
            self.num_shed_records += response.ack.num_shed
            self.outbox.ack(response.ack.up_to_seq)
            self._prune_records(response.ack.up_to_seq)
        elif kind == "verdict":
            seq = response.verdict.seq
            if seq in self._forgotten:
                self._forgotten.discard(seq)
            else:
                self._verdicts[seq] = response.verdict
        elif kind == "command":
            command = response.command
            if command.generation == self.generation and command.command_id > self._highest_command_taken:
                self._commands[command.command_id] = command
        elif kind == "resync":
            self._on_resync(response.resync)
        elif kind == "stream_end":
            self._stream_end_reason = response.stream_end.reason or "stream end"
            self._end_process = response.stream_end.end_process

    def _on_welcome(self, welcome: trainer_service_pb2.Welcome, now: float) -> None:
        self.welcome = welcome
        self.generation = welcome.generation
        self.num_welcomes += 1
        self._welcomed = True
        self._disconnected_s = self.seconds_without_governor(now)
        self._disconnected_since = None
        self._last_transmit_at = now
        another_life = bool(self._run_life and welcome.run_life and welcome.run_life != self._run_life)
        self._run_life = welcome.run_life or self._run_life
        if welcome.last_durable_seq < self._max_acked or another_life:
            # The daemon no longer holds what it acknowledged to this incarnation, or names another life of
            # the run: the run was forgotten (or its journal lost) and is new. Its commands are numbered from
            # 1 again, and the ones held from the run's previous life are void (found by the simulation).
            self.num_history_losses += 1
            self._highest_command_taken = 0
            self._commands.clear()
            self._max_acked = welcome.last_durable_seq
        self.outbox.rewind(welcome.last_durable_seq)
        self._learn_timeline(welcome.timeline)

    def _on_resync(self, resync: trainer_service_pb2.Resync) -> None:
        self._learn_timeline(resync.timeline)
        low, high = self._counted_up_to, resync.up_to_seq
        for first, last, timeline in self._records:
            if timeline < resync.timeline:
                self.num_unjudged_records += max(0, min(last, high) - max(first, low + 1) + 1)
        self._counted_up_to = max(low, high)
        self._forgotten = {seq for seq in self._forgotten if seq > high}  # no verdict comes for those
        self._prune_records(0)

    def _learn_timeline(self, timeline: int) -> None:
        self._confirmed_timeline = max(self._confirmed_timeline, timeline)
        self.run_timeline = max(self.run_timeline, timeline)

    def _prune_records(self, acked: int) -> None:
        """Forget record groups already counted by a Resync, acknowledged ones on a timeline the daemon has
        confirmed (a Resync is only for records older than the run's timeline), and past
        ``MAX_RECORD_GROUPS`` the oldest acknowledged ones (a Resync naming those counts too few)."""
        kept = deque(
            (first, last, timeline)
            for first, last, timeline in self._records
            if last > self._counted_up_to and (last > acked or timeline < self._confirmed_timeline)
        )
        while len(kept) > MAX_RECORD_GROUPS and kept[0][1] <= acked:
            kept.popleft()
        self._records = kept

    # ----------------------------------------------------------------- transmitting

    def next_vitals_to_build(self) -> VitalsSource | None:
        """The chunk ``next_message`` would build next (its ``host()`` may wait for a device copy, so a
        threaded driver calls it first, outside its lock), or None."""
        return self.outbox.next_vitals_to_build() if self._sending else None

    def next_message(self, now: float) -> trainer_service_pb2.AttachRequest | None:
        """The next message to transmit (unsent and resent messages in seq order, else a Heartbeat when
        one is due), or None. Nothing before the Welcome or after a StreamEnd."""
        if not self._sending:
            return None
        if self.outbox.has_unsent:
            message = self.outbox.take_next()
            kind = message.WhichOneof("message")
            if kind == "vitals_batch":
                self._last_record_sent = (message.vitals_batch.step[-1], message.vitals_batch.timeline)
            elif kind == "validation_record":
                self._last_record_sent = (message.validation_record.step, message.validation_record.timeline)
        elif now >= self._last_transmit_at + self.options.heartbeat_s:
            step, timeline = self._last_record_sent or (-1, self.run_timeline)
            message = trainer_service_pb2.AttachRequest(
                heartbeat=trainer_service_pb2.Heartbeat(latest_step=step, timeline=timeline)
            )
        else:
            return None
        self._last_transmit_at = now
        return message

    def send_due_at(self) -> float | None:
        """When ``next_message`` will return something without new input (a time <= now: at once), or
        None while nothing will (not welcomed, or the stream is ending)."""
        if not self._sending:
            return None
        if self.outbox.has_unsent:
            return self._last_transmit_at
        return self._last_transmit_at + self.options.heartbeat_s

    @property
    def _sending(self) -> bool:
        return self._welcomed and self._stream_end_reason is None

    # ----------------------------------------------------------------- trainer side

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Queue a chunk of train-step records (all of ``chunk.timeline``); returns the last seq assigned."""
        if len(chunk) == 0:
            return self.outbox.last_seq
        last = self.outbox.add_vitals(chunk)
        self._records.append((last - len(chunk) + 1, last, chunk.timeline))
        return last

    def send_validation(self, record: trainer_service_pb2.ValidationRecord) -> int:
        """Queue a validation record (never dropped); returns its seq, which its Verdict will name."""
        seq = self._queue(trainer_service_pb2.AttachRequest(validation_record=record), "validation_record")
        self._records.append((seq, seq, record.timeline))
        return seq

    def send_snapshot(self, snapshot: trainer_service_pb2.SnapshotTaken) -> int:
        """Queue a SnapshotTaken report; returns its seq."""
        return self._queue(trainer_service_pb2.AttachRequest(snapshot_taken=snapshot), "snapshot_taken")

    def send_command_result(
        self,
        command: trainer_service_pb2.Command,
        succeeded: bool,
        restored_step: int,
        duration_ms: float,
        error: str = "",
        num_culled_seeds: int = 0,
        lr_after_restore: float | None = None,
    ) -> int:
        """Queue the result of executing ``command``; its new_timeline is ``timeline_after(command,
        succeeded)``, which also raises ``run_timeline``. ``lr_after_restore`` is the learning rate the
        trainer continues with (None: not known). Returns the seq."""
        result = trainer_service_pb2.CommandResult(
            command_id=command.command_id,
            outcome=common_pb2.COMMAND_OUTCOME_SUCCEEDED if succeeded else common_pb2.COMMAND_OUTCOME_FAILED,
            new_timeline=timeline_after(command, succeeded),
            restored_step=restored_step,
            duration_ms=duration_ms,
            error=error,
            num_culled_seeds=num_culled_seeds,
        )
        if lr_after_restore is not None:
            result.lr_after_restore = lr_after_restore
        self.run_timeline = max(self.run_timeline, result.new_timeline)
        return self._queue(trainer_service_pb2.AttachRequest(command_result=result), "command_result")

    def send_adopted(self, adopted: trainer_service_pb2.SnapshotAdopted) -> int:
        """Queue a SnapshotAdopted report, which moves this rank to ``adopted.timeline`` + 1 and so raises
        ``run_timeline``. Returns the seq."""
        self.run_timeline = max(self.run_timeline, adopted.timeline + 1)
        return self._queue(trainer_service_pb2.AttachRequest(snapshot_adopted=adopted), "snapshot_adopted")

    def send_finish(self, finish: trainer_service_pb2.Finish) -> int:
        """Queue the Finish message (the last one); returns its seq."""
        return self._queue(trainer_service_pb2.AttachRequest(finish=finish), "finish")

    def _queue(self, request: trainer_service_pb2.AttachRequest, payload: str) -> int:
        copy = trainer_service_pb2.AttachRequest()
        copy.CopyFrom(request)  # the caller's message stays the caller's
        return self.outbox.add(copy, payload)

    def verdict(self, seq: int) -> trainer_service_pb2.Verdict | None:
        """The Verdict on validation record ``seq`` if it arrived (handed out once), else None."""
        return self._verdicts.pop(seq, None)

    def forget_verdict(self, seq: int) -> None:
        """Nobody will ask for the Verdict on ``seq``: drop it now or when it arrives."""
        if self._verdicts.pop(seq, None) is None and seq > self._counted_up_to:
            self._forgotten.add(seq)

    @property
    def has_commands(self) -> bool:
        """True when commands are waiting for ``take_commands``."""
        return bool(self._commands)

    def take_commands(self) -> list[trainer_service_pb2.Command]:
        """Commands received since the last call, lowest id first; each id is handed out once."""
        commands = [self._commands[k] for k in sorted(self._commands)]
        self._commands.clear()
        if commands:
            self._highest_command_taken = commands[-1].command_id
        return commands

    @property
    def num_pending(self) -> int:
        """Messages not yet acknowledged."""
        return self.outbox.num_pending

    @property
    def acked_seq(self) -> int:
        """The highest seq the daemon acknowledged (durable and judged) to this incarnation."""
        return self._max_acked

    @property
    def num_dropped_records(self) -> int:
        """Train-step records dropped under back-pressure so far."""
        return self.outbox.num_dropped_records
