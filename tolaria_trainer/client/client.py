"""GovernorClient: the grpc adapter that drives one rank's TrainerProtocol from a sender thread.

The protocol (``client/protocol.py``) decides everything: what to transmit and when, what a response
means, how a stream ended and how long to wait before the next attempt. This adapter only moves
messages: its sender thread opens the Attach stream, transmits the protocol's Hello and messages,
feeds it every response and the stream's end, and sleeps its reconnect delay. Every protocol call
happens under one lock; the only wait that can be long (a vitals chunk's device copy) happens
outside it, so the training thread, which only queues (``send_*``) and polls (``take_commands``,
``wait_verdict`` with a bound it chooses), never waits on the network or the device. A refusal is
permanent: ``refused`` holds it and the trainer carries on ungoverned.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import structlog

from tolaria.channel import TlsConfig, open_channel
from tolaria.exit_codes import ExitCode
from tolaria.governor.v1 import common_pb2, trainer_service_pb2, trainer_service_pb2_grpc
from tolaria_trainer.client.protocol import EndKind, ProtocolOptions, TrainerProtocol
from tolaria_trainer.governance import GovernorRefused, VitalsSource

log = structlog.get_logger("tolaria.client")

_NOTHING_TO_SEND = frozenset({"ack", "verdict", "command"})  # responses after which the sender has nothing new


@dataclass(frozen=True)
class ClientOptions:
    """Connection behaviour."""

    heartbeat_s: float = 2.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    capacity_records: int = 65536
    token: str = ""
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None

    def channel(self, address: str) -> grpc.Channel:
        """A channel to ``address``: TLS when a CA is given (mTLS with a client certificate too)."""
        tls = None if self.tls_ca is None else TlsConfig(self.tls_ca, self.tls_cert, self.tls_key)
        return open_channel(address, tls)

    def protocol_options(self) -> ProtocolOptions:
        """The protocol's share of these options."""
        return ProtocolOptions(
            heartbeat_s=self.heartbeat_s,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            capacity_records=self.capacity_records,
        )


def end_process(reason: str) -> None:
    """The stall watchdog's order (policy ``end_stalled_ranks``): the training thread is stuck, so this one
    ends the process with exit 10 (ExitCode.STALLED) for its launcher to restart it. Nothing else runs (no
    ``finally``, no atexit): the snapshots stay in shared memory for the restart to adopt."""
    log.error(
        "the governor's stall watchdog ends this process, for its launcher to restart it",
        reason=reason,
        exit_code=int(ExitCode.STALLED),
    )
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(ExitCode.STALLED)


