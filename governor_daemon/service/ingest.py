"""Train-step vitals are judged by one worker task, so no stream's validation record waits behind them.

Every Attach stream has a reader task. Were each reader to judge its own VitalsBatch (a few hundred
microseconds of Python: checks, counters, one journal entry), a validation record would wait in the
event loop's FIFO ready queue behind one batch from every other busy stream, and its verdict would
leave late (DESIGN.md section 7 bounds that round trip). So readers only queue their batches here,
which costs about as much as reading them, and one worker judges the queued batches of all streams in
arrival order, in slices of ``slice_s`` between which the event loop serves everyone else.

Per-stream order is kept: before a reader handles any other message of its stream (a validation
record, a snapshot, a command result, a finish, or the end of the stream) it judges that stream's
queued batches itself (``drain``), and a stream's messages are judged one at a time under its
``judging`` lock: judging may await a journal commit (before a command leaves), and another message
of the same stream must not be judged in that gap (its acknowledgements would go out of order, and a
later message would be judged before an earlier one's command left). The worker passes over a stream
whose lock is held: the holder is that stream's reader, which judges the stream's queue itself.

A stream may have at most ``max_pending`` batches queued; its reader then waits, so gRPC flow control
slows that trainer instead of daemon memory growing. A queued batch is not acknowledged: if the daemon
dies with it queued, the trainer sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import structlog

from governor_daemon.errors import GovernorError
from governor_daemon.governor import Governor
from governor_daemon.service.streams import StreamHandle
from tolaria.governor.v1 import trainer_service_pb2

log = structlog.get_logger("governor.ingest")

DEFAULT_SLICE_S = 0.001
DEFAULT_MAX_PENDING = 8


class VitalsIngest:
    """The queue of VitalsBatch messages between stream readers and the worker. Event-loop only."""

    def __init__(
        self, governor: Governor, slice_s: float = DEFAULT_SLICE_S, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        if slice_s <= 0 or max_pending < 1:
            raise ValueError(f"slice_s must be > 0 and max_pending >= 1, got {slice_s} and {max_pending}")
        self.governor = governor
        self.slice_s = slice_s
        self.max_pending = max_pending
        self._arrivals: deque[StreamHandle] = deque()  # one entry per queued batch, in arrival order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._work(), name="vitals-ingest")

    async def stop(self) -> None:
        """Stop the worker; batches still queued stay unacknowledged."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def put(self, stream: StreamHandle, batch: trainer_service_pb2.VitalsBatch) -> None:
        """Queue a batch of ``stream`` (waits while the stream already has max_pending queued)."""
        if self._task is None:
            raise RuntimeError("VitalsIngest.start() was not called")
        while len(stream.pending) >= self.max_pending and not stream.closed:
            stream.room.clear()
            await stream.room.wait()
        stream.pending.append(batch)
        self._arrivals.append(stream)
        self._wake.set()

    async def drain(self, stream: StreamHandle) -> None:
        """Judge the queued batches of ``stream`` now (before its next message of another kind).

        The caller holds ``stream.judging``.
        """
        while stream.pending:
            await self.governor.on_vitals(stream, stream.pending.popleft())
        stream.room.set()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            deadline = time.perf_counter() + self.slice_s
            while self._arrivals:
                stream = self._arrivals.popleft()
                if not stream.pending or stream.judging.locked():  # drained already, or its reader drains it
                    continue
                batch = stream.pending.popleft()
                if len(stream.pending) < self.max_pending:
                    stream.room.set()
                if stream.closed:
                    continue
                async with stream.judging:
                    try:
                        await self.governor.on_vitals(stream, batch)
                    except GovernorError as exc:
                        stream.fail(exc)
                    except Exception:  # a bug must not stop ingest for every other stream
                        log.exception("vitals batch failed", run_id=stream.run_id, rank=stream.rank)
                        stream.end("internal error while judging vitals; reconnect")
                if time.perf_counter() >= deadline:
                    await asyncio.sleep(0)
                    deadline = time.perf_counter() + self.slice_s
