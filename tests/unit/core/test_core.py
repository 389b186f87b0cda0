"""The daemon core without sockets: events in, effects out. Each defect of the protocol issue that
lives in the daemon has a test here named after it; each failed before its fix."""

from __future__ import annotations

import ast
import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from governor_daemon.core import CoreOptions, Effects, GovernorCore, Limits, Outbound, Registry
from governor_daemon.core import events as ev
from governor_daemon.core.effects import Ack, CommandOut, EndStream, Resync, Send, VerdictOut, Welcome
from governor_daemon.errors import InvalidInputError, LimitExceededError, PolicyStateError
from governor_daemon.journal.entry import canonical_json
from governor_daemon.policy import CommandKind, PolicyConfig, RunState
from governor_daemon.service import codec
from tolaria.governor.v1 import trainer_service_pb2
from tolaria.journal import EntryKind

HEALTHY = [2.3, 1.9, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.65, 0.6, 0.58, 0.55]


class Harness:
    """A core and the journal its effects would write (every entry JSON-encoded as the journal does)."""

    def __init__(self, **policy: Any) -> None:
        self.core = GovernorCore(CoreOptions(defaults=PolicyConfig(**policy)))
        self.entries: list[tuple[str, str, dict[str, Any]]] = []
        self.now = 100.0
        self.seqs: dict[int, int] = {}
        self.core.handle(ev.Start(self.now))

    def handle(self, event: ev.Event) -> Effects:
        effects = self.core.handle(event)
        for append in effects.entries:
            canonical_json(append.payload)  # every entry must be encodable
            self.entries.append((append.run, append.kind, append.payload))
            if append.run:
                self.core.note_appended(append.run, len(self.entries))
        return effects

    def attach(self, stream: int, run: str = "r", rank: int = 0, world_size: int = 1, inc: str = "i0") -> Effects:
        self.seqs[stream] = 0
        return self.handle(ev.Attach(stream, run, rank, world_size, inc, "t", {}, None, 10, "", "p", "c", self.now))

    def seq(self, stream: int, n: int = 1) -> int:
        self.seqs[stream] += n
        return self.seqs[stream] - n + 1

    def vitals(self, stream: int, steps: list[int], losses: list[float], timeline: int = 0) -> Effects:
        first = self.seq(stream, len(steps))
        return self.handle(ev.Vitals(stream, first, timeline, np.array(steps), losses, [], 0, self.now))

    def validation(self, stream: int, step: int, loss: float, timeline: int = 0) -> Effects:
        seq = self.seq(stream)
        return self.handle(ev.Validation(stream, seq, timeline, step, step // 10, loss, None, {"seq": seq}, self.now))

    def result(self, stream: int, command: Any, new_timeline: int | None = None, ok: bool = True) -> Effects:
        timeline = command.timeline + 1 if new_timeline is None else new_timeline
        seq = self.seq(stream)
        return self.handle(ev.CommandResult(stream, seq, command.command_id, ok, timeline, 0, 1.0, "", 0, self.now))

    def warm(self, stream: int) -> int:
        step = 0
        for loss in HEALTHY:
            step += 10
            self.validation(stream, step, loss)
        return step

    def run(self, run_id: str = "r") -> Any:
        return self.core.registry.runs[run_id]

    def rebuilt(self) -> dict[str, Any]:
        registry = Registry()
        for i, (run, kind, payload) in enumerate(self.entries, start=1):
            registry.apply_entry(_Entry(i, run, kind, payload))  # type: ignore[arg-type]
        return registry.checkpoint()


class _Entry:
    def __init__(self, seq: int, run: str, kind: str, payload: dict[str, Any]) -> None:
        self.seq, self.run, self.kind, self.payload = seq, run, kind, payload


def messages(effects: Effects, kind: type) -> list[Any]:
    return [s.message for s in effects.sends if isinstance(s.message, kind)]


def commands(effects: Effects) -> list[Any]:
    return [m.command for m in messages(effects, CommandOut)]


# ----------------------------------------------------------------- the core's boundaries


def _imported(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return names + [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]


def test_core_imports_no_grpc_protos_or_asyncio() -> None:
    """governor_daemon/core imports no grpc, protobuf stubs or asyncio; only service/ imports grpc. Of the
    contract package it imports only ``tolaria.journal`` (the records it writes), which imports nothing but the
    standard library."""
    repo = Path(__file__).resolve().parents[3]
    root = repo / "governor_daemon"
    forbidden_in_core = {"grpc", "asyncio", "google"}
    for path in (repo / "proto" / "tolaria" / "journal").rglob("*.py"):
        outside = {n for n in _imported(path) if not n.startswith("tolaria.journal")}
        assert {n.split(".")[0] for n in outside} <= set(sys.stdlib_module_names), f"{path.name} imports {outside}"
    for path in root.rglob("*.py"):
        names = _imported(path)
        tops = {name.split(".")[0] for name in names}
        relative = path.relative_to(root).as_posix()
        if relative.startswith("core/"):
            assert not tops & forbidden_in_core, f"{relative} imports {tops & forbidden_in_core}"
            contract = {n for n in names if n.split(".")[0] == "tolaria" and not n.startswith("tolaria.journal")}
            assert not contract, f"{relative} imports {contract}"
        if "grpc" in tops or "grpc_health" in tops or "grpc_reflection" in tops:
            assert relative.startswith(("service/", "server.py", "security.py", "testing.py", "cli/")), relative


def test_messages_wait_for_their_entries_in_production_order() -> None:
    """Outbound releases nothing before its entry is durable and never lets a later send overtake."""
    out = Outbound()
    out.push(5, [Send(1, Ack(3))])
    out.push(7, [Send(2, Ack(9)), Send(1, Ack(4))])
    out.push(6, [Send(1, Ack(5))])
    assert out.release(4) == []
    assert out.release(6) == [Send(1, Ack(3))], "entry 6 is durable, but the send held for 7 comes first"
    assert out.release(7) == [Send(2, Ack(9)), Send(1, Ack(5))], "acks of a stream collapse into the last"


def test_welcome_verdict_and_state_rebuild_from_entries() -> None:
    """Attach, a warm-up and a NaN: the state rebuilt from the entries equals the live state."""
    h = Harness()
    welcome = messages(h.attach(1), Welcome)[0]
    assert (welcome.generation, welcome.last_durable_seq, welcome.timeline) == (1, 0, 0)
    step = h.warm(1)
    fx = h.validation(1, step + 10, math.nan)
    verdicts = messages(fx, VerdictOut)
    assert verdicts[0].verdict == "panic"
    assert [e.kind for e in fx.entries][-1] == EntryKind.COMMAND
    assert fx.sync
    assert h.rebuilt() == h.core.checkpoint()


# ----------------------------------------------------------------- defects, by number


def test_defect_2_stale_record_without_a_command_in_flight_gets_a_resync() -> None:
    """A trainer on an old timeline with nothing in flight is told (Resync), not silently absorbed."""
    h = Harness()
    h.attach(1)
    step = h.warm(1)
    cmd = commands(h.validation(1, step + 10, math.nan))[0]
    h.result(1, cmd)
    h.handle(ev.Detach(1, h.now))  # the trainer died
    h.attach(2, inc="i1")  # its restart, which kept timeline 0
    fx = h.vitals(2, [1, 2], [0.5, 0.5], timeline=0)
    resync = messages(fx, Resync)
    assert resync
    assert resync[0].timeline == 1
    assert resync[0].up_to_seq == 2
    assert fx.entries[0].kind == EntryKind.STALE
    assert fx.entries[0].payload["resync"]


def test_defect_3_a_rank_ahead_in_a_two_rank_rollback_is_judged_not_refused() -> None:
    """Rank 0 answers the ROLLBACK and sends new-timeline records before rank 1 answers: accepted."""
    h = Harness()
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    cmd = commands(h.vitals(1, [5], [math.nan]))[0]
    h.result(1, cmd)
    fx = h.vitals(1, [6, 7], [0.4, 0.4], timeline=1)
    assert [e.kind for e in fx.entries] == [EntryKind.VITALS]
    stale = h.vitals(2, [5], [0.4], timeline=0)  # rank 1 is still in flight: stale, and no Resync
    assert [e.kind for e in stale.entries] == [EntryKind.STALE]
    assert not messages(stale, Resync)
    h.result(2, cmd)
    assert h.run().policy.state is RunState.HEALTHY
    assert h.run().policy.timeline == 1


def test_defect_4_command_timeout_sends_halt_to_the_trainer() -> None:
    """An unanswered ROLLBACK times out into HALTED and the trainer receives a HALT (punishment 0)."""
    h = Harness(command_timeout_s=5.0)
    h.attach(1)
    h.vitals(1, [1], [math.nan])
    fx = h.handle(ev.Tick(h.now + 6))
    halt = commands(fx)
    assert [c.kind for c in halt] == [CommandKind.HALT]
    assert halt[0].punishment_reward == 0.0
    assert h.run().policy.state is RunState.HALTED
    assert h.run().policy.ledger.total_punishment == 0.0, "the ROLLBACK was never executed: nothing is charged"


def test_the_ledger_charges_only_commands_a_trainer_executed() -> None:
    """Hardening 2, defect 4: two ranks finished without executing a ROLLBACK (their daemon was killed right
    after journaling it) and the run was charged -10 for a rollback that never ran. A command is charged at
    its first CommandResult, once; one abandoned because every rank finished charges nothing."""
    h = Harness()
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    h.vitals(1, [1], [math.nan])
    assert h.run().policy.ledger.open is not None
    assert h.run().policy.ledger.total_punishment == 0.0
    for stream in (1, 2):
        fx = h.handle(ev.Finish(stream, h.seq(stream), "FINISH_STATUS_COMPLETED", 1, 0, "", 1.0, None, None, h.now))
    [finish] = [e for e in fx.entries if e.kind == EntryKind.FINISH]
    assert [n["kind"] for n in finish.payload["notices"]] == ["command_abandoned"]
    assert (h.run().policy.ledger.total_punishment, h.run().policy.ledger.last_punishment) == (0.0, 0.0)
    assert h.rebuilt() == h.core.checkpoint()

    executed = Harness()
    executed.attach(1, world_size=2, rank=0)
    executed.attach(2, world_size=2, rank=1, inc="i1")
    command = commands(executed.vitals(1, [1], [math.nan]))[0]
    first = executed.result(1, command)
    [entry] = [e for e in first.entries if e.kind == EntryKind.COMMAND_RESULT]
    assert [n.get("charged") for n in entry.payload["notices"]] == [-10.0, None]
    executed.result(2, command)
    assert executed.run().policy.ledger.total_punishment == -10.0, "charged once, by the first rank's result"
    assert executed.rebuilt() == executed.core.checkpoint()


def test_defect_6_a_missed_rank_deadline_does_not_latch_stalled() -> None:
    """A rank that missed one deadline is STALLED until it reports again, not forever."""
    h = Harness(rank_deadline_s=1.0)
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    h.validation(1, 10, 2.0)
    h.handle(ev.Tick(h.now + 2))
    assert h.run().policy.state is RunState.STALLED
    h.validation(2, 20, 1.9)
    assert h.run().policy.state is not RunState.STALLED
    assert h.rebuilt() == h.core.checkpoint()


def test_defect_6_a_pending_step_of_a_left_timeline_is_superseded_not_judged() -> None:
    """Rank 0 reported step 10 on timeline 0; a rollback moves the run on: the step is never judged."""
    h = Harness(rank_deadline_s=1.0)
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    h.validation(1, 10, 2.0)
    cmd = commands(h.vitals(2, [11], [math.nan]))[0]
    h.result(1, cmd)
    h.result(2, cmd)
    fx = h.handle(ev.Tick(h.now + 5))  # raised PolicyStateError inside the tick before the fix
    assert EntryKind.DECISION not in [e.kind for e in fx.entries]
    assert not h.run().aggregator.to_dict()["pending"]


def test_defect_7_a_stale_batch_is_not_counted_as_gaps() -> None:
    h = Harness()
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    cmd = commands(h.vitals(1, [1], [math.nan]))[0]
    h.result(1, cmd)
    h.vitals(2, list(range(20)), [0.5] * 20, timeline=0)
    assert h.run().ranks[1].num_gaps == 0


def test_defect_8_every_entry_of_a_run_moves_its_cursor_after_restore() -> None:
    h = Harness()
    h.attach(1)
    h.handle(ev.Detach(1, h.now))
    assert h.entries[-1][1] == EntryKind.DETACH
    assert h.rebuilt()["runs"]["r"]["last_cursor"] == len(h.entries)


def test_defect_9_progress_on_a_new_timeline_counts_after_a_deep_rollback() -> None:
    h = Harness(stall_timeout_s=10.0)
    h.attach(1)
    h.vitals(1, [810], [0.5])
    cmd = commands(h.handle(ev.RequestRollback("r", "test", "op", h.now)))[0]
    h.result(1, cmd)
    for i in range(1, 6):
        h.now += 3
        h.vitals(1, [i * 30], [0.5], timeline=1)
        h.handle(ev.Tick(h.now))
    assert h.run().policy.state is not RunState.STALLED


def test_defect_10_timers_are_monotonic_and_rearm_at_start() -> None:
    """The core never reads a clock; after a restart an open command gets its full timeout again."""
    h = Harness(command_timeout_s=10.0)
    h.attach(1)
    h.vitals(1, [1], [math.nan])
    checkpoint = h.core.checkpoint()
    assert "issued_at_s" not in str(checkpoint), "monotonic times are never journaled"
    restarted = GovernorCore(CoreOptions(defaults=PolicyConfig(command_timeout_s=10.0)))
    restarted.restore(checkpoint, [])
    restarted.handle(ev.Start(5.0))  # another process: its monotonic clock starts elsewhere
    assert not restarted.handle(ev.Tick(14.0)).entries
    assert next(e.kind for e in restarted.handle(ev.Tick(15.5)).entries) == EntryKind.COMMAND_TIMEOUT


def test_defect_11_an_unsolicited_command_result_changes_nothing() -> None:
    """A result for a command never issued is journaled and changes nothing (it moved the timeline to
    2^64-1, after which every real record was stale); so does a result whose new_timeline is not the issued
    command's (it is of another command: an earlier life's of a run forgotten and created again, whose ids
    start at 1 again; refusing it, as before, made that trainer ungoverned)."""
    h = Harness()
    h.attach(1)
    fx = h.handle(ev.CommandResult(1, 1, 7, True, 2**40, 0, 1.0, "", 0, h.now))
    assert fx.entries[0].payload["notices"][0]["kind"] == "unknown_command"
    assert h.run().policy.timeline == 0, "a result of a command never issued changes nothing"
    h.seqs[1] = 1
    cmd = commands(h.vitals(1, [1], [math.nan]))[0]
    fx = h.handle(ev.CommandResult(1, 3, cmd.command_id, True, 2**40, 0, 1.0, "", 0, h.now))
    (notice,) = fx.entries[0].payload["notices"]
    assert notice["kind"] == "unknown_command"
    assert "the result is of another command" in notice["reason"]
    policy = h.run().policy
    assert (policy.timeline, policy.ledger.open is not None) == (0, True), (
        "the command stays open, the run where it was"
    )


@pytest.mark.parametrize(
    "request_",
    [
        trainer_service_pb2.AttachRequest(
            validation_record=trainer_service_pb2.ValidationRecord(
                seq=1, step=1, loss=1.0, seeds=[trainer_service_pb2.SeedStatus(slot="a", alpha=math.nan)]
            )
        ),
        trainer_service_pb2.AttachRequest(
            snapshot_taken=trainer_service_pb2.SnapshotTaken(seq=1, duration_ms=math.inf)
        ),
        trainer_service_pb2.AttachRequest(
            command_result=trainer_service_pb2.CommandResult(seq=1, command_id=1, outcome=1, duration_ms=math.nan)
        ),
        trainer_service_pb2.AttachRequest(finish=trainer_service_pb2.Finish(seq=1, status=99)),
        trainer_service_pb2.AttachRequest(finish=trainer_service_pb2.Finish(seq=1, status=1, duration_s=math.nan)),
        trainer_service_pb2.AttachRequest(
            finish=trainer_service_pb2.Finish(seq=1, status=1, final_validation_accuracy=math.nan)
        ),
    ],
)
def test_defect_12_fields_journaled_raw_are_validated_before_the_core(request_: Any) -> None:
    """A non-finite float or unknown enum that the journal would store raw is refused by the decoder."""
    with pytest.raises(InvalidInputError):
        codec.decode_request(request_, 1, 0.0, CoreOptions().limits)


def test_defect_13_seq_jumps_are_bounded_so_counters_never_overflow() -> None:
    h = Harness()
    h.attach(1)
    with pytest.raises(InvalidInputError, match="jumps"):
        h.handle(ev.Vitals(1, 10**12, 0, np.array([1]), [0.5], [], 0, h.now))
    batch = trainer_service_pb2.AttachRequest(
        vitals_batch=trainer_service_pb2.VitalsBatch(first_seq=2**64 - 1, step=[1], loss=[0.5])
    )
    with pytest.raises(InvalidInputError):
        codec.decode_request(batch, 1, 0.0, CoreOptions().limits)


def test_defect_14_controller_rollback_of_a_finished_run_is_refused() -> None:
    h = Harness()
    h.attach(1)
    h.handle(ev.Finish(1, h.seq(1), "FINISH_STATUS_COMPLETED", 1, 0, "", 1.0, None, None, h.now))
    with pytest.raises(PolicyStateError, match="finished"):
        h.handle(ev.RequestRollback("r", "why", "op", h.now))


def test_defect_14_an_open_command_closes_when_every_rank_finished() -> None:
    h = Harness()
    h.attach(1)
    h.vitals(1, [1], [math.nan])
    fx = h.handle(ev.Finish(1, h.seq(1), "FINISH_STATUS_COMPLETED", 1, 0, "", 1.0, None, None, h.now))
    assert h.run().policy.ledger.open is None
    assert h.run().policy.state is RunState.FINISHED
    assert fx.entries[0].payload["notices"][0]["kind"] == "command_abandoned"


def test_defect_17_a_verdict_waits_for_its_decision_entry() -> None:
    """Every Verdict is produced with its decision entry, so the runtime releases it only when durable."""
    h = Harness()
    h.attach(1)
    fx = h.validation(1, 10, 2.0)
    assert messages(fx, VerdictOut)
    assert fx.entries[-1].kind == EntryKind.DECISION


def test_defect_18_every_command_has_a_command_entry_whatever_caused_it() -> None:
    h = Harness(command_timeout_s=1.0)
    h.attach(1)
    h.vitals(1, [1], [math.nan])  # train step
    h.handle(ev.Tick(h.now + 2))  # timeout
    h.handle(ev.Resume("r", "go", "op", h.now + 2))  # controller
    causes = [p["cause"] for _, kind, p in h.entries if kind == EntryKind.COMMAND]
    assert causes == ["train_step", "command_timeout", "controller"]


def test_a_trainer_attaching_to_a_halted_run_gets_its_halt() -> None:
    """The HALT closed (answered, or timed out) before a new trainer attached: it is re-sent, same id,
    charged once, so the new process knows it is halted (a halted run never has a trainer that trains)."""
    h = Harness()
    h.attach(1)
    halt = commands(h.handle(ev.Halt("r", "stop", "op", h.now)))[0]
    h.result(1, halt)
    h.handle(ev.Detach(1, h.now))
    resent = commands(h.attach(2, inc="i1"))
    assert [c.command_id for c in resent] == [halt.command_id]
    assert h.run().policy.ledger.total_punishment == -10.0


def test_a_late_multi_rank_report_gets_a_verdict_without_snapshot() -> None:
    """A report for a step decided at its deadline is acknowledged and answered (no snapshot), so the rank's
    staged snapshot does not wait for a verdict that never comes."""
    h = Harness(rank_deadline_s=1.0)
    h.attach(1, world_size=2, rank=0)
    h.attach(2, world_size=2, rank=1, inc="i1")
    h.validation(1, 10, 2.0)
    h.handle(ev.Tick(h.now + 2))
    fx = h.validation(2, 10, 2.0)
    late = messages(fx, VerdictOut)
    assert EntryKind.LATE in [e.kind for e in fx.entries]
    assert len(late) == 1
    assert not late[0].snapshot_allowed
    assert "decided without rank 1" in late[0].reason


def test_a_run_id_with_a_trailing_newline_is_refused() -> None:
    """Review finding: `prod-run\\n` and `prod-run` were two runs (the pattern's $ matched before a newline)."""
    hello = trainer_service_pb2.Hello(run_id="prod-run\n", rank=0, world_size=1, incarnation_id="i", task="t")
    with pytest.raises(InvalidInputError, match="run_id"):
        codec.decode_hello(hello, 1, "p", "c", 0.0, CoreOptions().limits)


def test_forget_and_expiry_are_journaled_and_survive_a_rebuild() -> None:
    """Review finding: eviction was not journaled, so a restart resurrected evicted runs; and nothing ever
    removed the runs of crashed jobs."""
    h = Harness()
    h.core.options = CoreOptions(defaults=h.core.options.defaults, limits=Limits(idle_run_expiry_s=100.0))
    h.attach(1, run="a")
    with pytest.raises(PolicyStateError, match="attached"):
        h.handle(ev.ForgetRun("a", "cleanup", "op", h.now))
    h.handle(ev.Detach(1, h.now))
    h.handle(ev.ForgetRun("a", "cleanup", "op", h.now))
    h.attach(2, run="b", inc="i1")
    h.handle(ev.Detach(2, h.now))
    assert not h.handle(ev.Tick(h.now + 99)).entries
    assert [e.kind for e in h.handle(ev.Tick(h.now + 100)).entries] == [EntryKind.RUN_EXPIRED]
    assert h.core.registry.runs == {}
    assert h.rebuilt() == h.core.checkpoint() == {"runs": {}, "lives": 2}


def test_a_run_with_a_rollback_open_cannot_be_forgotten() -> None:
    """Found by the simulation: a trainer that had received a ROLLBACK lost its stream, a controller forgot the
    run, and the trainer executed the command while reconnecting: it came back on timeline 1 of a run created
    anew on 0, and every record it sent was refused (the run was ungoverned from then on)."""
    h = Harness()
    h.attach(1)
    (command,) = commands(h.vitals(1, [1, 2], [1.0, math.nan]))
    h.handle(ev.Detach(1, h.now))
    with pytest.raises(PolicyStateError, match=f"rollback {command.command_id} open"):
        h.handle(ev.ForgetRun("r", "cleanup", "op", h.now))
    h.handle(ev.Tick(h.now + h.run().policy.config.command_timeout_s + 1))  # no result: the run is HALTED
    h.handle(ev.ForgetRun("r", "cleanup", "op", h.now))
    assert h.core.registry.runs == {}


def test_one_principal_cannot_exhaust_the_run_table() -> None:
    h = Harness()
    h.core.options = CoreOptions(defaults=h.core.options.defaults, limits=Limits(max_active_runs_per_principal=2))

    def attach(stream: int, run: str, principal: str) -> Effects:
        h.seqs[stream] = 0
        return h.handle(
            ev.Attach(stream, run, 0, 1, f"i{stream}", "t", {}, None, 10, "", "p", "c", h.now, principal=principal)
        )

    attach(1, "m1", "mallory")
    attach(2, "m2", "mallory")
    with pytest.raises(LimitExceededError, match="per-principal"):
        attach(3, "m3", "mallory")
    attach(4, "a1", "alice")


def test_joined_batches_are_judged_as_their_parts() -> None:
    """The ingest worker joins a behind stream's consecutive batches: every record is still judged (a NaN
    in the third batch rolls back), counted and acknowledged up to the last seq."""
    h = Harness()
    h.attach(1)
    parts = [
        ev.Vitals(
            1, 1 + 4 * i, 0, np.arange(4 * i, 4 * i + 4), [0.5, 0.5, math.nan if i == 2 else 0.5, 0.5], [], 1, h.now
        )
        for i in range(4)
    ]
    assert all(b.follows(a) for a, b in itertools.pairwise(parts))
    joined = ev.Vitals.joined(parts)
    assert (joined.first_seq, joined.last_seq, joined.num_dropped) == (1, 16, 4)
    fx = h.handle(joined)
    assert [c.kind for c in commands(fx)] == [CommandKind.ROLLBACK]
    assert "step 10" in commands(fx)[0].reason
    assert h.run().ranks[0].num_records == 16
    assert messages(fx, Ack)[-1].up_to_seq == 16
    other_timeline = ev.Vitals(1, 17, 1, np.arange(2), [0.5, 0.5], [], 0, h.now)
    assert not other_timeline.follows(parts[-1])


def test_shed_batches_skip_only_the_statistical_detectors() -> None:
    """A daemon that is behind sheds a stream's overdue batches (service/ingest.py): the core acknowledges
    them without the statistical detectors (a loss spike in them rolls nothing back), says how many in the
    Ack, journals the count with the rank's new seq, and a rebuild from the entries restores it."""
    h = Harness()
    h.attach(1)
    h.vitals(1, list(range(40)), [0.5] * 40)
    parts = [
        ev.Vitals(1, 41 + 4 * i, 0, np.arange(40 + 4 * i, 44 + 4 * i), [0.5, 0.5, 50.0, 0.5], [], 0, h.now)
        for i in range(3)
    ]
    fx = h.handle(ev.Vitals.joined(parts, shed=True))
    assert commands(fx) == []
    assert [(a.up_to_seq, a.num_shed) for a in messages(fx, Ack)] == [(52, 12)]
    [entry] = fx.entries
    assert (entry.kind, entry.payload["num_shed"], entry.payload["num_records"], entry.payload["seq"]) == (
        EntryKind.VITALS,
        12,
        0,
        52,
    )
    rank = h.run().ranks[0]
    assert (rank.num_shed, rank.num_records, rank.last_durable_seq, rank.latest_step) == (12, 40, 52, 51)
    assert h.rebuilt() == h.core.checkpoint()


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e300])
def test_a_non_finite_record_in_a_shed_batch_is_still_a_rollback(bad: float) -> None:
    """Review (hardening 2, defect 1): a shed batch skipped every check, so a NaN that waited too long in a
    flooded daemon was acknowledged and never judged. Shedding drops only the statistical detectors: the
    non-finite check (and the blow-up ceiling) judges every record, and the reason says the batch was shed."""
    h = Harness()
    h.attach(1)
    h.vitals(1, [0, 1], [0.5, 0.5])
    parts = [ev.Vitals(1, 3 + 4 * i, 0, np.arange(2 + 4 * i, 6 + 4 * i), [0.5] * 4, [], 0, h.now) for i in range(3)]
    parts[1] = replace(parts[1], losses=[0.5, bad, 0.5, 0.5])
    fx = h.handle(ev.Vitals.joined(parts, shed=True))
    [command] = commands(fx)
    assert command.kind is CommandKind.ROLLBACK
    assert "step 7" in command.reason
    assert "shed" in command.reason
    entry = fx.entries[0]
    assert entry.kind is EntryKind.VITALS
    assert entry.payload["num_shed"] == 12
    assert entry.payload["decision"]["verdict"] == "panic"
    assert [(a.up_to_seq, a.num_shed) for a in messages(fx, Ack)] == [(14, 12)]
    assert h.rebuilt() == h.core.checkpoint()


def test_acks_released_together_keep_their_shed_counts() -> None:
    """Review of shedding: Acks of one stream released together collapse into the highest, and it carries
    the sum of their num_shed (the trainer must learn of every shed record)."""
    outbound = Outbound()
    outbound.push(1, [Send(7, Ack(12, 12)), Send(8, Ack(3, 1))])
    outbound.push(2, [Send(7, Ack(16, 0)), Send(7, Ack(20, 4))])
    released = outbound.release(2)
    assert [(s.stream, s.message) for s in released] == [(8, Ack(3, 1)), (7, Ack(20, 16))]


def test_welcome_says_how_long_the_train_stream_takes_to_vouch() -> None:
    """Trainers wait this long past a staged snapshot's step before publishing it (0 under the seed profile)."""
    h = Harness()
    (welcome,) = [s.message for s in h.attach(1).sends if isinstance(s.message, Welcome)]
    from governor_daemon.policy.steps import verification_steps

    assert welcome.train_verification_steps == verification_steps(PolicyConfig()) > 0
    seed = Harness(profile="seed")
    (welcome,) = [s.message for s in seed.attach(1).sends if isinstance(s.message, Welcome)]
    assert welcome.train_verification_steps == 0
    encoded = codec.encode_message(welcome)
    assert encoded.welcome.HasField("train_verification_steps")


def test_a_restore_resumes_the_detectors_from_the_snapshots_pinned_state_and_it_is_journaled() -> None:
    """The vitals pin the steps a snapshot may be staged at; the snapshot entry journals the state as of its
    step; the restore's result resumes the rank's detectors from it (journaled too: a rebuilt daemon agrees)."""
    h = Harness(step_warmup_steps=10)
    h.attach(1)
    steps = list(range(1, 101))
    losses = [2.0 / (1 + 0.01 * s) for s in steps]
    first = h.seq(1, 100)
    h.handle(ev.Vitals(1, first, 0, np.array(steps), losses, [], 0, h.now, pins=(60,)))
    seq = h.seq(1)
    h.handle(ev.SnapshotTaken(1, seq, 0, 60, 1000, 1.0, "host", h.now))
    run = h.run()
    pinned = run.policy.detector_pins.pins[0][-1]
    assert (pinned[0], pinned[1], pinned[2].last_step) == (0, 60, 60)
    (snapshot_entry,) = [p for _, kind, p in h.entries if kind == EntryKind.SNAPSHOT]
    assert snapshot_entry["detector_state"] == "pinned"
    (command,) = commands(h.handle(ev.RequestRollback("r", "test", "operator", h.now)))
    h.handle(ev.CommandResult(1, h.seq(1), command.command_id, True, command.timeline + 1, 60, 1.0, "", 0, h.now))
    state = run.policy.detector_pins.step_states[0]
    assert state == pinned[2].resumed(1, 60)
    assert h.rebuilt() == h.core.checkpoint()


def test_published_snapshot_digests_are_journaled_and_a_new_incarnations_welcome_names_the_last() -> None:
    """Each SnapshotTaken's digest is journaled; a restarted trainer (a new incarnation) is welcomed with the
    rank's last published snapshot, less those a restore abandoned; a rebuilt daemon agrees."""
    h = Harness()
    h.attach(1)
    for step in (0, 40, 80):
        h.handle(ev.SnapshotTaken(1, h.seq(1), 0, step, 1000, 1.0, "host", h.now, digest=f"sha256:{step:064x}"))
    journaled = [p["digest"] for _, kind, p in h.entries if kind == EntryKind.SNAPSHOT]
    assert journaled == [f"sha256:{s:064x}" for s in (0, 40, 80)]
    h.handle(ev.Detach(1, h.now))  # the trainer died
    (welcome,) = messages(h.attach(2, inc="i1"), Welcome)
    assert welcome.last_snapshot == (0, 80, f"sha256:{80:064x}")
    (command,) = commands(h.handle(ev.RequestRollback("r", "test", "operator", h.now)))
    h.handle(ev.CommandResult(2, h.seq(2), command.command_id, True, command.timeline + 1, 40, 1.0, "", 0, h.now))
    h.handle(ev.Detach(2, h.now))
    (welcome,) = messages(h.attach(3, inc="i2"), Welcome)
    assert welcome.last_snapshot == (0, 40, f"sha256:{40:064x}")  # the rank dropped the newer one
    assert h.rebuilt() == h.core.checkpoint()
    encoded = codec.encode_message(welcome).welcome
    assert encoded.HasField("last_snapshot")
    assert (encoded.last_snapshot.timeline, encoded.last_snapshot.step) == (0, 40)
    assert encoded.last_snapshot.digest == f"sha256:{40:064x}"


def test_a_snapshot_without_a_digest_is_not_offered_for_adoption() -> None:
    h = Harness()
    h.attach(1)
    h.handle(ev.SnapshotTaken(1, h.seq(1), 0, 40, 1000, 1.0, "host", h.now))
    h.handle(ev.Detach(1, h.now))
    (welcome,) = messages(h.attach(2, inc="i1"), Welcome)
    assert welcome.last_snapshot is None
    assert not codec.encode_message(welcome).welcome.HasField("last_snapshot")


def test_a_tick_names_only_the_runs_it_changes_and_its_undo_point_covers_those() -> None:
    """A tick's undo point copied every run's state (policy memento, aggregator deep copy) four times a second:
    with 138 flooding runs a third of the daemon's event loop. ``tick_due`` names the runs a tick changes, by
    the predicates the tick itself uses; a quiet tick names none, and each due clause names its run."""
    from governor_daemon.core.undo import _touched as undo_touched

    h = Harness(stall_timeout_s=30.0, command_timeout_s=5.0, rank_deadline_s=2.0)
    for i in range(20):
        h.attach(i + 1, run=f"quiet-{i}")
        h.vitals(i + 1, [1, 2, 3], [1.0, 0.9, 0.8])
    assert h.core.tick_due(h.now + 1) == []
    assert list(undo_touched(h.core, ev.Tick(h.now + 1))) == [], "a quiet tick's undo point copies no run"
    assert not h.handle(ev.Tick(h.now + 1)).entries
    h.attach(100, run="nan")
    h.vitals(100, [1], [math.nan])  # a ROLLBACK opens: its timeout falls due after 5 s
    due = [run.run_id for run in h.core.tick_due(h.now + 6)]
    assert due == ["nan"], due
    assert [c.kind for c in commands(h.handle(ev.Tick(h.now + 6)))] == [CommandKind.HALT]
    stalled = sorted(run.run_id for run in h.core.tick_due(h.now + 10_000))
    assert stalled == sorted(["nan", *(f"quiet-{i}" for i in range(20))]), "every rank is past its stall threshold"


def test_a_run_created_again_from_behind_moves_to_a_later_hellos_timeline() -> None:
    """Found by the simulation (seed 1546): a two-rank run on timeline 1 is forgotten while its trainers are
    down; rank 1, a fresh process, creates it again on timeline 0, then rank 0, which knew timeline 1, attaches.
    Before, the run stayed on 0 and rank 0's records of timeline 1 were refused as ahead (the trainer refused,
    training ungoverned). A Hello ahead of a run that has issued no command in this life moves it there, as if
    it had created it; rank 1's records of 0 then go stale and a Resync brings it along."""
    h = Harness()
    h.handle(ev.Attach(1, "r", 1, 2, "fresh", "t", {}, None, 10, "", "p", "c", h.now, timeline=0))
    h.seqs[1] = 0
    h.handle(ev.Attach(2, "r", 0, 2, "knew-1", "t", {}, None, 10, "", "p", "c", h.now, timeline=1))
    h.seqs[2] = 0
    assert h.run().policy.timeline == 1
    (entry,) = [p for _, kind, p in h.entries if kind == EntryKind.ATTACH and p["rank"] == 0]
    assert entry["run_timeline"] == [0, 1]
    h.vitals(2, [1, 2], [1.0, 1.0], timeline=1)  # judged, not refused
    assert messages(h.vitals(1, [1, 2], [1.0, 1.0], timeline=0), Resync)
    assert h.rebuilt() == h.core.checkpoint()


def test_a_hello_ahead_of_a_run_that_issued_commands_does_not_move_it() -> None:
    """Once the run has issued a command, its timeline moves only with commands and adoptions."""
    h = Harness()
    h.attach(1)
    commands(h.handle(ev.RequestRollback("r", "test", "operator", h.now)))
    h.handle(ev.Detach(1, h.now))
    h.handle(ev.Attach(2, "r", 0, 1, "later", "t", {}, None, 10, "", "p", "c", h.now, timeline=3))
    assert h.run().policy.timeline == 0


def test_a_daemon_stop_ends_every_attachment_in_the_journal() -> None:
    """Found by make stress-e2e (tests/e2e/test_event_lines.py, 1 run in 3): a Stop asked every stream to end
    but left the attachments bound, and the runtime forgets a stream the core ended, so a trainer still attached
    when the daemon stopped never got its detach entry: the audit log showed an attachment without an end. Now
    each attached rank's detach is journaled with the stop, before its EndStream, and nothing stays bound."""
    h = Harness()
    h.attach(1, run="a")
    h.attach(2, run="b", rank=1, world_size=2)
    effects = h.handle(ev.Stop("daemon shutting down", h.now))
    kinds = [(a.run, a.kind) for a in effects.entries]
    assert sorted(k for k in kinds if k[1] == EntryKind.DETACH) == [("a", EntryKind.DETACH), ("b", EntryKind.DETACH)]
    assert kinds[-1] == ("", EntryKind.DAEMON_STOP)
    assert {s.stream for s in effects.sends if isinstance(s.message, EndStream)} == {1, 2}
    assert h.core.streams == {}
    assert h.handle(ev.Detach(1, h.now)).entries == [], "the stream's own end, reported later, adds nothing"
