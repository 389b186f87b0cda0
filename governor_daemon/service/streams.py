"""One Attach stream as the daemon sees it: an outbound queue and durable-only acknowledgements."""

from __future__ import annotations

import asyncio
from collections import deque

from governor_daemon.errors import GovernorError
from governor_daemon.journal import GroupCommitter
from tolaria.governor.v1 import trainer_service_pb2


class StreamHandle:
    """Outbound side of one Attach stream. Used from the event loop only.

    ``send`` never blocks. ``track_ack(entry_seq, msg_seq)`` promises an Ack(msg_seq) once journal
    entry ``entry_seq`` is durable; acks go out in order and never before their entry is fsynced.
    """

    def __init__(self, peer: str = "") -> None:
        self.peer = peer
        self.out: asyncio.Queue[trainer_service_pb2.AttachResponse | None] = asyncio.Queue()
        self.run_id = ""
        self.rank = -1
        self.incarnation_id = ""
        self.generation = 0
        self.closed = False
        self.failure: GovernorError | None = None
        # VitalsBatch messages read but not yet judged (see service/ingest.py), and whether there is room.
        self.pending: deque[trainer_service_pb2.VitalsBatch] = deque()
        self.room = asyncio.Event()
        self.room.set()
        # Held while any message of this stream is judged (by its reader or the ingest worker): a stream's
        # messages are judged one at a time, in order, even when judging one awaits a journal commit.
        self.judging = asyncio.Lock()
        self._acks: deque[tuple[int, int]] = deque()
        self._ack_wake = asyncio.Event()
        self._acked = 0

    def bind(self, run_id: str, rank: int, incarnation_id: str, generation: int) -> None:
        """Attach this stream to a (run, rank, incarnation, generation)."""
        self.run_id, self.rank, self.incarnation_id, self.generation = (
            run_id,
            rank,
            incarnation_id,
            generation,
        )

    def send(self, message: trainer_service_pb2.AttachResponse) -> None:
        """Queue a message for the trainer."""
        if not self.closed:
            self.out.put_nowait(message)

    def end(self, reason: str) -> None:
        """Tell the trainer to end this stream, then close it."""
        if self.closed:
            return
        self.send(trainer_service_pb2.AttachResponse(stream_end=trainer_service_pb2.StreamEnd(reason=reason)))
        self.close()

    def fail(self, exc: GovernorError) -> None:
        """Refuse the stream: it closes, and the servicer ends the call with ``exc``'s status."""
        if self.failure is None:
            self.failure = exc
        self.close()

    def close(self) -> None:
        """No more messages out; the servicer's response loop ends. Queued vitals are dropped (unacked)."""
        self.closed = True
        self.pending.clear()
        self.room.set()
        self.out.put_nowait(None)

    def track_ack(self, entry_seq: int, msg_seq: int) -> None:
        """Ack ``msg_seq`` once journal entry ``entry_seq`` is durable."""
        self._acks.append((entry_seq, msg_seq))
        self._ack_wake.set()

    async def ack_loop(self, journal: GroupCommitter) -> None:
        """Send Acks as their entries become durable, until the stream closes."""
        while not self.closed:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            while self._acks and not self.closed:
                # The highest entry, not the last: should entries ever be tracked out of order, waiting for the
                # last one could return at once forever, and this loop would spin without yielding.
                await journal.wait_durable(max(entry for entry, _ in self._acks))
                durable = journal.durable_seq
                up_to = 0
                while self._acks and self._acks[0][0] <= durable:
                    up_to = max(up_to, self._acks.popleft()[1])
                if up_to > self._acked:
                    self._acked = up_to
                    self.send(trainer_service_pb2.AttachResponse(ack=trainer_service_pb2.Ack(up_to_seq=up_to)))
