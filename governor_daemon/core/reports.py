"""A trainer's single-seq reports: a snapshot taken, a snapshot adopted after a restart, a command's result, the
rank's finish.

Each is accepted (``core/state.accept``: moot, resent, or new), checked, applied to its rank and run, then
answered by ``_answer``: its entry, any command it caused, its Ack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from governor_daemon.core import events as ev
from governor_daemon.core.attach import evict_finished
from governor_daemon.core.effects import Ack, Effects
from governor_daemon.core.records import issue, journal_notice
from governor_daemon.core.state import Accepted, CoreState, accept
from governor_daemon.errors import InvalidInputError
from governor_daemon.policy import Command, CommandKind
from governor_daemon.policy.decisions import float_to_json
from governor_daemon.policy.steps import pinned_states_to_json
from tolaria.journal import CommandResult, Finish, Record, Snapshot, SnapshotAdopted, SnapshotRef
from tolaria.journal import Notice as JournalNotice


def _answer(fx: Effects, a: Accepted, seq: int, entry: Record, commands: Sequence[Command] = ()) -> None:
    """The report's entry (``sync`` when commands follow it), the commands it caused (a failed command's
    follow-up), then its Ack."""
    fx.append_record(a.run.run_id, entry, sync=bool(commands))
    for command in commands:
        issue(fx, a.run, command, "command_failed")
    fx.send(a.stream, Ack(seq))


def _source(a: Accepted, seq: int) -> dict[str, Any]:
    """Which rank, incarnation and seq a report's entry is of (its record's ``rank``, ``incarnation_id``, ``seq``)."""
    return {"rank": a.binding.rank, "incarnation_id": a.binding.incarnation_id, "seq": seq}


def snapshot(state: CoreState, e: ev.SnapshotTaken, fx: Effects) -> None:
    """The rank published a snapshot; the policy pins its detectors' state for a restore to it."""
    a = accept(state, fx, e.stream, "snapshot_taken.seq", e.seq, e.seq)
    if a is None:
        return
    run, rank = a.run, a.rank
    rank.accept_seq(e.seq)
    rank.published(e.timeline, e.step, e.digest)
    pinned = run.policy.detector_pins.pin(a.binding.rank, e.timeline, e.step)
    effects: dict[str, Any] = {"ranks": {str(rank.rank): rank.effect()}}
    if pinned is not None:
        effects["pins"] = {str(a.binding.rank): pinned_states_to_json(run.policy.detector_pins.pins[a.binding.rank])}
    entry = Snapshot(
        **_source(a, e.seq),
        timeline=e.timeline,
        step=e.step,
        snapshot_bytes=e.snapshot_bytes,
        duration_ms=e.duration_ms,
        location=e.location,
        digest=e.digest,
        # The detectors resume from here after a restore to this snapshot (policy/steps.py).
        detector_state="pinned" if pinned is not None else "none: a restore to it re-warms the detectors",
        effects=effects,
    )
    _answer(fx, a, e.seq, entry)


def adopted(state: CoreState, e: ev.SnapshotAdopted, fx: Effects) -> None:
    """A restarted trainer adopted the snapshot its Welcome named: the run goes on from it on a new
    timeline (``RunPolicy.on_adopted``). A snapshot that is not the rank's last published one (the run
    was forgotten and created again since that Welcome) is journaled and changes nothing."""
    a = accept(state, fx, e.stream, "snapshot_adopted.seq", e.seq, e.seq)
    if a is None:
        return
    run, rank, policy = a.run, a.rank, a.run.policy
    if e.timeline > policy.timeline:
        raise InvalidInputError(
            "snapshot_adopted.timeline", f"{e.timeline} is ahead of the run's timeline {policy.timeline}"
        )
    rank.accept_seq(e.seq)
    snapshot_timeline, step, digest = e.snapshot
    effects: dict[str, Any] = {"ranks": {str(rank.rank): rank.effect()}}
    after: dict[str, Any]  # what the adoption did: the SnapshotAdopted fields after ``duration_ms``
    if rank.last_snapshot != e.snapshot:
        reason = (
            f"step {step} of timeline {snapshot_timeline} is not rank {a.binding.rank}'s last published snapshot "
            f"{list(rank.last_snapshot) if rank.last_snapshot else 'none'}; the adoption changes nothing"
        )
        after = {"notices": (JournalNotice(kind="unknown_snapshot", reason=reason, command=None),)}
    else:
        moved, notices = policy.on_adopted(a.binding.rank, e.timeline, step)
        superseded = run.aggregator.discard_before(policy.timeline) if moved else []
        effects["policy"] = policy.to_dict()
        if superseded:
            effects["pending"] = run.aggregator.to_dict()
        after = {
            "run_timeline": policy.timeline,
            "superseded_steps": [[g.timeline, g.step] for g in superseded],
            "notices": tuple(journal_notice(n) for n in notices) or None,
        }
    entry = SnapshotAdopted(
        **_source(a, e.seq),
        timeline=e.timeline,
        new_timeline=e.timeline + 1,
        snapshot=SnapshotRef(timeline=snapshot_timeline, step=step, digest=digest),
        duration_ms=e.duration_ms,
        **after,
        effects=effects,
    )
    _answer(fx, a, e.seq, entry)


