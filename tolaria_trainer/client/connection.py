"""GovernorConnection: one rank's ``Governance`` over the Attach stream.

Three parts, each with one job:

- the sans-IO ``TrainerProtocol`` (``client/protocol.py``) decides everything: seqs, what to transmit
  and when, what a response means, how a stream ended, when to try again;
- the ``Sender`` thread (``client/sender.py``) only moves messages between it and grpc;
- this object is the port the loop calls. It reads and drives the protocol under the one lock the
  sender uses too, and translates with ``client/messages.py`` (the only place protobufs are built).

The training thread only queues (``send_*``) and polls (``take_commands``, ``verdict`` with a bound it
chooses); it never waits on the network or the device. A refusal is permanent: ``refusal`` holds it and
the trainer carries on ungoverned.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tolaria.governor.v1 import trainer_service_pb2
from tolaria_trainer.client import messages
from tolaria_trainer.client.protocol import TrainerProtocol
from tolaria_trainer.client.sender import ClientOptions, Guarded, Sender
from tolaria_trainer.governance import (
    AdoptionReport,
    Command,
    CommandReport,
    Coverage,
    FinishReport,
    GovernorRefused,
    SnapshotReport,
    ValidationReport,
    Verdict,
    VitalsSource,
)


class GovernorConnection:
    """``Governance`` for one rank over gRPC. ``start`` connects; ``close`` flushes and ends.

    Every method may be called from any thread, and the ``send_*`` ones before ``start`` too (they
    queue). ``protocol`` may be driven directly (a test playing the daemon) only while the sender thread
    does not run.
    """

    governed = True

    def __init__(
        self,
        address: str,
        hello: trainer_service_pb2.Hello,
        options: ClientOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        options = options or ClientOptions()
        self._clock = clock
        self.protocol = TrainerProtocol(hello, options.protocol_options(), clock())
        self._guarded = Guarded.around(self.protocol)
        self._lock = self._guarded.changed
        self._sender = Sender(address, options, self._guarded, clock, hello.rank)

    # ----------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        """A stream is open and welcomed."""
        with self._lock:
            return self.protocol.connected

    @property
    def refusal(self) -> GovernorRefused | None:
        """The permanent refusal, if the governor refused this trainer."""
        with self._lock:
            return self.protocol.refused

    @property
    def run_timeline(self) -> int:
        """The timeline the governor says the run is on (or this rank moved to); adopted at an agreement point."""
        with self._lock:
            return self.protocol.run_timeline

    @property
    def num_unjudged_records(self) -> int:
        """Records the governor journaled as stale (Resync) and never judged."""
        with self._lock:
            return self.protocol.num_unjudged_records

    @property
    def num_dropped_records(self) -> int:
        """Train-step records dropped under back-pressure."""
        with self._lock:
            return self.protocol.num_dropped_records

    @property
    def num_shed_records(self) -> int:
        """Train-step records the governor acknowledged without judging them (it was behind)."""
        with self._lock:
            return self.protocol.num_shed_records

    @property
    def acked_seq(self) -> int:
        """The highest seq the governor acknowledged."""
        with self._lock:
            return self.protocol.acked_seq

    @property
    def num_history_losses(self) -> int:
        """Times a Welcome showed the governor no longer held the run (its commands start at 1 again)."""
        with self._lock:
            return self.protocol.num_history_losses

    @property
    def commands_waiting(self) -> bool:
        """A command arrived that ``take_commands`` has not taken yet. Lock-free: the training thread calls
        it every step (a stale False only delays the command to the next call)."""
        return self.protocol.has_commands

    @property
    def last_snapshot(self) -> tuple[int, int, str] | None:
        """This rank's last published snapshot in shared memory as the last Welcome named it (timeline, step,
        digest); None without one (or before a Welcome, or from an older daemon). Read at start-up, the
        Welcome is the first of this process: the snapshot is one an earlier process published."""
        with self._lock:
            welcome = self.protocol.welcome
        if welcome is None or not welcome.HasField("last_snapshot") or not welcome.last_snapshot.digest:
            return None
        last = welcome.last_snapshot
        return (last.timeline, last.step, last.digest)

    @property
    def train_verification_steps(self) -> int | None:
        """Steps after which the train-stream detectors vouch for a step: the longest delay between an
        alarm's onset and the alarm, as the Welcome names it (0 when only non-finite records are judged;
        None before a Welcome)."""
        with self._lock:
            welcome = self.protocol.welcome
        if welcome is None:
            return None
        if welcome.HasField("train_verification_steps"):
            return welcome.train_verification_steps
        policy = welcome.effective_policy  # a daemon from before the field: its three patience-based rules
        if policy.profile != "default" or not policy.HasField("step_loss_patience"):
            return 0
        return max(policy.step_loss_patience, policy.step_collapse_patience)

    def unreachable_for_s(self) -> float:
        """Seconds since the last welcomed stream was lost (0 while connected)."""
        with self._lock:
            return self.protocol.unreachable_for_s(self._clock())

    def coverage(self) -> Coverage:
        """How governed the run was so far."""
        with self._lock:
            p = self.protocol
            seconds_without = p.seconds_without_governor(self._clock())
            return Coverage(self.address, p.ever_acked, p.num_never_judged, seconds_without, p.num_streams_lost)

    def pending(self) -> int:
        """Messages not acknowledged yet."""
        with self._lock:
            return self.protocol.num_pending

    # ----------------------------------------------------------------- lifecycle

    def start(self, wait_s: float) -> bool:
        """Start the sender thread and wait up to ``wait_s`` for the first Welcome (or a refusal); returns
        whether connected."""
        self._sender.start()
        with self._lock:
            self._lock.wait_for(lambda: self.protocol.connected or self.protocol.refused is not None, wait_s)
            return self.protocol.connected

    def close(self, finish: FinishReport | None, flush_timeout_s: float) -> bool:
        """Queue the Finish (if any), wait up to ``flush_timeout_s`` for everything to be acknowledged, and
        stop. Returns True if flushed."""
        if finish is not None:
            message = messages.finish_message(finish)
            self._queue(lambda: self.protocol.send_finish(message))
        deadline = self._clock() + flush_timeout_s
        with self._lock:
            while self._sender.alive and self.protocol.num_pending and self.protocol.refused is None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            flushed = self.protocol.num_pending == 0
        self._sender.stop()
        return flushed

    # ----------------------------------------------------------------- the loop's messages

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Queue a chunk of train-step records of one timeline; returns the last seq assigned."""
        return self._queue(lambda: self.protocol.send_vitals(chunk))

    def send_validation(self, report: ValidationReport) -> int:
        """Queue a ValidationRecord; returns its seq."""
        record = messages.validation_record(report)
        return self._queue(lambda: self.protocol.send_validation(record))

    def send_snapshot(self, report: SnapshotReport) -> None:
        """Queue a SnapshotTaken."""
        snapshot = messages.snapshot_taken(report)
        self._queue(lambda: self.protocol.send_snapshot(snapshot))

    def send_adopted(self, report: AdoptionReport) -> None:
        """Queue a SnapshotAdopted."""
        adopted = messages.snapshot_adopted(report)
        self._queue(lambda: self.protocol.send_adopted(adopted))

    def send_command_result(self, report: CommandReport) -> None:
        """Queue a CommandResult for the command as the governor sent it (its new timeline follows from it)."""
        command = messages.command_to_proto(report.command)
        self._queue(
            lambda: self.protocol.send_command_result(
                command,
                report.succeeded,
                report.restored_step,
                report.duration_ms,
                report.error,
                report.num_culled_seeds,
                report.lr_after_restore,
            )
        )

    def verdict(self, seq: int, wait_s: float) -> Verdict | None:
        """The Verdict on validation ``seq``, waiting up to ``wait_s`` if connected now (0: just look)."""
        with self._lock:
            deadline = self._clock() + (wait_s if self.protocol.connected else 0.0)
            while (verdict := self.protocol.verdict(seq)) is None:
                remaining = deadline - self._clock()
                if remaining <= 0 or self.protocol.refused is not None:
                    return None
                self._lock.wait(remaining)
        return messages.verdict_from_proto(verdict)

    def forget_verdict(self, seq: int) -> None:
        """Drop the Verdict on ``seq`` (received or still to come): nobody will wait for it."""
        with self._lock:
            self.protocol.forget_verdict(seq)

    def take_commands(self) -> list[Command]:
        """Commands received so far, each once, lowest id first (types this trainer does not know are skipped)."""
        with self._lock:
            received = self.protocol.take_commands()
        return [messages.command_from_proto(c) for c in received if messages.is_known_command(c)]

    def _queue(self, send: Callable[[], int]) -> int:
        """Run ``send`` (one of the protocol's ``send_*``) under the lock and wake the sender; returns the seq.
        The message is built before, outside the lock."""
        with self._lock:
            seq = send()
            self._guarded.sendable.notify()
            return seq
