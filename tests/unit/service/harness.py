"""The service layer without sockets: a real Governor (core, journal in a temporary directory) with its ingest
worker and both servicers, called directly with a ``grpc.aio.ServicerContext`` double.

Only the call's context is a double, as a2a-python tests its request handlers: the servicers, the runtime, the
core and the journal are the daemon's own. The double behaves as grpc's context does where the servicers rely
on it: ``abort`` raises ``grpc.aio.AbortError``, ``peer`` names the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import AsyncMock

import grpc

from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.service.control_servicer import ControlServicer
from governor_daemon.service.ingest import VitalsIngest
from governor_daemon.service.runtime import Governor, GovernorOptions
from governor_daemon.service.trainer_servicer import TrainerServicer
from tolaria.governor.v1 import common_pb2
from tolaria.governor.v1 import trainer_service_pb2 as tpb

T = TypeVar("T")
AttachHandler = Callable[[AsyncIterator[tpb.AttachRequest], Any], AsyncIterator[tpb.AttachResponse]]
"""TrainerServicer.Attach, or the same wrapped by the AuthInterceptor."""
PEER = "ipv4:127.0.0.1:50000"
CALLER = f"anonymous@{PEER}"


def servicer_context(peer: str = PEER) -> AsyncMock:
    """A context double for one call: ``abort(code, details)`` raises AbortError, as grpc.aio's does."""
    context = AsyncMock(spec=grpc.aio.ServicerContext)
    context.peer.return_value = peer
    context.abort.side_effect = grpc.aio.AbortError()
    return context


def aborted_with(context: AsyncMock) -> tuple[grpc.StatusCode, str]:
    """The (code, details) the call aborted with; fails unless it aborted exactly once."""
    context.abort.assert_awaited_once()
    code, details = context.abort.await_args.args[:2]
    return code, details


@dataclass(frozen=True)
class Entry:
    """A journal entry as read back from the segment files (so: durable)."""

    seq: int
    run: str
    kind: str
    payload: dict[str, Any]


@dataclass
class Daemon:
    """The runtime, its ingest worker and both servicers, as ``GovernorServer`` wires them (without a server)."""

    governor: Governor
    ingest: VitalsIngest
    control: ControlServicer
    trainers: TrainerServicer
    data_dir: Path

    def on_disk(self, run: str | None = None) -> list[Entry]:
        """Every entry in the segment files (of ``run`` only, when given)."""
        return [
            Entry(item.entry.seq, item.entry.run, item.entry.kind, item.entry.payload)
            for path in list_segments(self.data_dir)
            for item in read_segment(path)
            if isinstance(item, LocatedEntry) and (run is None or item.entry.run == run)
        ]

    def state(self) -> tuple[int, dict[str, Any], dict[int, Any]]:
        """What a refused request must leave as it was: the journal's last seq, every run's journaled state,
        and which stream is attached as what."""
        core = self.governor.core
        return self.governor.committer.last_seq, core.checkpoint(), dict(core.streams)


@contextlib.asynccontextmanager
async def started(data_dir: Path, **options: Any) -> AsyncIterator[Daemon]:
    """A started Governor on ``data_dir`` (GovernorOptions fields in ``options``); closed on the way out."""
    governor = Governor(GovernorOptions(data_dir, **options))
    await governor.start()
    ingest = VitalsIngest(governor)
    ingest.start()
    try:
        yield Daemon(governor, ingest, ControlServicer(governor), TrainerServicer(governor, ingest), data_dir)
    finally:
        await ingest.stop()
        await governor.close()


def on_daemon(data_dir: Path, scenario: Callable[[Daemon], Awaitable[T]], **options: Any) -> T:
    """Run ``scenario`` against a daemon started on ``data_dir``, on a fresh event loop."""

    async def main() -> T:
        async with started(data_dir, **options) as daemon:
            return await scenario(daemon)

    return asyncio.run(main())


# ------------------------------------------------------------------------------------ trainer messages


def hello(
    run_id: str = "run-1", rank: int = 0, world_size: int = 1, incarnation_id: str = "inc-a", **fields: Any
) -> tpb.AttachRequest:
    """A Hello for a 10-class task (random-guess loss ln 10)."""
    fields.setdefault("num_classes", 10)
    return tpb.AttachRequest(
        hello=tpb.Hello(
            run_id=run_id, rank=rank, world_size=world_size, incarnation_id=incarnation_id, task="digits", **fields
        )
    )


