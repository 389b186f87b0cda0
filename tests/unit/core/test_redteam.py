"""Red-team probes of the core's invariants (each test fails while its defect is present)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from governor_daemon.core import CoreOptions, GovernorCore
from governor_daemon.core import events as ev
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.journal.verify import verify_journal
from governor_daemon.journal.writer import Journal
from governor_daemon.policy import CommandKind, PolicyConfig, RunState
from tests.unit.core.test_core import Harness, commands
from tolaria.journal import EntryKind


def finish(h: Harness, stream: int) -> Any:
    return h.handle(ev.Finish(stream, h.seq(stream), "FINISH_STATUS_COMPLETED", 1, 0, "", 1.0, None, None, h.now))


def test_a_finished_rank_is_never_marked_stalled_by_a_rank_deadline() -> None:
    """Rank 0 finished; rank 1 keeps validating: each step waits for rank 0 and marks it STALLED."""
    h = Harness(rank_deadline_s=1.0)
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    finish(h, 1)
    h.validation(2, 10, 2.0)
    h.now += 2
    h.handle(ev.Tick(h.now))
    assert 0 not in h.run().policy.roster.stalled
    assert h.run().policy.state is not RunState.STALLED


def test_a_stall_cleared_by_progress_can_stall_again() -> None:
    """The tracker flags a stall; a record at the same step is no progress (the rank stays STALLED); the
    next step clears it; a later silence is a stall again (the tracker's latch used to outlive a clear)."""
    h = Harness(stall_timeout_s=10.0)
    h.attach(1)
    h.vitals(1, [5], [0.5])
    h.now += 11
    h.handle(ev.Tick(h.now))
    assert h.run().policy.state is RunState.STALLED
    h.validation(1, 5, 0.5)  # validation at the step of the last vitals: not an advance
    assert h.run().policy.state is RunState.STALLED
    h.vitals(1, [6], [0.5])
    assert h.run().policy.state is not RunState.STALLED
    h.now += 1000
    h.handle(ev.Tick(h.now))
    assert h.run().policy.state is RunState.STALLED, "a silent rank is STALLED again"


def test_finish_of_the_last_unanswered_rank_closes_the_open_command() -> None:
    """2 ranks, ROLLBACK open: rank 1 answers, rank 0 finishes instead of answering. Every unfinished rank
    has answered, so the command must close; it stays open and times out into a HALT."""
    h = Harness(command_timeout_s=5.0)
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    cmd = commands(h.vitals(1, [5], [math.nan]))[0]
    h.result(2, cmd)
    finish(h, 1)
    assert h.run().policy.ledger.open is None, "every unfinished rank answered"
    fx = h.handle(ev.Tick(h.now + 6))
    assert not [c for c in commands(fx) if c.kind is CommandKind.HALT]
    assert h.run().policy.state is not RunState.HALTED


def test_an_event_whose_last_entry_is_lost_leaves_no_trace(tmp_path: Path) -> None:
    """A NaN train step is one event with two entries (the vitals entry carrying the decision and its
    effects, then the `command` entry). A segment used to rotate on the event's first entry, with a
    checkpoint holding the whole event's state, and the group committer could take the first entry alone;
    a crash then kept the command's state and charge without its `command` entry. Now a checkpoint is taken
    between events, an event's entries are appended together, and an event torn on disk is moved aside
    whole at start-up: the state, the ledger and the journal agree."""
    options = CoreOptions(defaults=PolicyConfig())
    core = GovernorCore(options)
    journal = Journal(tmp_path, segment_bytes=1)  # every event starts a segment
    journal.open()
    journal.checkpoint_provider = core.checkpoint

    def apply(event: ev.Event) -> None:  # what service/runtime.py does
        journal.rotate_if_due(0.0)
        fx = core.handle(event)
        for append, entry in zip(
            fx.entries, journal.append_event([(a.run, a.kind, a.payload) for a in fx.entries], 0.0), strict=True
        ):
            if append.run:
                core.note_appended(append.run, entry.seq)
        journal.write_pending()

    apply(ev.Start(0.0))
    apply(ev.Attach(1, "r", 0, 1, "i0", "t", {}, None, 10, "", "p", "c", 0.0))
    apply(ev.Vitals(1, 1, 0, np.array([1]), [math.nan], [], 0, 0.0))  # vitals(decision) + command
    journal.close()
    last = sorted(tmp_path.glob("journal-*.jsonl"))[-1]
    lines = last.read_bytes().splitlines(keepends=True)
    assert b'"kind":"command"' in lines[-1]
    last.write_bytes(b"".join(lines[:-1]))  # the crash: the event's last entry never reached the disk

    reopened = Journal(tmp_path, segment_bytes=1)
    recovery = reopened.open()
    restored = GovernorCore(options)
    restored.restore(recovery.checkpoint, recovery.entries)
    reopened.close()
    assert any("has no last entry" in note for note in recovery.moved_aside)
    charged = sum(
        item.entry.payload["command"]["punishment_reward"]
        for path in list_segments(tmp_path)
        for item in read_segment(path)
        if isinstance(item, LocatedEntry) and item.entry.kind == EntryKind.COMMAND
    )
    policy = restored.registry.runs["r"].policy
    assert (policy.ledger.total_punishment, charged, policy.ledger.open) == (0.0, 0, None)
    assert verify_journal(tmp_path).ok


def test_a_verdict_goes_only_to_the_incarnation_whose_record_it_judges() -> None:
    """Rank 0 (incarnation i0) reports step 10 as seq 1 and dies; its restart (i2) attaches and sends its
    own seq 1 (a vitals batch). When rank 1 completes step 10, the Verdict naming seq 1 goes to i2's stream:
    the new process reads a judgement of a record it never sent (its seq space restarted)."""
    from governor_daemon.core.effects import VerdictOut

    h = Harness()
    h.attach(1, world_size=2, rank=0, inc="i0")
    h.attach(2, world_size=2, rank=1, inc="i1")
    h.validation(1, 10, 2.0)  # i0 seq 1
    h.handle(ev.Detach(1, h.now))
    h.attach(3, world_size=2, rank=0, inc="i2")
    h.vitals(3, [1], [0.5])  # i2 seq 1
    fx = h.validation(2, 10, 2.0)
    to_new = [s.message for s in fx.sends if s.stream == 3 and isinstance(s.message, VerdictOut)]
    assert not to_new, f"i2 got a verdict for i0's seq: {to_new}"


def test_the_journal_ledger_of_a_reused_run_id_matches_its_total() -> None:
    """A forgotten (or evicted, expired) run id can be created again: the ledger of a run is its `command`
    entries since its latest `run_created` (docs/protocol.md, "Punishment ledger"; the rule used to count
    the old run's charges too)."""
    h = Harness()
    h.attach(1)
    h.vitals(1, [1], [math.nan])  # ROLLBACK, -10
    h.handle(ev.Detach(1, h.now))
    h.handle(ev.Tick(h.now + h.run().policy.config.command_timeout_s + 1))  # never answered: HALT, 0
    h.handle(ev.ForgetRun("r", "cleanup", "op", h.now))
    h.attach(2, inc="i1")
    own = [(kind, p) for run, kind, p in h.entries if run == "r"]
    since = max(i for i, (kind, _) in enumerate(own) if kind == "run_created")
    charged = sum(p["command"]["punishment_reward"] for kind, p in own[since:] if kind == "command")
    assert sum(p["command"]["punishment_reward"] for kind, p in own if kind == "command") == -10.0
    assert charged == h.run().policy.ledger.total_punishment


def test_a_late_result_of_a_command_no_longer_remembered_is_accepted() -> None:
    """More than RECENT_COMMANDS commands later, a result still in flight was refused (INVALID_ARGUMENT,
    permanent for the trainer). It is journaled as late instead; only ids never issued are refused."""
    h = Harness()
    h.attach(1)
    first = commands(h.handle(ev.Halt("r", "stop", "op", h.now)))[0]
    for _ in range(6):
        h.result(1, commands(h.handle(ev.Resume("r", "go", "op", h.now)))[0])
        h.result(1, commands(h.handle(ev.Halt("r", "stop", "op", h.now)))[0])
    fx = h.result(1, first)
    assert fx.entries[0].payload["notices"][0]["kind"] == "late_command_result"


def test_a_rank_that_never_attached_is_not_stalled_after_a_restart() -> None:
    """Before a restart a rank that never attached has no stall clock; after one it had, and became STALLED."""
    h = Harness(stall_timeout_s=10.0)
    h.attach(1, world_size=2, rank=0)
    restarted = GovernorCore(h.core.options)
    restarted.restore(h.core.checkpoint(), [])
    restarted.handle(ev.Start(0.0))
    fx = restarted.handle(ev.Tick(100.0))
    stalled = [e.payload["rank"] for e in fx.entries if e.kind == EntryKind.STALL]
    assert stalled == [0], "only the rank that was attached can stall"


def test_huge_finite_losses_are_blow_ups_and_never_break_the_statistics() -> None:
    """Red-team finding (high): twelve validations of 1.7e308 overflowed math.fsum; every later validation of the
    run ended its stream INTERNAL, ListRuns and GetPanicState failed for every caller (after a restart too),
    and the seq was accepted before the decision raised, so a record was lost. A loss beyond the blow-up
    ceiling is now a PANIC, like a non-finite one, and never enters the history."""
    from governor_daemon.service import codec

    h = Harness()
    h.attach(1)
    step = h.warm(1)
    for i in range(12):
        step += 10
        fx = h.handle(ev.Validation(1, h.seq(1), h.run().policy.timeline, step, i, 1.7e308, None, {}, h.now))
        (decision,) = [a.payload["decision"] for a in fx.entries if a.kind == EntryKind.DECISION]
        assert decision["rule"] == "non_finite"
        assert "beyond the ceiling" in decision["reason"]
        for command in commands(fx):
            h.result(1, command)
    assert max(h.run().policy.validation.detector.history) < 10
    status = codec.run_status_to_proto(h.run(), 0.0, h.now)
    assert math.isfinite(status.history_mean)
    assert h.rebuilt() == h.core.checkpoint()


def test_a_death_penalty_beyond_its_bound_is_refused_from_update_policy_and_hello() -> None:
    """Red-team finding (medium): death_penalty=1e308 was accepted; the second punished command made the total
    -inf, the journal refused the entry after the state changed, and every later batch ended its stream."""
    import pytest

    from governor_daemon.errors import InvalidInputError

    h = Harness()
    h.attach(1)
    before = h.core.checkpoint()
    with pytest.raises(InvalidInputError, match=r"death_penalty must be <= 1e\+06, got 1e\+308"):
        h.handle(ev.UpdatePolicy("r", {"death_penalty": 1e308}, "op", h.now))
    assert h.core.checkpoint() == before
    with pytest.raises(InvalidInputError, match="death_penalty must be <= 1e"):
        h.handle(ev.Attach(9, "r2", 0, 1, "i9", "t", {"death_penalty": 1e308}, None, 10, "", "p", "c", h.now))
    assert h.core.checkpoint() == before


def test_a_halts_result_says_halted_not_a_restore() -> None:
    """Hardening 2: a HALT's command result read "restored step 150 in 0.0 ms" in `audit show` and `status`,
    although a HALT restores nothing. The entry names the command's kind, and the line says what it did."""
    from governor_daemon.cli.entries import describe, entry_line

    h = Harness()
    h.attach(1)
    h.vitals(1, list(range(150)), [0.5] * 150)
    halt = commands(h.handle(ev.Halt("r", "stop", "op", h.now)))[0]
    fx = h.result(1, halt, new_timeline=0)
    [entry] = [e for e in fx.entries if e.kind == EntryKind.COMMAND_RESULT]
    assert entry.payload["command_kind"] == "halt"
    line = describe(entry.kind, entry.payload)
    assert line == "command 1 (halt) succeeded; halted on timeline 0", line
    assert entry_line(7, "2026-01-01T00:00:00.000000Z", "r", entry.kind, entry.payload).split()[3] == "r0"
    rollback = Harness()
    rollback.attach(1)
    command = commands(rollback.vitals(1, [1], [math.nan]))[0]
    [entry] = [e for e in rollback.result(1, command).entries if e.kind == EntryKind.COMMAND_RESULT]
    assert describe(entry.kind, entry.payload).startswith("command 1 (rollback) succeeded; timeline 1, ")


def test_the_stall_watchdog_ends_only_a_stalled_ranks_stream_and_lets_its_restart_attach() -> None:
    """end_stalled_ranks: two ranks, rank 1 silent past the threshold. The tick marks it STALLED, the STALL
    entry says end_process, rank 1's stream (only) gets StreamEnd(end_process) and is unbound in the core
    with a DETACH (the runtime reports no end for a stream it ended), so its restart attaches as a new
    incarnation instead of being refused as a second live process; the rebuilt state agrees with memory."""
    from governor_daemon.core.effects import EndStream

    h = Harness(stall_timeout_s=10.0, end_stalled_ranks=True)
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    h.vitals(1, [5], [0.5])
    h.vitals(2, [5], [0.5])
    h.now += 6
    h.vitals(1, [6], [0.5])  # rank 0 progresses; rank 1 does not
    h.now += 6

    def journal_refuses_the_tick() -> None:
        with h.core.transaction(ev.Tick(h.now)) as refused:
            assert refused.sends, "the watchdog's tick"
            raise OSError("the journal refused the tick's entries")

    with pytest.raises(OSError, match="refused"):
        journal_refuses_the_tick()
    assert h.run().ranks[1].stream == 2, "the undo point covers the binding"
    assert 2 in h.core.streams
    assert 1 not in h.run().policy.roster.stalled
    fx = h.handle(ev.Tick(h.now))
    stalls = [e.payload for e in fx.entries if e.kind == EntryKind.STALL]
    assert [(p["rank"], p["end_process"]) for p in stalls] == [(1, True)]
    ends = [(s.stream, s.message) for s in fx.sends if isinstance(s.message, EndStream)]
    assert [(stream, m.end_process) for stream, m in ends] == [(2, True)]
    assert "made no progress" in ends[0][1].reason
    assert [e.kind for e in fx.entries] == [EntryKind.STALL, EntryKind.DETACH]
    assert h.run().ranks[1].stream is None
    assert h.run().ranks[0].stream == 1
    h.seqs[3] = 0
    welcome = h.handle(ev.Attach(3, "r", 1, 2, "i1-restarted", "t", {}, None, 10, "", "p", "c", h.now))
    assert any(e.kind == EntryKind.ATTACH for e in welcome.entries)
    assert h.rebuilt()["runs"]["r"]["ranks"]["1"]["incarnation_id"] == "i1-restarted"


def test_without_the_watchdog_a_stalled_rank_keeps_its_stream() -> None:
    """The default (end_stalled_ranks false): STALLED is reported only; the stream stays bound."""
    h = Harness(stall_timeout_s=10.0)
    h.attach(1)
    h.vitals(1, [5], [0.5])
    h.now += 11
    fx = h.handle(ev.Tick(h.now))
    assert [(e.kind, e.payload.get("end_process")) for e in fx.entries] == [(EntryKind.STALL, False)]
    assert fx.sends == []
    assert h.run().ranks[0].stream == 1


def test_the_stall_watchdog_never_ends_the_ranks_of_a_halted_run() -> None:
    """A HALTed run's trainers wait at an agreement point for a Resume, sending heartbeats only: they become
    STALLED, and the watchdog must leave them be (ending them would restart a run an operator stopped, and its
    restart would be ended again at the next threshold, until the launcher gives up)."""
    h = Harness(stall_timeout_s=10.0, end_stalled_ranks=True)
    h.attach(1)
    h.vitals(1, [5], [0.5])
    h.handle(ev.Halt("r", "an operator looks at it", "op", h.now))
    h.now += 11
    fx = h.handle(ev.Tick(h.now))
    assert [(e.kind, e.payload.get("end_process")) for e in fx.entries] == [(EntryKind.STALL, False)]
    assert not [s for s in fx.sends if getattr(s.message, "end_process", False)]
    assert h.run().ranks[0].stream == 1


def test_a_hung_rank_that_reconnected_is_still_ended_by_the_watchdog() -> None:
    """A rank went silent while its stream was down (STALLED, nothing to end); its hung process's connection
    thread reconnects, sending heartbeats only. Past the threshold of the new attachment the watchdog ends it:
    before, a rank STALLED already was never journaled again, so a hung trainer that had reconnected (after a
    network blip or a daemon restart) was never ended."""
    from governor_daemon.core.effects import EndStream

    h = Harness(stall_timeout_s=10.0, end_stalled_ranks=True)
    h.attach(1)
    h.vitals(1, [5], [0.5])
    h.handle(ev.Detach(1, h.now))
    h.now += 11
    fx = h.handle(ev.Tick(h.now))
    assert [(e.kind, e.payload["end_process"]) for e in fx.entries] == [(EntryKind.STALL, False)]
    h.attach(2)  # the same incarnation ("i0"): the hung process reconnected
    h.now += 5
    assert not h.handle(ev.Tick(h.now)).entries, "within the new attachment's threshold"
    h.now += 6
    fx = h.handle(ev.Tick(h.now))
    assert [(e.kind, e.payload.get("end_process")) for e in fx.entries] == [
        (EntryKind.STALL, True),
        (EntryKind.DETACH, None),
    ]
    assert [(s.stream, s.message.end_process) for s in fx.sends if isinstance(s.message, EndStream)] == [(2, True)]
    h.now += 100
    assert not h.handle(ev.Tick(h.now)).entries, "once per attachment"
