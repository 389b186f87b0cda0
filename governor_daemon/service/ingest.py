"""Train-step vitals are handled by one worker task with a share of the event loop, so verdicts never
wait behind them, and in turns, so no principal's flood delays another's.

Every Attach stream has a reader task. Were each reader to hand its own VitalsBatch to the core (a few
hundred microseconds of Python), a validation record would wait in the event loop's FIFO ready queue
behind one batch from every other busy stream, and its verdict would leave late. So readers only queue
their decoded batches here, and one worker hands the queued batches to the core within a budget: a
token bucket that fills at ``share`` seconds per second, up to ``slice_s``, and that every hand-over
(the worker's, and a reader's ``drain``) empties by the time it took. When it is empty the worker rests
until it refills, so train-step records never take more than ``share`` of the event loop, which keeps
the rest for validation records, command results, controller calls and gRPC itself. An idle daemon never
rests: the bucket is full.

**Turns.** The worker serves principals (the authenticated identity; every unauthenticated trainer is
one) in round robin, within a principal its runs in round robin, and within a run its streams: one
hand-over per turn. A batch therefore waits for at most one hand-over of every other principal with
batches queued, however many runs or streams they flood with, and a quiet tenant's batch is judged
while a flooding one's wait and are shed.

**Shedding.** When records arrive faster than the worker's share judges them, batches wait. A batch
that waited longer than ``shed_after_s`` is shed: handed to the core as ``shed``, which gives its records
the non-finite check only (a NaN in it is still a PANIC), journals how many, and tells the trainer in the
Ack's ``num_shed`` (docs/protocol.md, "Shedding"). A shed hand-over takes every overdue batch the stream
has queued, and a stream is shed at most once every ``shed_every_s``: in between, its overdue batches are
judged like the others. So shedding journals at most one entry per stream per ``shed_every_s``, and the
judged hand-overs are bounded by the worker's share; a stream is never left shedding everything while
the worker has time to judge. Validation records are never shed.

Per-stream order is kept: before a reader hands the core any other message of its stream (a
validation record, a snapshot, a command result, a finish, or the end of the stream) it hands over
that stream's queued batches itself (``drain``), shedding those that waited too long. Handling an event
never awaits (service/runtime.py), so nothing else of the stream can interleave.

A stream may have at most ``max_pending`` batches queued; its reader then waits, so gRPC flow control
slows that trainer instead of daemon memory growing. A queued batch is not acknowledged: if the daemon
dies with it queued, the trainer sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque

import structlog

from governor_daemon.core import events as ev
from governor_daemon.errors import GovernorError
from governor_daemon.service.runtime import Governor
from governor_daemon.service.streams import StreamHandle

log = structlog.get_logger("governor.ingest")

DEFAULT_SLICE_S = 0.001
DEFAULT_MAX_PENDING = 8
DEFAULT_SHARE = 0.35
DEFAULT_SHED_AFTER_S = 0.5
DEFAULT_SHED_EVERY_S = 1.0
JOIN_RECORDS = 2048
"""When a stream has several batches queued (the daemon is behind), the worker hands up to this many
consecutive records to the core as one event: less work per record, and one event still short next to
a slice."""


class VitalsIngest:
    """The queue of vitals between stream readers and the worker. Event-loop only."""

    def __init__(
        self,
        governor: Governor,
        slice_s: float = DEFAULT_SLICE_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        share: float = DEFAULT_SHARE,
        shed_after_s: float = DEFAULT_SHED_AFTER_S,
        shed_every_s: float = DEFAULT_SHED_EVERY_S,
    ) -> None:
        if slice_s <= 0 or max_pending < 1 or not 0 < share <= 1 or shed_after_s <= 0 or shed_every_s < 0:
            raise ValueError(
                "slice_s and shed_after_s must be > 0, shed_every_s >= 0, max_pending >= 1 and share in (0, 1], "
                f"got {slice_s}, {shed_after_s}, {shed_every_s}, {max_pending} and {share}"
            )
        self.governor = governor
        self.slice_s = slice_s
        self.max_pending = max_pending
        self.share = share
        self.shed_after_s = shed_after_s
        self.shed_every_s = shed_every_s
        self._budget = slice_s  # seconds of work the worker may do now (the token bucket)
        self._refilled = time.perf_counter()
        # The turns: principal -> run -> streams with batches queued, each level in round-robin order.
        self._turns: OrderedDict[str, OrderedDict[str, deque[StreamHandle]]] = OrderedDict()
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
        if not stream.scheduled:
            stream.scheduled = True
            self._take_turn(stream)
        self._wake.set()

    def drain(self, stream: StreamHandle) -> bool:
        """Hand the queued batches of ``stream`` to the core now (before its next message of another kind);
        False when one of them was refused, which closed the stream: nothing after it may be applied."""
        while stream.pending and not stream.closed:
            self._hand_over(stream)
        stream.room.set()
        return not stream.closed

    def _take_turn(self, stream: StreamHandle) -> None:
        """Queue ``stream`` behind the other streams of its run (its run and principal joining the rounds
        last when they had nothing queued)."""
        runs = self._turns.setdefault(stream.principal, OrderedDict())
        runs.setdefault(stream.run_id, deque()).append(stream)

    def _next_turn(self) -> StreamHandle | None:
        """The stream whose turn it is: the first principal's first run's first stream. The principal and the
        run go to the back of their rounds; the stream leaves the turns (``_work`` queues it again while it
        has batches left)."""
        while self._turns:
            principal, runs = next(iter(self._turns.items()))
            run_id, streams = next(iter(runs.items()))
            stream = streams.popleft()
            if streams:
                runs.move_to_end(run_id)
            else:
                del runs[run_id]
            if runs:
                self._turns.move_to_end(principal)
            else:
                del self._turns[principal]
            if stream.pending and not stream.closed:
                return stream
            stream.scheduled = False  # drained by its reader meanwhile, or gone
        return None

    def _hand_over(self, stream: StreamHandle) -> None:
        """Hand the core the stream's oldest queued batch, joined with the consecutive ones queued behind it:
        shed when it waited longer than shed_after_s and the stream was not shed in the last shed_every_s
        (every overdue one joined), else judged (up to JOIN_RECORDS)."""
        pending, now = stream.pending, self.governor.now()

        def overdue(batch: ev.Vitals) -> bool:
            return now - batch.now > self.shed_after_s

        shed = overdue(pending[0]) and now - stream.shed_at >= self.shed_every_s
        batches = [pending.popleft()]
        records = len(batches[0].steps)
        while pending and pending[0].follows(batches[-1]) and (overdue(pending[0]) if shed else records < JOIN_RECORDS):
            records += len(pending[0].steps)
            batches.append(pending.popleft())
        if shed:
            stream.shed_at = now
        started = time.perf_counter()
        try:
            self.governor.handle(ev.Vitals.joined(batches, shed))
        except GovernorError as exc:
            stream.fail(exc)
        except Exception:  # a bug must not stop ingest for every other stream
            log.exception("vitals batch failed", stream=stream.id)
            stream.end("internal error while judging vitals; reconnect")
        self._refill()
        self._budget -= self._refilled - started

    def _refill(self) -> None:
        """Add to the bucket what the time since the last refill earned, up to one slice."""
        now = time.perf_counter()
        self._budget = min(self.slice_s, self._budget + (now - self._refilled) * self.share)
        self._refilled = now

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ran_since = time.perf_counter()  # the last time the worker let the loop serve everyone else
            while (stream := self._next_turn()) is not None:
                self._hand_over(stream)
                if stream.pending and not stream.closed:
                    self._take_turn(stream)
                else:
                    stream.scheduled = False
                if len(stream.pending) < self.max_pending:
                    stream.room.set()
                if self._budget < 0:  # rest until the bucket is full again: a slice of work per rest
                    await asyncio.sleep((self.slice_s - self._budget) / self.share)
                    self._refill()
                    ran_since = time.perf_counter()
                elif time.perf_counter() - ran_since >= self.slice_s:
                    await asyncio.sleep(0)
                    ran_since = time.perf_counter()