def vitals(first_seq: int, steps: list[int], losses: list[float], **fields: Any) -> tpb.AttachRequest:
    """A VitalsBatch of train-step records."""
    return tpb.AttachRequest(vitals_batch=tpb.VitalsBatch(first_seq=first_seq, step=steps, loss=losses, **fields))


def validation(seq: int, step: int, loss: float, **fields: Any) -> tpb.AttachRequest:
    """A ValidationRecord."""
    return tpb.AttachRequest(validation_record=tpb.ValidationRecord(seq=seq, step=step, loss=loss, **fields))


def finish(
    seq: int, status: common_pb2.FinishStatus.ValueType = common_pb2.FINISH_STATUS_COMPLETED
) -> tpb.AttachRequest:
    """A Finish."""
    return tpb.AttachRequest(finish=tpb.Finish(seq=seq, status=status, epochs_completed=1))


def kinds(responses: Iterable[tpb.AttachResponse]) -> list[str]:
    """Which message each response carries."""
    return [str(r.WhichOneof("message")) for r in responses]


# ------------------------------------------------------------------------------------ Attach calls


@dataclass
class AttachCall:
    """What one Attach call yielded, and its context (which says whether, and how, it aborted)."""

    responses: list[tpb.AttachResponse]
    context: AsyncMock


async def attach(
    daemon: Daemon, requests: Iterable[tpb.AttachRequest], peer: str = PEER, handler: AttachHandler | None = None
) -> AttachCall:
    """One Attach call (through ``handler``, else the servicer's own) that sends ``requests`` and half-closes;
    returns once the call has ended."""

    async def stream() -> AsyncIterator[tpb.AttachRequest]:
        for request in requests:
            yield request

    context = servicer_context(peer)
    responses: list[tpb.AttachResponse] = []
    call = handler or daemon.trainers.Attach

    async def run() -> None:
        with contextlib.suppress(grpc.aio.AbortError):
            async for response in call(stream(), context):
                responses.append(response)

    await asyncio.create_task(run())  # in its own task, as grpc runs each call
    return AttachCall(responses, context)


@dataclass
class Trainer:
    """One Attach call kept open, fed from a queue (for tests that act on a run while its trainer is attached).
    Each call runs in its own task, as grpc runs each call in its own."""

    daemon: Daemon
    requests: asyncio.Queue[tpb.AttachRequest | None] = field(default_factory=asyncio.Queue)
    responses: asyncio.Queue[tpb.AttachResponse] = field(default_factory=asyncio.Queue)
    received: list[tpb.AttachResponse] = field(default_factory=list)
    context: AsyncMock = field(default_factory=servicer_context)
    handler: AttachHandler | None = None
    task: asyncio.Task[None] | None = None

    @classmethod
    async def attached(
        cls, daemon: Daemon, first: tpb.AttachRequest | None = None, handler: AttachHandler | None = None
    ) -> Trainer:
        """A trainer that sent its Hello (``hello()`` unless given) through ``handler`` (else the servicer's own
        Attach) and was welcomed."""
        trainer = cls(daemon, handler=handler)
        trainer.task = asyncio.create_task(trainer._call())
        trainer.send(first or hello())
        welcome = await trainer.next()
        assert welcome.WhichOneof("message") == "welcome", welcome
        return trainer

    async def _call(self) -> None:
        async def stream() -> AsyncIterator[tpb.AttachRequest]:
            while (request := await self.requests.get()) is not None:
                yield request

        with contextlib.suppress(grpc.aio.AbortError):  # the context double records how it aborted
            async for response in (self.handler or self.daemon.trainers.Attach)(stream(), self.context):
                self.received.append(response)
                self.responses.put_nowait(response)

    def send(self, request: tpb.AttachRequest) -> None:
        """Queue a message for the daemon."""
        self.requests.put_nowait(request)

    async def next(self, kind: str | None = None) -> tpb.AttachResponse:
        """The next response (of ``kind``, skipping others); fails once the call has ended without one."""
        assert self.task is not None
        while True:
            if self.responses.empty() and self.task.done():
                raise AssertionError(f"the call ended without a {kind or 'response'}: {self.context.abort.await_args}")
            getter = asyncio.ensure_future(self.responses.get())
            await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            response = getter.result()
            if kind is None or response.WhichOneof("message") == kind:
                return response

    async def ended(self) -> None:
        """Wait for the call to end (the daemon ended or refused it)."""
        assert self.task is not None
        await self.task

    async def close(self) -> None:
        """Half-close and wait for the call to end."""
        self.requests.put_nowait(None)
        await self.ended()
