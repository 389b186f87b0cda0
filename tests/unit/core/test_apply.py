"""The one applier of effects (core/apply.py), socket-free against an in-memory journal whose durability the
test moves by hand: no message leaves before every entry appended before it is durable, messages leave in
the order the core produced them, a sync entry commits at once, and an entry the journal refuses undoes its
event and sends nothing."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from governor_daemon.core import CoreOptions, GovernorCore
from governor_daemon.core import events as ev
from governor_daemon.core.apply import Applier
from governor_daemon.core.effects import Ack, CommandOut, Effects, Send, Welcome
from governor_daemon.policy import PolicyConfig
from tolaria.journal import EntryKind


class _Entry:
    def __init__(self, seq: int) -> None:
        self.seq = seq


class MemoryJournal:
    """Entries appended in memory; durable only up to what ``make_durable`` (or an honoured ``commit_now``)
    says. ``refuse``: the next append raises, as a journal that cannot encode an entry does."""

    def __init__(self, honour_sync: bool) -> None:
        self.appended: list[tuple[str, str, dict[str, Any]]] = []
        self.durable = 0
        self.honour_sync = honour_sync
        self.refuse = False
        self.applier: Applier | None = None

    @property
    def last_seq(self) -> int:
        return len(self.appended)

    @property
    def durable_seq(self) -> int:
        return self.durable

    def append_event(self, items: list[tuple[str, str, dict[str, Any]]]) -> list[_Entry]:
        if self.refuse:
            raise ValueError("the journal cannot encode this entry")
        first = len(self.appended) + 1
        self.appended.extend(items)
        return [_Entry(first + i) for i in range(len(items))]

    def commit_now(self) -> None:
        if self.honour_sync:
            self.make_durable(self.last_seq)

    def make_durable(self, seq: int) -> None:
        """Entries up to ``seq`` are on disk: tell the applier, as the group committer's ``on_durable`` does."""
        if seq <= self.durable:
            return
        self.durable = seq
        assert self.applier is not None
        self.applier.durable(seq)


class RecordingCore(GovernorCore):
    """A core that notes, for every message an event produces, the seq it must wait for: the journal's last
    seq once the event's own entries are appended (the test's reckoning, independent of the applier's)."""

    def __init__(self, journal: MemoryJournal) -> None:
        super().__init__(CoreOptions(defaults=PolicyConfig()))
        self.journal = journal
        self.produced: dict[int, tuple[int, int, Send]] = {}  # id(send) -> (production index, waits for, send)
        self.acks: list[tuple[int, int, Send]] = []
        self.count = 0

    @contextmanager
    def transaction(self, event: ev.Event) -> Iterator[Effects]:
        with GovernorCore.transaction(self, event) as fx:
            waits_for = self.journal.last_seq + len(fx.entries)
            yield fx  # the applier appends the entries here; a refused append raises out of the yield
        for send in fx.sends:
            self.count += 1
            if isinstance(send.message, Ack):
                self.acks.append((self.count, waits_for, send))
            else:
                self.produced[id(send)] = (self.count, waits_for, send)


class World:
    """A core, its applier and journal, and every release checked as it happens."""

    def __init__(self, honour_sync: bool = False) -> None:
        self.journal = MemoryJournal(honour_sync)
        self.core = RecordingCore(self.journal)
        self.applier = Applier(self.core, self.journal, self.released)
        self.journal.applier = self.applier
        self.delivered: list[Send] = []
        self.last_index = -1
        self.now = 100.0
        self.seqs: dict[int, int] = {}
        self.apply(ev.Start(self.now))

    def apply(self, event: ev.Event) -> None:
        self.applier.apply(event)

    def released(self, durable_seq: int, sends: list[Send]) -> None:
        """Every message leaving waited for its entries, and none overtakes an earlier one."""
        assert durable_seq == self.journal.durable_seq
        for send in sends:
            if isinstance(send.message, Ack):
                index, waits_for = self._ack(send)
            else:
                index, waits_for, _ = self.core.produced.pop(id(send))
            assert waits_for <= durable_seq, f"{send} left before entry {waits_for} was durable"
            assert index > self.last_index, f"{send} overtook a message produced before it"
            self.last_index = index
            self.delivered.append(send)

    def _ack(self, send: Send) -> tuple[int, int]:
        """The Ack's production (index, waits for); Acks of its stream produced before it and released with it
        collapsed into it (``Outbound``), so they leave the record too."""
        assert isinstance(send.message, Ack)
        up_to = send.message.up_to_seq
        match = next(r for r in self.core.acks if r[2].stream == send.stream and r[2].message == Ack(up_to))
        self.core.acks = [r for r in self.core.acks if r[2].stream != send.stream or r[0] > match[0]]
        return match[0], match[1]

    def attach(self, stream: int, run: str = "r") -> None:
        self.seqs[stream] = 0
        self.apply(ev.Attach(stream, run, 0, 1, f"i{stream}", "t", {}, None, 10, "", "p", "c", self.now))

    def vitals(self, stream: int, loss: float) -> None:
        self.seqs[stream] += 1
        seq = self.seqs[stream]
        self.apply(ev.Vitals(stream, seq, 0, np.array([seq]), [loss], [], 0, self.now))


