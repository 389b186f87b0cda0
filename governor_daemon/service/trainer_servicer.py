"""TrainerService.Attach: decode each message into a core event, hand it to the runtime, stream out what
the runtime releases. One reader task per stream; vitals go through the ingest worker (service/ingest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import structlog

from governor_daemon.core import events as ev
from governor_daemon.errors import GovernorError, InternalError, InvalidInputError
from governor_daemon.security import CALLER, caller_scope
from governor_daemon.service import codec
from governor_daemon.service.ingest import VitalsIngest
from governor_daemon.service.runtime import Governor
from governor_daemon.service.status_codes import status_for
from governor_daemon.service.streams import StreamHandle
from tolaria.governor.v1 import trainer_service_pb2, trainer_service_pb2_grpc

log = structlog.get_logger("governor.attach")

HELLO_TIMEOUT_S = 30.0


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    """Adapter between Attach streams and the runtime."""

    def __init__(self, governor: Governor, ingest: VitalsIngest) -> None:
        self.governor = governor
        self.ingest = ingest

    async def Attach(
        self,
        request_iterator: AsyncIterator[trainer_service_pb2.AttachRequest],
        context: grpc.aio.ServicerContext[trainer_service_pb2.AttachRequest, trainer_service_pb2.AttachResponse],
    ) -> AsyncIterator[trainer_service_pb2.AttachResponse]:
        """Read the trainer's messages in a task; yield the daemon's messages as they are released."""
        stream = self.governor.open_stream(context.peer())
        reader = asyncio.create_task(self.read(request_iterator, stream))
        try:
            while True:
                message = await stream.out.get()
                if message is None:
                    break
                yield message
        finally:
            reader.cancel()
            try:
                # Bounded: a read parked inside grpc (e.g. awaiting a Hello while the server shuts down) may
                # not end at once, and must not hold the handler, and so the server's stop, until it does.
                # Whatever it reads later belongs to a closed stream, which the runtime ignores.
                await asyncio.wait({reader}, timeout=1.0)
            finally:
                # Even when this wait is cancelled: a trainer that half-closes and then cancels (closing its
                # channel) cancels the handler here, and the core kept the attachment forever.
                self.governor.close_stream(stream)
        if stream.failure is not None:
            exc = stream.failure
            log.warning("attach stream refused", stream=stream.id, peer=stream.peer, error=str(exc))
            await context.abort(status_for(exc), str(exc))

    async def read(self, requests: AsyncIterator[trainer_service_pb2.AttachRequest], stream: StreamHandle) -> None:
        """Decode and hand over every message of one stream, in order, until it ends or is refused."""
        governor, ingest, limits = self.governor, self.ingest, self.governor.options.limits
        try:
            iterator = aiter(requests)
            try:
                first = await asyncio.wait_for(anext(iterator), HELLO_TIMEOUT_S)
            except (StopAsyncIteration, TimeoutError):
                raise InvalidInputError("hello", f"no Hello within {HELLO_TIMEOUT_S:g} s") from None
            if first.WhichOneof("message") != "hello":
                raise InvalidInputError("hello", f"the first message must be Hello, got {first.WhichOneof('message')}")
            principal = CALLER.get()
            caller = principal or f"anonymous@{stream.peer}"
            if principal.startswith("anonymous@"):
                principal = ""
            attach = codec.decode_hello(first.hello, stream.id, stream.peer, caller, governor.now(), limits, principal)
            caller_scope().check(attach.run_id)
            governor.handle(attach)
            stream.bind(principal, attach.run_id)
            async for request in iterator:
                if stream.closed:  # refused or ended while its vitals were queued
                    break
                event = codec.decode_request(request, stream.id, governor.now(), limits)
                if isinstance(event, ev.Vitals):
                    await ingest.put(stream, event)
                    continue
                if not ingest.drain(stream):  # its vitals before its next message; one was refused
                    break
                governor.handle(event)
            if not stream.closed:
                ingest.drain(stream)  # the trainer closed its side: handle what it sent last,
                await governor.settled()  # and answer it before the stream ends
        except GovernorError as exc:
            stream.fail(exc)
        except Exception:  # a bug: INTERNAL with an incident id, never Python's exception text
            stream.fail(InternalError.logged(log, "attach stream failed"))
        finally:
            if not stream.closed:
                stream.close()