def command_result(state: CoreState, e: ev.CommandResult, fx: Effects) -> None:
    """A rank executed (or failed) a command: the policy moves the rank (and the run, for the first rank
    onto a new timeline); a failure may issue a follow-up command. A result of a command this run never
    issued, or of another life of the run, is journaled and changes nothing else."""
    a = accept(state, fx, e.stream, "command_result.seq", e.seq, e.seq)
    if a is None:
        return
    run, rank, policy = a.run, a.rank, a.run.policy
    result = _result_fields(a, e)
    command = policy.ledger.command(e.command_id)
    if command is not None:
        result["command_kind"] = str(command.kind)
    moves = command is not None and command.kind is not CommandKind.HALT
    other = _other_command(e, run.run_id, policy.ledger.next_command_id, command)
    if other is not None:  # journaled; it changes nothing else
        rank.accept_seq(e.seq)
        unknown = f"{other}; the result changes nothing"
        notice = JournalNotice(kind="unknown_command", reason=unknown, command=None)
        unchanged = {"ranks": {str(rank.rank): rank.effect()}}
        _answer(fx, a, e.seq, CommandResult(**result, notices=(notice,), effects=unchanged))
        return
    if (not e.succeeded or not moves) and e.new_timeline > policy.timeline + 1:
        raise InvalidInputError(
            "command_result.new_timeline", f"{e.new_timeline} is ahead of the run's timeline {policy.timeline}"
        )
    rank.accept_seq(e.seq)
    if e.succeeded and moves:
        rank.restored(e.restored_step)  # the rank dropped its snapshots newer than the restored one
    timeline_before = policy.timeline
    notices = policy.on_command_result(
        e.command_id, a.binding.rank, e.succeeded, e.new_timeline, e.error, e.now, e.restored_step
    )
    effects: dict[str, Any] = {"policy": policy.to_dict(), "ranks": {str(rank.rank): rank.effect()}}
    superseded = run.aggregator.discard_before(policy.timeline) if policy.timeline != timeline_before else []
    if superseded:
        effects["pending"] = run.aggregator.to_dict()
    entry = CommandResult(
        **result,
        notices=tuple(journal_notice(n) for n in notices),
        superseded_steps=[[g.timeline, g.step] for g in superseded],
        effects=effects,
    )
    follow_up = [n.command for n in notices if n.command is not None]
    _answer(fx, a, e.seq, entry, follow_up)


def _result_fields(a: Accepted, e: ev.CommandResult) -> dict[str, Any]:
    """The ``CommandResult`` entry's fields the report itself gives."""
    lr = e.lr_after_restore
    return {
        **_source(a, e.seq),
        "command_id": e.command_id,
        "succeeded": e.succeeded,
        "new_timeline": e.new_timeline,
        "restored_step": e.restored_step,
        "duration_ms": e.duration_ms,
        "error": e.error,
        "num_culled_seeds": e.num_culled_seeds,
        "lr_after_restore": None if lr is None else float_to_json(lr),
    }


def _other_command(e: ev.CommandResult, run_id: str, next_command_id: int, command: Command | None) -> str | None:
    """Why the result is not of a command this life of the run issued, or None if it is."""
    if e.command_id >= next_command_id:  # never issued here: forged, or a result for a run the daemon has forgotten
        return f"command {e.command_id} was never issued in run {run_id}"
    moves = command is not None and command.kind is not CommandKind.HALT
    if command is not None and e.succeeded and moves and e.new_timeline != command.timeline + 1:
        # One of an earlier life of the run (forgotten and created again), executed by a trainer that had not
        # heard yet, whose ids start at 1 again (found by the simulation).
        return (
            f"{command.kind} {command.command_id} was made on timeline {command.timeline}, so it moves a rank "
            f"to {command.timeline + 1}, not {e.new_timeline}: the result is of another command"
        )
    return None


def finish(state: CoreState, e: ev.Finish, fx: Effects) -> None:
    """The rank finished (its status, its totals); the run finishes with its last rank, and finished runs
    beyond the retention limit leave memory."""
    a = accept(state, fx, e.stream, "finish.seq", e.seq, e.seq)
    if a is None:
        return
    run, rank = a.run, a.rank
    rank.accept_seq(e.seq)
    notices = run.policy.finish(a.binding.rank)
    loss = e.final_validation_loss
    entry = Finish(
        **_source(a, e.seq),
        status=e.status,
        epochs_completed=e.epochs_completed,
        num_rollbacks=e.num_rollbacks,
        message=e.message,
        duration_s=e.duration_s,
        notices=tuple(journal_notice(n) for n in notices),
        final_validation_loss=None if loss is None else float_to_json(loss),
        final_validation_accuracy=e.final_validation_accuracy,
        effects={"policy": run.policy.to_dict(), "ranks": {str(rank.rank): rank.effect()}},
    )
    _answer(fx, a, e.seq, entry)
    evict_finished(state, fx)
