"""What comes out of the core: data that the adapter carries out in one fixed order.

``GovernorCore.handle`` returns an ``Effects``: journal entries to append, messages for streams, and
a reply for a controller. ``core/apply.Applier``, which the daemon (``service/runtime.py``) and the
simulation share, applies them so:

1. every entry is appended, in order, at once (the core's state already includes them);
2. if any entry is ``sync`` the journal commits now, otherwise within the group-commit interval;
3. the messages are released only when the last entry appended so far is durable, in the order they
   were produced across all events (``Outbound``). So no Ack, Verdict, Command or Welcome ever tells a
   trainer about a state the journal could still lose, and a later event's message never overtakes
   an earlier one's.

A refused event raises ``GovernorError`` from ``handle`` instead, having changed nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from governor_daemon.policy import Command, Decision, PolicyConfig, RunState, Verdict
from tolaria.journal import Record


@dataclass(frozen=True)
class Append:
    """A journal entry; ``sync``: commit it now (a command follows it)."""

    run: str
    kind: str
    payload: dict[str, Any]
    sync: bool = False


@dataclass(frozen=True)
class Welcome:
    """The answer to a Hello."""

    generation: int
    policy: PolicyConfig
    last_durable_seq: int
    timeline: int
    run_state: RunState
    random_guess_loss: float | None
    ignored_policy_fields: tuple[str, ...]
    train_verification_steps: int = 0
    """The train-stream detectors' longest onset-to-alarm delay (``policy.steps.verification_steps``)."""
    run_life: int = 0
    """Which life of its run id the run is (a run forgotten and created again is another)."""
    last_snapshot: tuple[int, int, str] | None = None
    """The rank's last published snapshot (timeline, step, digest) in shared memory, if any."""


@dataclass(frozen=True)
class Ack:
    """Everything of the stream's incarnation up to ``up_to_seq`` is durable; ``num_shed`` of the records
    this Ack newly covers were acknowledged without being judged (the daemon was behind)."""

    up_to_seq: int
    num_shed: int = 0


@dataclass(frozen=True)
class VerdictOut:
    """The judgement of validation record ``seq`` (of ``timeline``, ``step``)."""

    seq: int
    timeline: int
    step: int
    verdict: Verdict
    reason: str
    snapshot_allowed: bool
    run_state: RunState

    @classmethod
    def of(cls, seq: int, decision: Decision) -> VerdictOut:
        """The verdict a decision gives record ``seq``."""
        return cls(
            seq,
            decision.timeline,
            decision.step,
            decision.verdict,
            decision.reason,
            decision.snapshot_allowed,
            decision.run_state,
        )


@dataclass(frozen=True)
class CommandOut:
    """A command, stamped with the generation of the stream it goes to."""

    command: Command
    generation: int


@dataclass(frozen=True)
class Resync:
    """Records up to ``up_to_seq`` were stale and not judged; adopt ``timeline``."""

    timeline: int
    up_to_seq: int
    reason: str
    run_state: RunState


@dataclass(frozen=True)
class EndStream:
    """Ask the trainer to end this stream (it reconnects); the stream closes after it. ``end_process``: the
    stall watchdog's order to end the trainer's process instead, so its launcher restarts it."""

    reason: str
    end_process: bool = False


Message = Welcome | Ack | VerdictOut | CommandOut | Resync | EndStream


@dataclass(frozen=True)
class Send:
    """A message for one stream."""

    stream: int
    message: Message


@dataclass
class Effects:
    """Everything one event caused."""

    entries: list[Append] = field(default_factory=list)
    sends: list[Send] = field(default_factory=list)
    reply: Any = None

    def append(self, run: str, kind: str, payload: dict[str, Any], sync: bool = False) -> None:
        """Add a journal entry."""
        self.entries.append(Append(run, kind, payload, sync))

    def append_record(self, run: str, record: Record, sync: bool = False) -> None:
        """Add a journal entry: the record's kind and payload (``tolaria.journal``)."""
        self.append(run, record.KIND, record.to_payload(), sync)

    def send(self, stream: int | None, message: Message) -> None:
        """Add a message for ``stream`` (nothing when the rank has no stream)."""
        if stream is not None:
            self.sends.append(Send(stream, message))

    @property
    def sync(self) -> bool:
        """True if the journal must commit now."""
        return any(e.sync for e in self.entries)


class Outbound:
    """Messages waiting for the journal: released, in production order, once their entry is durable.

    ``push(after_seq, sends)`` holds ``sends`` until entry ``after_seq`` is durable; ``release(durable)``
    returns what may go now. Acks of one stream released together collapse into the highest one, which
    carries their ``num_shed`` summed.
    """

    def __init__(self) -> None:
        self._held: deque[tuple[int, Send]] = deque()

    def push(self, after_seq: int, sends: list[Send]) -> None:
        """Hold ``sends`` until entry ``after_seq`` is durable."""
        self._held.extend((after_seq, s) for s in sends)

    def release(self, durable_seq: int) -> list[Send]:
        """The sends whose entry is durable, in order (FIFO: nothing overtakes an earlier send)."""
        out: list[Send] = []
        held = self._held
        while held and held[0][0] <= durable_seq:
            out.append(held.popleft()[1])
        return _collapse_acks(out) if len(out) > 1 else out

    def __len__(self) -> int:
        return len(self._held)


def _collapse_acks(sends: list[Send]) -> list[Send]:
    """Each stream's Acks as its last one, carrying the sum of their ``num_shed`` (no shed record goes
    untold)."""
    last: dict[int, tuple[int, int]] = {}  # stream -> (index of its last Ack, num_shed summed)
    for i, s in enumerate(sends):
        if isinstance(s.message, Ack):
            last[s.stream] = (i, last.get(s.stream, (0, 0))[1] + s.message.num_shed)
    return [
        Send(s.stream, replace(s.message, num_shed=last[s.stream][1])) if isinstance(s.message, Ack) else s
        for i, s in enumerate(sends)
        if not isinstance(s.message, Ack) or last[s.stream][0] == i
    ]