def test_a_message_waits_for_the_entries_appended_before_it() -> None:
    w = World()
    w.attach(1)
    assert w.journal.last_seq == 3  # daemon_start, run_created, attach
    assert not w.delivered
    w.journal.make_durable(2)
    assert not w.delivered, "the Welcome left before the attach entry was durable"
    w.journal.make_durable(3)
    assert [type(s.message) for s in w.delivered] == [Welcome]
    w.vitals(1, 2.0)
    assert len(w.delivered) == 1
    w.journal.make_durable(w.journal.last_seq)
    assert w.delivered[-1] == Send(1, Ack(1))


def test_a_message_of_an_event_without_entries_leaves_at_once_when_everything_is_durable() -> None:
    w = World()
    w.attach(1)
    w.vitals(1, 2.0)
    w.journal.make_durable(w.journal.last_seq)
    w.seqs[1] -= 1
    w.vitals(1, 2.0)  # resent: acknowledged again, nothing journaled
    assert w.delivered[-1] == Send(1, Ack(1))
    assert len(w.delivered) == 3


def test_a_sync_entry_commits_now_and_its_command_leaves_with_it() -> None:
    w = World(honour_sync=True)
    w.attach(1)  # daemon_start was sync: durable; the attach is not
    assert w.journal.durable_seq == 1
    assert not w.delivered
    w.vitals(1, math.nan)  # a panic: the vitals entry and its ROLLBACK are sync
    assert w.journal.durable_seq == w.journal.last_seq
    assert [type(s.message) for s in w.delivered] == [Welcome, CommandOut, Ack]
    assert w.journal.appended[-1][1] == EntryKind.COMMAND


def test_a_sync_entry_whose_commit_is_in_flight_holds_its_command() -> None:
    w = World(honour_sync=False)
    w.attach(1)
    w.vitals(1, math.nan)
    assert not w.delivered
    w.journal.make_durable(w.journal.last_seq - 1)  # the command entry is still in flight
    assert [type(s.message) for s in w.delivered] == [Welcome]
    w.journal.make_durable(w.journal.last_seq)
    assert [type(s.message) for s in w.delivered] == [Welcome, CommandOut, Ack]


def test_an_entry_the_journal_refuses_undoes_its_event_and_sends_nothing() -> None:
    w = World()
    w.attach(1)
    w.journal.make_durable(w.journal.last_seq)
    before, appended = w.core.checkpoint(), list(w.journal.appended)
    w.journal.refuse = True
    with pytest.raises(ValueError, match="cannot encode"):
        w.vitals(1, 2.0)
    assert w.core.checkpoint() == before
    assert w.journal.appended == appended
    assert len(w.applier.outbound) == 0
    w.journal.refuse = False
    w.seqs[1] -= 1
    w.vitals(1, 2.0)  # the same record again is new: nothing of it was accepted
    w.journal.make_durable(w.journal.last_seq)
    assert w.delivered[-1] == Send(1, Ack(1))


@pytest.mark.parametrize("seed", range(20))
def test_no_message_ever_leaves_before_its_entries_are_durable(seed: int) -> None:
    """Seeded interleavings of several runs' events (attaches, healthy and panicking batches, ticks) with
    partial commits: ``World.released`` checks every message as it leaves."""
    rng = random.Random(seed)
    w = World(honour_sync=rng.random() < 0.5)
    streams: list[int] = []
    for _ in range(200):
        roll = rng.random()
        if roll < 0.1 or not streams:
            streams.append(len(streams) + 1)
            w.attach(streams[-1], run=f"r{streams[-1]}")
        elif roll < 0.7:
            w.vitals(rng.choice(streams), math.nan if rng.random() < 0.05 else rng.uniform(0.5, 2.0))
        elif roll < 0.8:
            w.now += rng.random() * 5
            w.apply(ev.Tick(w.now))
        else:
            w.journal.make_durable(rng.randint(w.journal.durable_seq, w.journal.last_seq))
    w.journal.make_durable(w.journal.last_seq)
    assert not w.core.produced, "every message left once everything was durable"
    assert not w.core.acks, "every Ack left once everything was durable"
    assert len(w.applier.outbound) == 0