class GovernorClient:
    """One rank's connection to the governor. Start with ``start()``; end with ``close()``.

    The ``send_*``, verdict and command methods may be called from any thread, before ``start()`` too
    (they queue); ``protocol`` may be driven directly only while the sender thread is not running.
    """

    def __init__(
        self,
        address: str,
        hello: trainer_service_pb2.Hello,
        options: ClientOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.options = options or ClientOptions()
        self._clock = clock
        self.protocol = TrainerProtocol(hello, self.options.protocol_options(), clock())
        # One lock, two conditions: the training thread's waits (verdicts, connection, flush) and the
        # sender's. Acks, verdicts and commands never make anything sendable, so they do not wake the
        # sender: every needless wake takes the GIL from the training thread.
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._sendable = threading.Condition(lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"governor-client-{hello.rank}", daemon=True)
        self._channel: grpc.Channel | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the sender thread (returns at once)."""
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a Welcome (or a refusal); returns whether connected."""
        with self._cond:
            self._cond.wait_for(lambda: self.protocol.connected or self.protocol.refused is not None, timeout_s)
            return self.protocol.connected

    @property
    def connected(self) -> bool:
        """True while a stream is open and welcomed."""
        with self._cond:
            return self.protocol.connected

    @property
    def refused(self) -> GovernorRefused | None:
        """The permanent refusal, if the governor refused this trainer."""
        with self._cond:
            return self.protocol.refused

    @property
    def run_timeline(self) -> int:
        """The timeline the daemon says the run is on (or this rank moved to); adopt it at an agreement point."""
        with self._cond:
            return self.protocol.run_timeline

    @property
    def num_unjudged_records(self) -> int:
        """Records the daemon journaled as stale (Resync) and never judged."""
        with self._cond:
            return self.protocol.num_unjudged_records

    @property
    def num_shed_records(self) -> int:
        """Train-step records the daemon acknowledged without judging them (it was behind)."""
        with self._cond:
            return self.protocol.num_shed_records

    @property
    def num_dropped_records(self) -> int:
        """Train-step records dropped under back-pressure."""
        with self._cond:
            return self.protocol.num_dropped_records

    def pending(self) -> int:
        """Messages not yet acknowledged."""
        with self._cond:
            return self.protocol.num_pending

    @property
    def acked_seq(self) -> int:
        """The highest seq the daemon acknowledged."""
        with self._cond:
            return self.protocol.acked_seq

    @property
    def effective_policy(self) -> common_pb2.Policy | None:
        """The policy of the last Welcome (None before the first)."""
        with self._cond:
            welcome = self.protocol.welcome
            return None if welcome is None else welcome.effective_policy

    @property
    def welcome(self) -> trainer_service_pb2.Welcome | None:
        """The last Welcome (None before the first)."""
        with self._cond:
            return self.protocol.welcome

    @property
    def num_history_losses(self) -> int:
        """Times a Welcome showed the daemon no longer held the run (forgotten, expired, journal lost)."""
        with self._cond:
            return self.protocol.num_history_losses

    @property
    def commands_waiting(self) -> bool:
        """True when a command arrived that ``take_commands`` has not taken yet. Lock-free: the training
        thread may call it every step (a stale False only delays the command to the next call)."""
        return self.protocol.has_commands

    def unreachable_for_s(self) -> float:
        """Seconds since the last welcomed stream was lost (0 while connected)."""
        with self._cond:
            return self.protocol.unreachable_for_s(self._clock())

    def coverage(self) -> tuple[bool, int, float, int]:
        """(acknowledged a record once, records never judged, seconds without a welcomed stream, streams lost)."""
        with self._cond:
            p = self.protocol
            return p.ever_acked, p.num_never_judged, p.seconds_without_governor(self._clock()), p.num_streams_lost

    def close(self, flush_timeout_s: float = 10.0) -> bool:
        """Wait up to ``flush_timeout_s`` for everything to be acknowledged, then stop. Returns True if flushed."""
        deadline = self._clock() + flush_timeout_s
        with self._cond:
            while self._thread.is_alive() and self.protocol.num_pending and self.protocol.refused is None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            flushed = self.protocol.num_pending == 0
            self._stop.set()
            self._cond.notify_all()
            self._sendable.notify()
        if self._channel is not None:
            self._channel.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return flushed

    # ----------------------------------------------------------------- trainer-side API

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Queue a chunk of train-step records of one timeline (never blocks on the network); returns the
        last seq assigned."""
        with self._cond:
            last = self.protocol.send_vitals(chunk)
            self._sendable.notify()
            return last

    def send_validation(self, record: trainer_service_pb2.ValidationRecord) -> int:
        """Queue a validation record; returns its seq."""
        with self._cond:
            seq = self.protocol.send_validation(record)
            self._sendable.notify()
            return seq

    def send_snapshot(
        self, timeline: int, step: int, snapshot_bytes: int, duration_ms: float, location: str, digest: str = ""
    ) -> int:
        """Queue a SnapshotTaken report; returns its seq."""
        snapshot = trainer_service_pb2.SnapshotTaken(
            timeline=timeline,
            step=step,
            snapshot_bytes=snapshot_bytes,
            duration_ms=duration_ms,
            location=location,
            digest=digest,
        )
        with self._cond:
            seq = self.protocol.send_snapshot(snapshot)
            self._sendable.notify()
            return seq

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
        """Queue the result of executing ``command`` (its new timeline follows from the command); returns the seq."""
        with self._cond:
            seq = self.protocol.send_command_result(
                command, succeeded, restored_step, duration_ms, error, num_culled_seeds, lr_after_restore
            )
            self._sendable.notify()
            return seq

    def send_adopted(self, adopted: trainer_service_pb2.SnapshotAdopted) -> int:
        """Queue a SnapshotAdopted report; returns its seq."""
        with self._cond:
            seq = self.protocol.send_adopted(adopted)
            self._sendable.notify()
            return seq

    def send_finish(self, finish: trainer_service_pb2.Finish) -> int:
        """Queue the Finish message; returns its seq."""
        with self._cond:
            seq = self.protocol.send_finish(finish)
            self._sendable.notify()
            return seq

    def wait_verdict(self, seq: int, timeout_s: float) -> trainer_service_pb2.Verdict | None:
        """The Verdict for validation record ``seq``, waiting up to ``timeout_s`` (0: just look)."""
        deadline = self._clock() + timeout_s
        with self._cond:
            while (verdict := self.protocol.verdict(seq)) is None:
                remaining = deadline - self._clock()
                if remaining <= 0 or self.protocol.refused is not None:
                    return None
                self._cond.wait(remaining)
            return verdict

    def forget_verdict(self, seq: int) -> None:
        """Drop a Verdict (received or still to come) nobody will wait for."""
        with self._cond:
            self.protocol.forget_verdict(seq)

    def take_commands(self) -> list[trainer_service_pb2.Command]:
        """Commands received so far (each once), lowest id first."""
        with self._cond:
            return self.protocol.take_commands()

    # ----------------------------------------------------------------- sender thread

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                hello = self.protocol.connecting(self._clock())
            code: str | None = None
            details = ""
            try:
                self._stream(hello)
            except grpc.RpcError as exc:
                status = exc.code() if hasattr(exc, "code") else None
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
            with self._cond:
                outcome = self.protocol.connection_lost(self._clock(), code, details, self._stop.is_set())
                delay = self.protocol.reconnect_delay(random.random())
                self._cond.notify_all()
            if outcome.kind is EndKind.REFUSED:
                log.error("governor refused this trainer; continuing without it", error=str(self.protocol.refused))
                return
            if outcome.kind is EndKind.END_PROCESS:
                end_process(outcome.details)
                return
            if self._stop.is_set():
                return
            log.info(
                "governor stream ended; reconnecting",
                how=outcome.kind.value,
                code=outcome.code,
                details=outcome.details,
                welcomed=outcome.welcomed,
                reconnect_in_s=round(delay, 3),
            )
            self._stop.wait(delay)

    def _stream(self, hello: trainer_service_pb2.AttachRequest) -> None:
        metadata = (("authorization", f"Bearer {self.options.token}"),) if self.options.token else ()
        channel = self.options.channel(self.address)
        self._channel = channel
        alive = threading.Event()
        alive.set()
        try:
            stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
            for response in stub.Attach(self._requests(hello, alive), metadata=metadata):
                with self._cond:
                    self.protocol.receive(response, self._clock())
                    ending = self.protocol.stream_ending
                    self._cond.notify_all()
                    if response.WhichOneof("message") not in _NOTHING_TO_SEND:
                        self._sendable.notify()
                self._log_response(response)
                if ending:
                    break
        finally:
            alive.clear()
            with self._cond:
                self._cond.notify_all()
                self._sendable.notify()
            channel.close()

    def _requests(
        self, hello: trainer_service_pb2.AttachRequest, alive: threading.Event
    ) -> Iterator[trainer_service_pb2.AttachRequest]:
        yield hello
        while True:
            with self._cond:
                chunk = self.protocol.next_vitals_to_build()
            if chunk is not None:
                chunk.host()  # may wait for the device copy: outside the lock
            with self._cond:
                if not alive.is_set() or self._stop.is_set():
                    return
                message = self.protocol.next_message(self._clock())
                if message is None:
                    due = self.protocol.send_due_at()
                    self._sendable.wait(None if due is None else max(0.0, due - self._clock()))
                    continue
            yield message

    def _log_response(self, response: trainer_service_pb2.AttachResponse) -> None:
        kind = response.WhichOneof("message")
        if kind == "welcome":
            welcome = response.welcome
            log.info(
                "attached to governor",
                address=self.address,
                generation=welcome.generation,
                last_durable_seq=welcome.last_durable_seq,
                timeline=welcome.timeline,
                run_state=common_pb2.RunState.Name(welcome.run_state).removeprefix("RUN_STATE_").lower(),
            )
        elif kind == "resync":
            resync = response.resync
            log.warning(
                "governor journaled records of an old timeline as stale, unjudged; adopting the run's timeline",
                timeline=resync.timeline,
                up_to_seq=resync.up_to_seq,
                reason=resync.reason,
                num_unjudged_records=self.num_unjudged_records,
            )
        elif kind == "stream_end":
            log.info("governor ended the stream", reason=response.stream_end.reason)
