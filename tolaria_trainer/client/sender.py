"""The sender thread of one rank's connection: the only code of the trainer that touches grpc.

It opens the Attach stream, transmits the protocol's Hello and messages, feeds the protocol every
response and the stream's end, and sleeps the protocol's reconnect delay. It decides nothing: the
sans-IO ``TrainerProtocol`` (``client/protocol.py``) does. It drives the protocol only under the
connection's lock, and the one wait that can be long (a vitals chunk's device copy) happens outside
it, so the training thread, which only queues and polls, never waits on the network or the device.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import structlog

from tolaria.channel import TlsConfig, open_channel
from tolaria.exit_codes import ExitCode
from tolaria.governor.v1 import common_pb2, trainer_service_pb2, trainer_service_pb2_grpc
from tolaria_trainer.client.protocol import EndKind, ProtocolOptions, TrainerProtocol

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


@dataclass(frozen=True)
class Guarded:
    """The protocol and the one lock it is driven under, with its two conditions: ``changed`` wakes the
    training thread's waits (a Welcome, a verdict, an Ack, a stream's end), ``sendable`` wakes the sender.
    Acks, verdicts and commands never make anything sendable, so they do not wake the sender: every
    needless wake takes the GIL from the training thread."""

    protocol: TrainerProtocol
    changed: threading.Condition
    sendable: threading.Condition

    @classmethod
    def around(cls, protocol: TrainerProtocol) -> Guarded:
        """``protocol`` under a new lock."""
        lock = threading.RLock()
        return cls(protocol, threading.Condition(lock), threading.Condition(lock))


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


class Sender:
    """The thread that keeps one rank attached to the governor at ``address``, until ``stop``."""

    def __init__(
        self, address: str, options: ClientOptions, guarded: Guarded, clock: Callable[[], float], rank: int
    ) -> None:
        self.address = address
        self._options = options
        self._guarded = guarded
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"governor-client-{rank}", daemon=True)
        self._channel: grpc.Channel | None = None

    @property
    def alive(self) -> bool:
        """The thread runs (started, and neither stopped nor refused)."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (returns at once)."""
        self._thread.start()

    def stop(self) -> None:
        """End the stream and the thread (waits up to 5 s for it)."""
        with self._guarded.changed:
            self._stop.set()
            self._guarded.changed.notify_all()
            self._guarded.sendable.notify()
        if self._channel is not None:
            self._channel.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        protocol, changed = self._guarded.protocol, self._guarded.changed
        while not self._stop.is_set():
            with changed:
                hello = protocol.connecting(self._clock())
            code: str | None = None
            details = ""
            try:
                self._stream(hello)
            except grpc.RpcError as exc:
                status = exc.code() if hasattr(exc, "code") else None
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
            with changed:
                outcome = protocol.connection_lost(self._clock(), code, details, self._stop.is_set())
                delay = protocol.reconnect_delay(random.random())
                changed.notify_all()
            if outcome.kind is EndKind.REFUSED:
                log.error("governor refused this trainer; continuing without it", error=str(protocol.refused))
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
        guarded = self._guarded
        metadata = (("authorization", f"Bearer {self._options.token}"),) if self._options.token else ()
        channel = self._options.channel(self.address)
        self._channel = channel
        alive = threading.Event()
        alive.set()
        try:
            stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
            for response in stub.Attach(self._requests(hello, alive), metadata=metadata):
                with guarded.changed:
                    guarded.protocol.receive(response, self._clock())
                    ending = guarded.protocol.stream_ending
                    guarded.changed.notify_all()
                    if response.WhichOneof("message") not in _NOTHING_TO_SEND:
                        guarded.sendable.notify()
                self._log_response(response)
                if ending:
                    break
        finally:
            alive.clear()
            with guarded.changed:
                guarded.changed.notify_all()
                guarded.sendable.notify()
            channel.close()

    def _requests(
        self, hello: trainer_service_pb2.AttachRequest, alive: threading.Event
    ) -> Iterator[trainer_service_pb2.AttachRequest]:
        guarded = self._guarded
        yield hello
        while True:
            with guarded.changed:
                chunk = guarded.protocol.next_vitals_to_build()
            if chunk is not None:
                chunk.host()  # may wait for the device copy: outside the lock
            with guarded.changed:
                if not alive.is_set() or self._stop.is_set():
                    return
                message = guarded.protocol.next_message(self._clock())
                if message is None:
                    due = guarded.protocol.send_due_at()
                    guarded.sendable.wait(None if due is None else max(0.0, due - self._clock()))
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
            with self._guarded.changed:
                num_unjudged_records = self._guarded.protocol.num_unjudged_records
            log.warning(
                "governor journaled records of an old timeline as stale, unjudged; adopting the run's timeline",
                timeline=resync.timeline,
                up_to_seq=resync.up_to_seq,
                reason=resync.reason,
                num_unjudged_records=num_unjudged_records,
            )
        elif kind == "stream_end":
            log.info("governor ended the stream", reason=response.stream_end.reason)
