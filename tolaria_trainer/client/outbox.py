"""The client's log of messages not yet acknowledged, in seq order, with a bounded size.

Every message the trainer sends gets a seq here (a VitalsBatch gets a range). Messages stay until an
Ack covers them, so a reconnect can resend everything after the Welcome's last durable seq. When the
train-step records held exceed ``capacity_records``, the oldest VitalsBatch entries are dropped and
counted (reported in the next batch's num_dropped_records); validation records and reports are never
dropped. Thread-safe: the trainer thread adds, the sender thread takes and acknowledges.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tolaria.governor.v1 import trainer_service_pb2
from tolaria_trainer.training.vitals import VitalsChunk

Builder = Callable[[int], trainer_service_pb2.AttachRequest]


@dataclass
class _Item:
    first_seq: int
    last_seq: int
    build: Builder | None = None
    chunk: VitalsChunk | None = None
    timeline: int = 0
    built: trainer_service_pb2.AttachRequest | None = None

    @property
    def is_vitals(self) -> bool:
        return self.chunk is not None


class Outbox:
    """Seq assignment, retention until Ack, resend after Welcome, bounded train-step records."""

    def __init__(self, capacity_records: int = 65536) -> None:
        self.capacity_records = capacity_records
        self._items: deque[_Item] = deque()
        self._next_seq = 1
        self._send_index = 0
        self._vitals_records = 0
        self._dropped_pending = 0
        self.num_dropped_records = 0
        self._cond = threading.Condition()

    @property
    def last_seq(self) -> int:
        """Highest seq assigned so far."""
        with self._cond:
            return self._next_seq - 1

    def add_vitals(self, chunk: VitalsChunk, timeline: int) -> int:
        """Queue a chunk of train-step records; returns its last seq."""
        with self._cond:
            first = self._next_seq
            self._next_seq += len(chunk)
            self._items.append(_Item(first, self._next_seq - 1, chunk=chunk, timeline=timeline))
            self._vitals_records += len(chunk)
            self._enforce_bound()
            self._cond.notify_all()
            return first + len(chunk) - 1

    def add(self, build: Builder) -> int:
        """Queue one message built from its seq (validation, snapshot, result, finish); returns the seq."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            self._items.append(_Item(seq, seq, build=build))
            self._cond.notify_all()
            return seq

    def _enforce_bound(self) -> None:
        while self._vitals_records > self.capacity_records:
            for i, item in enumerate(self._items):
                if item.is_vitals:
                    del self._items[i]
                    size = item.last_seq - item.first_seq + 1
                    self._vitals_records -= size
                    self._dropped_pending += size
                    self.num_dropped_records += size
                    if i < self._send_index:
                        self._send_index -= 1
                    break
            else:
                return

    def ack(self, up_to_seq: int) -> None:
        """Forget everything with seq <= up_to_seq."""
        with self._cond:
            self._forget(up_to_seq)

    def rewind(self, last_durable_seq: int) -> None:
        """After a Welcome: forget what is durable, resend everything else from the start."""
        with self._cond:
            self._forget(last_durable_seq)
            self._send_index = 0
            self._cond.notify_all()

    def _forget(self, up_to_seq: int) -> None:
        while self._items and self._items[0].last_seq <= up_to_seq:
            item = self._items.popleft()
            if item.is_vitals:
                self._vitals_records -= item.last_seq - item.first_seq + 1
            self._send_index = max(0, self._send_index - 1)

    def next_to_send(self, timeout_s: float) -> trainer_service_pb2.AttachRequest | None:
        """The next message to transmit, waiting up to ``timeout_s``; None on timeout."""
        with self._cond:
            if self._send_index >= len(self._items):
                self._cond.wait(timeout_s)
            if self._send_index >= len(self._items):
                return None
            item = self._items[self._send_index]
            self._send_index += 1
            if item.built is None and item.build is not None:
                item.built = item.build(item.first_seq)
            chunk, dropped = item.chunk, 0
            if chunk is not None and item.built is None:
                dropped, self._dropped_pending = self._dropped_pending, 0
        if item.built is not None:
            return item.built
        assert chunk is not None
        records = chunk.records()  # may wait for a device copy: on this (sender) thread only
        item.built = trainer_service_pb2.AttachRequest(
            vitals_batch=trainer_service_pb2.VitalsBatch(
                first_seq=item.first_seq,
                timeline=item.timeline,
                step=[r.step for r in records],
                loss=[r.loss for r in records],
                grad_norm=[r.grad_norm for r in records],
                lr=[r.lr for r in records],
                num_dropped_records=dropped,
            )
        )
        return item.built

    def pending(self) -> int:
        """Messages not yet acknowledged."""
        with self._cond:
            return len(self._items)

    def wake(self) -> None:
        """Wake a waiting sender (e.g. to notice a closed connection)."""
        with self._cond:
            self._cond.notify_all()
