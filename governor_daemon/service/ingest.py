"""Train-step vitals are handled by one worker task, so no stream's validation record waits behind them.

Every Attach stream has a reader task. Were each reader to hand its own VitalsBatch to the core (a few
hundred microseconds of Python), a validation record would wait in the event loop's FIFO ready queue
behind one batch from every other busy stream, and its verdict would leave late. So readers only queue
their decoded batches here, and one worker hands the queued batches of all streams to the core in
arrival order, in slices of ``slice_s`` between which the event loop serves everyone else.

Per-stream order is kept: before a reader hands the core any other message of its stream (a
validation record, a snapshot, a command result, a finish, or the end of the stream) it hands over
that stream's queued batches itself (``drain``). Handling an event never awaits (service/runtime.py),
so nothing else of the stream can interleave.

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

from governor_daemon.core import events as ev
from governor_daemon.errors import GovernorError
from governor_daemon.service.runtime import Governor
from governor_daemon.service.streams import StreamHandle

log = structlog.get_logger("governor.ingest")

DEFAULT_SLICE_S = 0.001
DEFAULT_MAX_PENDING = 8
JOIN_RECORDS = 8192
"""When a stream has several batches queued (the daemon is behind), the worker hands up to this many
consecutive records to the core as one event: less work per record, and every record still judged."""


class VitalsIngest:
    """The queue of vitals between stream readers and the worker. Event-loop only."""

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

    async def put(self, stream: StreamHandle, batch: ev.Vitals) -> None:
        """Queue a batch of ``stream`` (waits while the stream already has max_pending queued)."""
        if self._task is None:
            raise RuntimeError("VitalsIngest.start() was not called")
        while len(stream.pending) >= self.max_pending and not stream.closed:
            stream.room.clear()
            await stream.room.wait()
        stream.pending.append(batch)
        self._arrivals.append(stream)
        self._wake.set()

    def drain(self, stream: StreamHandle) -> None:
        """Hand the queued batches of ``stream`` to the core now (before its next message of another kind)."""
        while stream.pending and not stream.closed:
            self.governor.handle(stream.pending.popleft())
        stream.room.set()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            deadline = time.perf_counter() + self.slice_s
            while self._arrivals:
                stream = self._arrivals.popleft()
                if not stream.pending:  # drained already by its reader
                    continue
                batches = [stream.pending.popleft()]
                records = len(batches[0].steps)
                while stream.pending and stream.pending[0].follows(batches[-1]) and records < JOIN_RECORDS:
                    records += len(stream.pending[0].steps)
                    batches.append(stream.pending.popleft())
                if len(stream.pending) < self.max_pending:
                    stream.room.set()
                if stream.closed:
                    continue
                try:
                    self.governor.handle(ev.Vitals.joined(batches))
                except GovernorError as exc:
                    stream.fail(exc)
                except Exception:  # a bug must not stop ingest for every other stream
                    log.exception("vitals batch failed", stream=stream.id)
                    stream.end("internal error while judging vitals; reconnect")
                if time.perf_counter() >= deadline:
                    await asyncio.sleep(0)
                    deadline = time.perf_counter() + self.slice_s
