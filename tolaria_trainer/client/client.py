"""GovernorClient: the background sender that owns the Attach stream of one trainer rank.

The training thread only queues (``send_*``) and polls (``verdict_for``, ``take_commands``); it never
waits on the network except in ``wait_verdict`` with a bound it chooses. The sender thread connects,
says Hello, rewinds the outbox to the Welcome's seq, streams messages and heartbeats, and reconnects
with jittered exponential backoff on transient failures. A refusal (bad input, a live duplicate,
a policy conflict) is permanent: ``refused`` holds it and the trainer carries on ungoverned.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from tolaria.governor.v1 import common_pb2, trainer_service_pb2, trainer_service_pb2_grpc
from tolaria_trainer.client.errors import GovernorRefused
from tolaria_trainer.client.outbox import Outbox
from tolaria_trainer.training.vitals import VitalsChunk

log = structlog.get_logger("tolaria.client")

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
}


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
        if self.tls_ca is None:
            return grpc.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(self.tls_ca, self.tls_key, self.tls_cert)
        return grpc.secure_channel(address, credentials)


class GovernorClient:
    """One rank's connection to the governor. Start with ``start()``; end with ``close()``."""

    def __init__(self, address: str, hello: trainer_service_pb2.Hello, options: ClientOptions | None = None) -> None:
        self.address = address
        self.hello = hello
        self.options = options or ClientOptions()
        self.outbox = Outbox(self.options.capacity_records)
        self.refused: GovernorRefused | None = None
        self.welcome: trainer_service_pb2.Welcome | None = None
        self.generation = 0
        self.latest_step = 0
        self.timeline = 0
        self.num_connects = 0
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._verdicts: dict[int, trainer_service_pb2.Verdict] = {}
        self._verdict_cond = threading.Condition(self._lock)
        self._commands: dict[int, trainer_service_pb2.Command] = {}
        self._forgotten: set[int] = set()
        self._disconnected_since: float | None = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"governor-client-{hello.rank}", daemon=True)
        self._channel: grpc.Channel | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the sender thread (returns at once)."""
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a Welcome; returns whether connected."""
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        """True while a stream is open and welcomed."""
        return self._connected.is_set()

    def unreachable_for_s(self) -> float:
        """Seconds since the last stream was lost (0 while connected)."""
        since = self._disconnected_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self, flush_timeout_s: float = 10.0) -> bool:
        """Wait up to ``flush_timeout_s`` for everything to be acknowledged, then stop. Returns True if flushed."""
        deadline = time.monotonic() + flush_timeout_s
        while self.outbox.pending() and time.monotonic() < deadline and self.refused is None:
            time.sleep(0.02)
        flushed = self.outbox.pending() == 0
        self._stop.set()
        self.outbox.wake()
        if self._channel is not None:
            self._channel.close()
        self._thread.join(timeout=5)
        return flushed

    # ----------------------------------------------------------------- trainer-side API

    def send_vitals(self, chunk: VitalsChunk, timeline: int) -> None:
        """Queue a chunk of train-step records (never blocks)."""
        if chunk.steps:
            self.latest_step = max(self.latest_step, chunk.steps[-1])
        self.outbox.add_vitals(chunk, timeline)

    def send_validation(self, record: trainer_service_pb2.ValidationRecord) -> int:
        """Queue a validation record (seq filled in); returns its seq."""
        self.latest_step = max(self.latest_step, record.step)
        return self._queue("validation_record", record)

    def send_snapshot(self, timeline: int, step: int, snapshot_bytes: int, duration_ms: float, location: str) -> int:
        """Queue a SnapshotTaken report."""
        snapshot = trainer_service_pb2.SnapshotTaken(
            timeline=timeline, step=step, snapshot_bytes=snapshot_bytes, duration_ms=duration_ms, location=location
        )
        return self._queue("snapshot_taken", snapshot)

    def send_command_result(self, result: trainer_service_pb2.CommandResult) -> int:
        """Queue a CommandResult (seq filled in)."""
        return self._queue("command_result", result)

    def send_finish(self, finish: trainer_service_pb2.Finish) -> int:
        """Queue the Finish message."""
        return self._queue("finish", finish)

    def _queue(self, field: str, message: Any) -> int:
        """Queue ``message`` as the AttachRequest field ``field``, its ``seq`` set when it gets one."""

        def build(seq: int) -> trainer_service_pb2.AttachRequest:
            request = trainer_service_pb2.AttachRequest()
            target = getattr(request, field)
            target.CopyFrom(message)
            target.seq = seq
            return request

        return self.outbox.add(build)

    def wait_verdict(self, seq: int, timeout_s: float) -> trainer_service_pb2.Verdict | None:
        """The Verdict for validation record ``seq``, waiting up to ``timeout_s`` (0: just look)."""
        deadline = time.monotonic() + timeout_s
        with self._verdict_cond:
            while seq not in self._verdicts:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.refused is not None:
                    return None
                self._verdict_cond.wait(remaining)
            return self._verdicts.pop(seq)

    def forget_verdict(self, seq: int) -> None:
        """Drop a Verdict (received or still to come) nobody will wait for."""
        with self._lock:
            self._verdicts.pop(seq, None)
            self._forgotten.add(seq)

    def take_commands(self) -> list[trainer_service_pb2.Command]:
        """Commands received so far (each once), lowest id first."""
        with self._lock:
            commands = [self._commands[k] for k in sorted(self._commands)]
            self._commands.clear()
            return commands

    # ----------------------------------------------------------------- sender thread

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._one_connection()
                failures = 0
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                if code not in TRANSIENT and not (code == grpc.StatusCode.ALREADY_EXISTS and failures < 5):
                    details = exc.details() if hasattr(exc, "details") else str(exc)
                    self.refused = GovernorRefused(code.name, details or "")
                    log.error("governor refused this trainer; continuing without it", error=str(self.refused))
                    with self._verdict_cond:
                        self._verdict_cond.notify_all()
                    return
                failures += 1
            finally:
                if self._connected.is_set():
                    self._disconnected_since = time.monotonic()
                self._connected.clear()
            if self._stop.is_set():
                return
            delay = min(self.options.backoff_max_s, self.options.backoff_initial_s * 2 ** min(failures, 10))
            self._stop.wait(delay * random.uniform(0.5, 1.5))

    def _one_connection(self) -> None:
        metadata = (("authorization", f"Bearer {self.options.token}"),) if self.options.token else ()
        channel = self.options.channel(self.address)
        self._channel = channel
        alive = threading.Event()
        alive.set()
        welcomed = threading.Event()
        try:
            stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
            responses = stub.Attach(self._requests(alive, welcomed), metadata=metadata)
            for response in responses:
                kind = response.WhichOneof("message")
                if kind == "welcome":
                    self._on_welcome(response.welcome)
                    welcomed.set()
                elif kind == "ack":
                    self.outbox.ack(response.ack.up_to_seq)
                elif kind == "verdict":
                    with self._verdict_cond:
                        if response.verdict.seq in self._forgotten:
                            self._forgotten.discard(response.verdict.seq)
                            continue
                        self._verdicts[response.verdict.seq] = response.verdict
                        self._verdict_cond.notify_all()
                elif kind == "command":
                    if response.command.generation == self.generation:
                        with self._lock:
                            self._commands[response.command.command_id] = response.command
                elif kind == "stream_end":
                    log.info("governor ended the stream", reason=response.stream_end.reason)
                    break
        finally:
            alive.clear()
            self.outbox.wake()
            channel.close()

    def _on_welcome(self, welcome: trainer_service_pb2.Welcome) -> None:
        self.welcome = welcome
        self.generation = welcome.generation
        self.num_connects += 1
        self.outbox.rewind(welcome.last_durable_seq)
        self._disconnected_since = None
        self._connected.set()
        log.info(
            "attached to governor",
            address=self.address,
            generation=welcome.generation,
            last_durable_seq=welcome.last_durable_seq,
            run_state=common_pb2.RunState.Name(welcome.run_state),
        )

    def _requests(
        self, alive: threading.Event, welcomed: threading.Event
    ) -> Iterator[trainer_service_pb2.AttachRequest]:
        yield trainer_service_pb2.AttachRequest(hello=self.hello)
        while alive.is_set() and not welcomed.wait(0.05):
            if self._stop.is_set():
                return
        while alive.is_set() and not self._stop.is_set():
            message = self.outbox.next_to_send(self.options.heartbeat_s)
            if not alive.is_set():
                return
            if message is None:
                yield trainer_service_pb2.AttachRequest(
                    heartbeat=trainer_service_pb2.Heartbeat(latest_step=self.latest_step, timeline=self.timeline)
                )
            else:
                yield message
