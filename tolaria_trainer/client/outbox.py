"""The client's log of messages not yet acknowledged: seqs, retention, resend, a bound on vitals.

Every message the trainer sends gets a seq here (a VitalsBatch gets a range). Messages stay until an
Ack covers them, so a reconnect can resend everything after the Welcome's last durable seq. When the
train-step records held exceed ``capacity_records``, the oldest VitalsBatch entries are dropped and
counted; validation records and reports are never dropped. The count of drops not yet reported
travels in ``num_dropped_records`` of the next VitalsBatch actually transmitted (stamped at its first
transmission and resent unchanged); if that batch is itself dropped before an Ack, its count goes
back to the unreported drops, so a drop is reported once or, for a batch that reached the daemon
but was dropped before its Ack arrived, counted as dropped although the daemon has it (an
over-count, never an under-count).

Not thread-safe and free of I/O: the protocol object (``client/protocol.py``) owns it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tolaria.governor.v1 import trainer_service_pb2
from tolaria_trainer.governance.types import VitalsSource


@dataclass
class _Item:
    first_seq: int
    last_seq: int
    message: trainer_service_pb2.AttachRequest | None = None  # built (for vitals: at first transmission)
    vitals: VitalsSource | None = None
    num_dropped_reported: int = 0  # drops this batch carries once built

    @property
    def num_records(self) -> int:
        return self.last_seq - self.first_seq + 1 if self.vitals is not None else 0


class Outbox:
    """Seq assignment, retention until Ack, resend after Welcome, bounded train-step records."""

    def __init__(self, capacity_records: int = 65536) -> None:
        self.capacity_records = capacity_records
        self.num_dropped_records = 0
        self._items: deque[_Item] = deque()
        self._next_seq = 1
        self._send_index = 0
        self._num_vitals_records = 0
        self._num_dropped_unreported = 0

    @property
    def last_seq(self) -> int:
        """Highest seq assigned so far (0 before the first)."""
        return self._next_seq - 1

    @property
    def num_pending(self) -> int:
        """Messages not yet acknowledged."""
        return len(self._items)

    @property
    def num_unacked_records(self) -> int:
        """Train-step and validation records not yet acknowledged (never judged, should it stay so)."""
        return self._num_vitals_records + sum(
            1 for item in self._items if item.message is not None and item.message.HasField("validation_record")
        )

    @property
    def has_unsent(self) -> bool:
        """True when ``take_next`` would return a message."""
        return self._send_index < len(self._items)

    def add_vitals(self, chunk: VitalsSource) -> int:
        """Queue a chunk of train-step records; returns its last seq. May drop the oldest records."""
        first = self._next_seq
        self._next_seq += len(chunk)
        self._items.append(_Item(first, self._next_seq - 1, vitals=chunk))
        self._num_vitals_records += len(chunk)
        self._enforce_bound()
        return self._next_seq - 1

    def add(self, message: trainer_service_pb2.AttachRequest, payload: str) -> int:
        """Queue ``message`` (its ``payload`` field gets the next seq); returns the seq. Never dropped."""
        seq = self._next_seq
        self._next_seq += 1
        getattr(message, payload).seq = seq
        self._items.append(_Item(seq, seq, message=message))
        return seq

    def _enforce_bound(self) -> None:
        while self._num_vitals_records > self.capacity_records:
            index = next((i for i, item in enumerate(self._items) if item.vitals is not None), None)
            if index is None:
                return
            item = self._items[index]
            del self._items[index]
            if index < self._send_index:
                self._send_index -= 1
            self._num_vitals_records -= item.num_records
            self.num_dropped_records += item.num_records
            self._num_dropped_unreported += item.num_records + item.num_dropped_reported

    def ack(self, up_to_seq: int) -> None:
        """Forget everything with seq <= ``up_to_seq`` (durable at the daemon)."""
        while self._items and self._items[0].last_seq <= up_to_seq:
            item = self._items.popleft()
            self._num_vitals_records -= item.num_records
            self._send_index = max(0, self._send_index - 1)

    def rewind(self, last_durable_seq: int) -> None:
        """After a Welcome: forget what is durable and send everything else again from the oldest."""
        self.ack(last_durable_seq)
        self._send_index = 0

    def next_vitals_to_build(self) -> VitalsSource | None:
        """The chunk ``take_next`` would build next (its ``host()`` may wait), or None."""
        if not self.has_unsent:
            return None
        item = self._items[self._send_index]
        return item.vitals if item.message is None else None

    def take_next(self) -> trainer_service_pb2.AttachRequest:
        """The next message to transmit; a VitalsBatch is built (and stamped with drops) the first time."""
        item = self._items[self._send_index]
        self._send_index += 1
        if item.message is None:
            assert item.vitals is not None
            columns = item.vitals.host()
            item.num_dropped_reported, self._num_dropped_unreported = self._num_dropped_unreported, 0
            item.message = trainer_service_pb2.AttachRequest(
                vitals_batch=trainer_service_pb2.VitalsBatch(
                    first_seq=item.first_seq,
                    timeline=columns.timeline,
                    step=columns.steps,
                    loss=columns.losses,
                    grad_norm=columns.grad_norms,
                    lr=columns.lrs,
                    num_dropped_records=item.num_dropped_reported,
                    pin_steps=columns.pins,
                )
            )
        return item.message
