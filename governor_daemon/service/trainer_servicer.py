"""TrainerService.Attach: decode, call the Governor, encode. One reader task per stream; VitalsBatch
messages go through the ingest worker (service/ingest.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog

from governor_daemon.errors import GovernorError, InvalidInputError
from governor_daemon.governor import Governor
from governor_daemon.service.ingest import VitalsIngest
from governor_daemon.service.status_codes import status_for
from governor_daemon.service.streams import StreamHandle
from tolaria.governor.v1 import trainer_service_pb2, trainer_service_pb2_grpc

log = structlog.get_logger("governor.attach")

HELLO_TIMEOUT_S = 30.0


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """Adapter between Attach streams and the Governor."""

    def __init__(self, governor: Governor, ingest: VitalsIngest) -> None:
        self.governor = governor
        self.ingest = ingest

    async def Attach(
        self,
        request_iterator: AsyncIterator[trainer_service_pb2.AttachRequest],
        context: grpc.aio.ServicerContext[trainer_service_pb2.AttachRequest, trainer_service_pb2.AttachResponse],
    ) -> AsyncIterator[trainer_service_pb2.AttachResponse]:
        """Read the trainer's messages in a task; yield the daemon's messages as they are queued."""
        stream = StreamHandle(peer=context.peer())
        reader = asyncio.create_task(self._read(request_iterator, stream))
        acker = asyncio.create_task(stream.ack_loop(self.governor.committer))
        try:
            while True:
                message = await stream.out.get()
                if message is None:
                    break
                yield message
        finally:
            reader.cancel()
            acker.cancel()
            for task in (reader, acker):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.governor.detach(stream)
        if stream.failure is not None:
            exc = stream.failure
            log.warning("attach stream refused", run_id=stream.run_id, rank=stream.rank, error=str(exc))
            await context.abort(status_for(exc), str(exc))

    async def _read(
        self,
        requests: AsyncIterator[trainer_service_pb2.AttachRequest],
        stream: StreamHandle,
    ) -> None:
        governor, ingest = self.governor, self.ingest
        try:
            iterator = aiter(requests)
            try:
                first = await asyncio.wait_for(anext(iterator), HELLO_TIMEOUT_S)
            except (StopAsyncIteration, TimeoutError):
                raise InvalidInputError("hello", f"no Hello within {HELLO_TIMEOUT_S:g} s") from None
            if first.WhichOneof("message") != "hello":
                raise InvalidInputError("hello", f"the first message must be Hello, got {first.WhichOneof('message')}")
            await governor.attach(first.hello, stream)
            async for request in iterator:
                if stream.closed:  # refused or ended while its vitals were being judged
                    break
                kind = request.WhichOneof("message")
                if kind == "vitals_batch":
                    await ingest.put(stream, request.vitals_batch)
                    continue
                async with stream.judging:  # one message of a stream at a time (service/ingest.py)
                    await ingest.drain(stream)  # this stream's vitals are judged before its next message
                    await self._judge(kind, request, stream)
            if not stream.closed:
                async with stream.judging:
                    await ingest.drain(stream)  # the trainer closed its side: judge what it sent last
        except GovernorError as exc:
            stream.fail(exc)
        finally:
            if not stream.closed:
                stream.close()

    async def _judge(self, kind: str | None, request: trainer_service_pb2.AttachRequest, stream: StreamHandle) -> None:
        """One message other than a VitalsBatch."""
        governor = self.governor
        if kind == "validation_record":
            await governor.on_validation(stream, request.validation_record)
        elif kind == "heartbeat":
            governor.on_heartbeat(stream, request.heartbeat)
        elif kind == "command_result":
            await governor.on_command_result(stream, request.command_result)
        elif kind == "snapshot_taken":
            await governor.on_snapshot(stream, request.snapshot_taken)
        elif kind == "finish":
            await governor.on_finish(stream, request.finish)
        elif kind == "hello":
            raise InvalidInputError("hello", "Hello may only be the first message of a stream")
        else:
            raise InvalidInputError("message", "empty AttachRequest")
