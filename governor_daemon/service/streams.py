"""One Attach stream as the daemon sees it: its id, an outbound queue, and the vitals read ahead."""

from __future__ import annotations

import asyncio
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
