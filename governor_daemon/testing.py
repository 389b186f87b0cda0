"""Test helpers, shipped as public API: an in-process daemon and an Attach client.

(`governor serve` as a subprocess is ``governor_daemon.daemon_process.DaemonProcess``.)

They drive the real daemon over real gRPC on a free loopback port; nothing here fakes the daemon.
"""

from __future__ import annotations

import asyncio
import io
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from governor_daemon.server import GovernorServer
from governor_daemon.settings import settings_for
from tolaria.governor.v1 import common_pb2, control_service_pb2_grpc, trainer_service_pb2, trainer_service_pb2_grpc

T = TypeVar("T")


class InProcessDaemon:
    """`governor serve` on its own event loop in a background thread, on 127.0.0.1:0.

    Use as a context manager; ``address`` is ``127.0.0.1:PORT``. ``call`` runs a coroutine on the daemon's
    loop (to inspect the Governor without racing it).
    """

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("metrics_listen", "off")
        settings.setdefault("tick_interval_s", 0.05)
        self.settings = settings_for(data_dir, **settings)
        self.loop = asyncio.new_event_loop()
        self.daemon: GovernorServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="governor-test-daemon", daemon=True)

    def __enter__(self) -> InProcessDaemon:
        self._thread.start()

        async def start() -> GovernorServer:
            daemon = GovernorServer(self.settings)
            await daemon.start()
            return daemon

        self.daemon = self.call(start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the daemon as SIGTERM would, then the loop."""
        if self.daemon is not None:
            self.call(self.daemon.stop())
            self.daemon = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    @property
    def address(self) -> str:
        """host:port of the gRPC server."""
        assert self.daemon is not None
        return f"127.0.0.1:{self.daemon.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``coro`` on the daemon's loop and return its result. On a timeout the error carries every
        task's stack on the loop and every thread's (what a hang needs to be diagnosed)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no result within {timeout_s} s; the daemon's loop:\n{self._stacks()}") from None

    def _stacks(self) -> str:
        out = io.StringIO()
        for task in asyncio.all_tasks(self.loop):
            out.write(f"--- {task!r}\n")
            task.print_stack(limit=12, file=out)
        for thread_id, frame in sys._current_frames().items():
            out.write(f"--- thread {thread_id}\n{''.join(traceback.format_stack(frame, limit=12))}")
        return out.getvalue()


class AttachClient:
    """A trainer rank speaking TrainerService.Attach through the generated stubs (synchronous).

    Everything received is kept in ``received``; ``next`` returns the next message of a kind.
    """

    def __init__(
        self,
        address: str,
        run_id: str,
        rank: int = 0,
        world_size: int = 1,
        incarnation_id: str | None = None,
        num_classes: int | None = 10,
        overrides: dict[str, Any] | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = trainer_service_pb2_grpc.TrainerServiceStub(self.channel)
        self.control = control_service_pb2_grpc.ControlServiceStub(self.channel)
        self.hello = trainer_service_pb2.Hello(
            run_id=run_id,
            rank=rank,
            world_size=world_size,
            incarnation_id=incarnation_id or uuid.uuid4().hex,
            task="test",
            policy_overrides=common_pb2.Policy(**(overrides or {})),
            trainer_version="testing",
        )
        if num_classes is not None:
            self.hello.num_classes = num_classes
        self.metadata = tuple(metadata)
        self._requests: queue.Queue[trainer_service_pb2.AttachRequest | None] = queue.Queue()
        self._inbox: queue.Queue[trainer_service_pb2.AttachResponse | BaseException | None] = queue.Queue()
        self.received: list[trainer_service_pb2.AttachResponse] = []
        self.error: grpc.RpcError | None = None
        self.welcome: trainer_service_pb2.Welcome | None = None
        self.seq = 0
        self.timeline = 0
        self._reader: threading.Thread | None = None

    def _request_iter(self) -> Iterator[trainer_service_pb2.AttachRequest]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def connect(self, timeout_s: float = 10.0) -> trainer_service_pb2.Welcome:
        """Open the stream, send Hello, return the Welcome (raises grpc.RpcError if refused)."""
        responses = self.stub.Attach(self._request_iter(), metadata=self.metadata)
        self._requests.put(trainer_service_pb2.AttachRequest(hello=self.hello))

        def read() -> None:
            try:
                for message in responses:
                    self._inbox.put(message)
            except grpc.RpcError as exc:
                self._inbox.put(exc)
            self._inbox.put(None)

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        self.welcome = self.next("welcome", timeout_s).welcome
        self.seq = self.welcome.last_durable_seq
        self.timeline = self.welcome.timeline
        return self.welcome

    def send(self, **message: Any) -> None:
        """Send one AttachRequest, e.g. send(heartbeat=Heartbeat(...))."""
        self._requests.put(trainer_service_pb2.AttachRequest(**message))

    def next_seq(self) -> int:
        """Allocate the next seq."""
        self.seq += 1
        return self.seq

    def validation(
        self, step: int, loss: float, epoch: int = 0, timeline: int | None = None, seq: int | None = None, **extra: Any
    ) -> int:
        """Send a validation record; returns its seq."""
        seq = self.next_seq() if seq is None else seq
        record = trainer_service_pb2.ValidationRecord(
            seq=seq,
            timeline=self.timeline if timeline is None else timeline,
            step=step,
            epoch=epoch,
            loss=loss,
            **extra,
        )
        self.send(validation_record=record)
        return seq

    def vitals(
        self,
        steps: Sequence[int],
        losses: Sequence[float],
        grad_norms: Sequence[float] = (),
        timeline: int | None = None,
        first_seq: int | None = None,
    ) -> int:
        """Send a VitalsBatch; returns its last seq."""
        first = self.seq + 1 if first_seq is None else first_seq
        self.seq = max(self.seq, first + len(steps) - 1)
        self.send(
            vitals_batch=trainer_service_pb2.VitalsBatch(
                first_seq=first,
                timeline=self.timeline if timeline is None else timeline,
                step=list(steps),
                loss=list(losses),
                grad_norm=list(grad_norms),
            )
        )
        return first + len(steps) - 1

    def result(
        self, command: trainer_service_pb2.Command, succeeded: bool = True, error: str = "", **extra: Any
    ) -> int:
        """Answer a command as a trainer that executed it (moving the timeline for ROLLBACK/RESUME); ``extra``
        sets more CommandResult fields (e.g. lr_after_restore)."""
        if succeeded and command.type in (common_pb2.COMMAND_TYPE_ROLLBACK, common_pb2.COMMAND_TYPE_RESUME):
            self.timeline = command.timeline + 1
        seq = self.next_seq()
        self.send(
            command_result=trainer_service_pb2.CommandResult(
                seq=seq,
                command_id=command.command_id,
                outcome=common_pb2.COMMAND_OUTCOME_SUCCEEDED if succeeded else common_pb2.COMMAND_OUTCOME_FAILED,
                new_timeline=self.timeline,
                restored_step=command.step,
                error=error,
                **extra,
            )
        )
        return seq

    def next(self, kind: str, timeout_s: float = 10.0) -> trainer_service_pb2.AttachResponse:
        """The next received message of ``kind`` (welcome, ack, verdict, command, stream_end).

        Messages of other kinds are kept in ``received`` and skipped. Raises the stream's RpcError,
        or TimeoutError.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {kind} within {timeout_s} s; received {[m.WhichOneof('message') for m in self.received]}"
                )
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is None:
                raise EOFError(f"stream ended while waiting for {kind}")
            if isinstance(item, grpc.RpcError):
                self.error = item
                raise item
            assert isinstance(item, trainer_service_pb2.AttachResponse)
            self.received.append(item)
            if item.WhichOneof("message") == kind:
                return item

    def wait_ack(self, seq: int, timeout_s: float = 10.0) -> None:
        """Wait for an Ack covering ``seq``."""
        for message in self.received:
            if message.WhichOneof("message") == "ack" and message.ack.up_to_seq >= seq:
                return
        deadline = time.monotonic() + timeout_s
        while True:
            ack = self.next("ack", max(0.01, deadline - time.monotonic())).ack
            if ack.up_to_seq >= seq:
                return

    def close(self) -> None:
        """Half-close the request stream and the channel."""
        self._requests.put(None)
        self.channel.close()
