"""One Attach stream as the daemon sees it: its id, an outbound queue, and the vitals read ahead."""

from __future__ import annotations

import asyncio
import math
from collections import deque

from governor_daemon.core import events as ev
from governor_daemon.core.effects import EndStream, Message
from governor_daemon.errors import GovernorError
from governor_daemon.service import codec
from tolaria.governor.v1 import trainer_service_pb2


class StreamHandle:
    """Outbound side of one Attach stream. Used from the event loop only; ``deliver`` never blocks."""

    def __init__(self, stream_id: int, peer: str = "") -> None:
        self.id = stream_id
        self.peer = peer
        self.out: asyncio.Queue[trainer_service_pb2.AttachResponse | None] = asyncio.Queue()
        self.closed = False
        self.failure: GovernorError | None = None
        # Vitals read but not yet handled (see service/ingest.py), and whether there is room for more.
        self.pending: deque[ev.Vitals] = deque()
        self.room = asyncio.Event()
        self.room.set()
        # Whose batches these are, for fair ingest (set once the Hello is accepted); whether the stream is
        # in the ingest worker's turns; and when (governor clock) a batch of it was last shed.
        self.principal = ""
        self.run_id = ""
        self.scheduled = False
        self.shed_at = -math.inf

    def bind(self, principal: str, run_id: str) -> None:
        """The stream's Hello was accepted: its batches take turns with those of ``principal``'s other runs."""
        self.principal, self.run_id = principal, run_id

    def deliver(self, message: Message) -> None:
        """Queue a core message for the trainer; an EndStream closes the stream after it."""
        if self.closed:
            return
        self.out.put_nowait(codec.encode_message(message))
        if isinstance(message, EndStream):
            self.close()

    def end(self, reason: str) -> None:
        """Tell the trainer to end this stream, then close it."""
        self.deliver(EndStream(reason))

    def fail(self, exc: GovernorError) -> None:
        """Refuse the stream: it closes, and the servicer ends the call with ``exc``'s status."""
        if self.failure is None:
            self.failure = exc
        self.close()

    def close(self) -> None:
        """No more messages out; the servicer's response loop ends. Vitals read ahead are dropped (unacked)."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.room.set()
        self.out.put_nowait(None)
