"""A trainer's records: train-step batches (vitals) and validation records, judged by the run's policy.

A record of the run's timeline is judged; one of a timeline the run has left is journaled as stale, never
judged; one of a later timeline is refused. A validation step is decided once every rank reported it (or at
its rank deadline, ``core/timers.py``), and a decision's command is journaled durably before it leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from governor_daemon import train_records
from governor_daemon.core import events as ev
from governor_daemon.core.effects import Ack, CommandOut, Effects, Resync, VerdictOut
from governor_daemon.core.registry import RankState, Run
from governor_daemon.core.state import Accepted, CoreState, accept
from governor_daemon.errors import InvalidInputError
from governor_daemon.policy import AddOutcome, Command, Notice, StepGroup, Verdict
from governor_daemon.policy.decisions import float_to_json
from tolaria.journal import (
    CommandIssued,
    Decision,
    Duplicate,
    EntryKind,
    Late,
    Report,
    Stale,
    StallCleared,
    TrainSummary,
    ValidationDetails,
    ValidationReport,
    Vitals,
)
from tolaria.journal import Notice as JournalNotice


def vitals(state: CoreState, e: ev.Vitals, fx: Effects) -> None:
    """A batch of train-step records: its new records judged (or only checked for non-finite values, when
    shed), journaled, acknowledged; a command the judgement issues follows its entry."""
    a = accept(state, fx, e.stream, "vitals_batch.first_seq", e.first_seq, e.last_seq)
    if a is None:
        return
    run, rank = a.run, a.rank
    skip = max(0, rank.last_durable_seq + 1 - e.first_seq)
    first, last = e.first_seq + skip, e.last_seq
    if not classify("vitals_batch.timeline", run, e.timeline):
        stale(fx, a, "vitals_batch", first, last, e.timeline, num_records=len(e.steps) - skip)
        return
    batch = _Batch.of(e, skip)
    gaps_before = rank.num_gaps
    rank.accept_seq(last, first)
    max_step = int(batch.steps.max())
    progress(fx, run, rank, e.timeline, max_step, e.now)
    num = len(batch.steps)
    # A shed batch gets the non-finite check only (docs/protocol.md, "Shedding")
    decision, step_state = run.policy.judge_train_batch(
        e.timeline,
        a.binding.rank,
        np.asarray(batch.steps, dtype=np.int64),
        batch.losses,
        batch.grads,
        e.now,
        lrs=batch.lrs,
        pins=e.pins,
        shed=e.shed,
    )
    num_shed, records, train = _keep(state, a, batch, e.shed)
    effects: dict[str, Any] = {"ranks": {str(rank.rank): rank.effect()}}
    if step_state is not None:
        effects["steps"] = {str(a.binding.rank): step_state.as_dict()}
    if decision is not None:
        effects["policy"] = run.policy.to_dict()
    entry = Vitals(
        rank=a.binding.rank,
        incarnation_id=a.binding.incarnation_id,
        seq=last,
        first_seq=first,
        num_records=0 if e.shed else num,
        num_gaps=rank.num_gaps - gaps_before,
        num_dropped=e.num_dropped,
        max_step=max_step,
        timeline=e.timeline,
        num_shed=num_shed,
        records=records,
        train=train,
        decision=decision.as_dict() if decision is not None else None,
        effects=effects,
    )
    fx.append_record(run.run_id, entry, sync=decision is not None)
    if decision is not None and decision.command is not None:
        issue(fx, run, decision.command, "train_step")
    fx.send(e.stream, Ack(last, num_shed=num if e.shed else 0))


@dataclass(frozen=True)
class _Batch:
    """The records of a vitals batch past the rank's journaled seqs (``skip`` of them were resent)."""

    steps: npt.NDArray[np.int64]
    losses: npt.NDArray[np.float64]
    grads: npt.NDArray[np.float64] | None
    lrs: npt.NDArray[np.float64] | None

    @classmethod
    def of(cls, e: ev.Vitals, skip: int) -> _Batch:
        return cls(
            e.steps[skip:] if skip else e.steps,
            np.asarray(e.losses[skip:] if skip else e.losses, dtype=np.float64),
            np.asarray(e.grads[skip:] if skip else e.grads, dtype=np.float64) if len(e.grads) else None,
            np.asarray(e.lrs[skip:] if skip else e.lrs, dtype=np.float64) if len(e.lrs) else None,
        )


def _keep(
    state: CoreState, a: Accepted, batch: _Batch, shed: bool
) -> tuple[int | None, dict[str, Any] | None, TrainSummary | None]:
    """What the VITALS entry keeps of the batch (``num_shed``, ``records``, ``train``): the count of shed records,
    or the records' summary (and the records themselves while the run is under ``journal_train_records``)."""
    num = len(batch.steps)
    if shed:
        a.rank.num_shed += num
        return num, None, None
    records = None
    budget = state.options.limits.journal_train_records
    if budget and sum(r.num_records for r in a.run.ranks.values()) < budget:
        records = train_records.encode(np.asarray(batch.steps), batch.losses, batch.grads, batch.lrs)
    a.rank.num_records += num
    return None, records, train_summary(batch.steps, batch.losses, batch.grads)


def validation(state: CoreState, e: ev.Validation, fx: Effects) -> None:
    """A validation record: decided at once in a one-rank run, else added to its step's group (decided when
    complete); journaled and acknowledged."""
    a = accept(state, fx, e.stream, "validation_record.seq", e.seq, e.seq)
    if a is None:
        return
    run, rank = a.run, a.rank
    if not classify("validation_record.timeline", run, e.timeline):
        stale(fx, a, "validation_record", e.seq, e.seq, e.timeline, record=ValidationDetails.from_payload(e.details))
        return
    rank.accept_seq(e.seq)
    rank.num_records += 1
    progress(fx, run, rank, e.timeline, e.step, e.now)
    if run.meta.world_size == 1:
        b = a.binding
        group = StepGroup(e.timeline, e.step, e.now, e.epoch, e.record_rgl, {b.rank: e.loss}, {b.rank: e.seq})
        source = {"rank": b.rank, "incarnation_id": b.incarnation_id, "seq": e.seq}
        decide(fx, run, group, {**source, "record": ValidationDetails.from_payload(e.details)}, e.now)
    else:
        _report(fx, a, e)
    fx.send(e.stream, Ack(e.seq))


_REPORTS: dict[EntryKind, type[ValidationReport]] = {
    EntryKind.REPORT: Report,
    EntryKind.LATE: Late,
    EntryKind.DUPLICATE: Duplicate,
}


def _report(fx: Effects, a: Accepted, e: ev.Validation) -> None:
    """One rank's record of a multi-rank step: pending, the last one (decided now), or late or duplicate (never
    judged: the rank is told, so that no snapshot waits for it)."""
    run, rank, binding = a.run, a.rank, a.binding
    outcome, ready = run.aggregator.add(
        binding.rank,
        e.timeline,
        e.step,
        e.loss,
        e.now,
        e.epoch,
        e.record_rgl,
        e.seq,
        binding.incarnation_id,
        frozenset(run.policy.roster.finished),
    )
    kind = EntryKind.REPORT if outcome in (AddOutcome.PENDING, AddOutcome.READY) else EntryKind(str(outcome))
    entry = _REPORTS[kind](
        rank=binding.rank,
        incarnation_id=binding.incarnation_id,
        seq=e.seq,
        record=ValidationDetails.from_payload(e.details),
        effects={"ranks": {str(rank.rank): rank.effect()}, "pending": run.aggregator.to_dict()},
    )
    fx.append_record(run.run_id, entry)
    if ready is not None:
        decide(fx, run, ready, {}, e.now)
    elif kind is not EntryKind.REPORT:
        policy = run.policy
        reason = (
            f"{kind} report: step {e.step} of timeline {e.timeline} was decided without rank "
            f"{binding.rank}'s record; no snapshot"
        )
        verdict = policy.last_verdict or Verdict.HEALTHY
        fx.send(e.stream, VerdictOut(e.seq, e.timeline, e.step, verdict, reason, False, policy.state))


def classify(field_name: str, run: Run, timeline: int) -> bool:
    """True if a record of ``timeline`` is judged; False if it is stale. Raises for a future timeline.

    The run's timeline moves with the first rank that executes a ROLLBACK or RESUME, so a rank
    is never ahead of it (docs/protocol.md, "Timelines").
    """
    policy = run.policy
    if timeline < policy.timeline:
        return False
    if timeline == policy.timeline:
        return True
    raise InvalidInputError(
        field_name,
        f"timeline {timeline} is ahead of the run's timeline {policy.timeline}: "
        "a trainer moves to a new timeline only by executing a command",
    )


def stale(
    fx: Effects,
    a: Accepted,
    what: str,
    first_seq: int,
    last_seq: int,
    timeline: int,
    num_records: int | None = None,
    record: ValidationDetails | None = None,
) -> None:
    """Journal records of a left timeline, unjudged (a batch's count of records, or the validation record);
    tell a rank that has no command in flight."""
    run, rank = a.run, a.rank
    rank.accept_seq(last_seq, first_seq)
    policy = run.policy
    in_flight = policy.ledger.open is not None and rank.rank not in policy.ledger.open.ranks_done
    entry = Stale(
        what=what,
        rank=a.binding.rank,
        incarnation_id=a.binding.incarnation_id,
        seq=last_seq,
        first_seq=first_seq,
        timeline=timeline,
        current_timeline=policy.timeline,
        resync=not in_flight,
        num_records=num_records,
        record=record,
        effects={"ranks": {str(rank.rank): rank.effect()}},
    )
    fx.append_record(run.run_id, entry)
    if not in_flight:
        reason = (
            f"records up to seq {last_seq} are on timeline {timeline}, the run is on {policy.timeline}: "
            "journaled as stale, not judged"
        )
        fx.send(rank.stream, Resync(policy.timeline, last_seq, reason, policy.state))
    fx.send(rank.stream, Ack(last_seq))


def progress(fx: Effects, run: Run, rank: RankState, timeline: int, step: int, now: float) -> None:
    """A record at (timeline, step): if it is later than the rank's latest, that is progress: the
    position moves, the stall clock restarts and a rank marked STALLED (no progress, or a missed
    rank deadline) recovers. A record at the latest position again is no progress.

    Call before the record's own entry, whose rank effect then holds the new position."""
    if rank.tracker is not None:
        rank.tracker.observe_step(step, now, timeline)
    if (timeline, step) <= (rank.latest_timeline, rank.latest_step):
        return
    rank.latest_timeline, rank.latest_step = timeline, step
    if rank.rank in run.policy.roster.stalled:
        run.policy.roster.set_stalled(rank.rank, False)
        cleared = StallCleared(rank=rank.rank, timeline=timeline, step=step, effects={"policy": run.policy.to_dict()})
        fx.append_record(run.run_id, cleared)


def decide(fx: Effects, run: Run, group: StepGroup, source: dict[str, Any], now: float) -> None:
    """Judge one complete (or overdue) validation step; verdicts to its ranks, then any command. ``source``: the
    ``Decision`` entry's fields that say what was decided (a one-rank run's record, or ``after_deadline``)."""
    policy = run.policy
    for missing in group.missing:
        policy.roster.set_stalled(missing, True)
    decision = policy.judge_validation(
        group.timeline,
        group.step,
        group.losses,
        now,
        group.epoch,
        group.record_rgl,
        group.missing,
    )
    entry = Decision(
        **source,
        seqs={str(r): s for r, s in group.seqs.items()},
        decision=decision.as_dict(),
        effects={
            "policy": policy.to_dict(),
            "ranks": {str(r): run.rank(r).effect() for r in group.seqs},
            "pending": run.aggregator.to_dict(),
        },
    )
    # a verdict never waits for the group-commit window (docs/protocol.md, "Decisions")
    fx.append_record(run.run_id, entry, sync=True)
    for rank_id, seq in group.seqs.items():
        target = run.rank(rank_id)
        if group.incarnations.get(rank_id, target.incarnation_id) == target.incarnation_id:
            fx.send(target.stream, VerdictOut.of(seq, decision))  # never to a later incarnation
    if decision.command is not None:
        issue(fx, run, decision.command, "decision")


def issue(fx: Effects, run: Run, command: Command, cause: str) -> None:
    """Journal a command (durable before it leaves) and send it to every attached rank."""
    fx.append_record(run.run_id, CommandIssued(cause=cause, command=command.as_dict()), sync=True)
    for rank in run.ranks.values():
        fx.send(rank.stream, CommandOut(command, rank.generation))


def journal_notice(notice: Notice) -> JournalNotice:
    """A policy notice as entries carry it."""
    return JournalNotice(
        kind=notice.kind,
        reason=notice.reason,
        command=notice.command.as_dict() if notice.command else None,
        charged=notice.charged,
    )


def train_summary(
    steps: Sequence[int] | npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
) -> TrainSummary:
    """What a VITALS entry keeps of its batch's records for people (the audit plot): the step range, the
    mean and largest loss and the largest grad norm of the finite records ("nan" if none is finite)."""
    finite = losses[np.isfinite(losses)]
    finite_grads = grads[np.isfinite(grads)] if grads is not None else np.empty(0)
    return TrainSummary(
        first_step=int(steps[0]),
        last_step=int(steps[-1]),
        loss_mean=float_to_json(float(finite.mean())) if len(finite) else "nan",
        loss_max=float_to_json(float(finite.max())) if len(finite) else "nan",
        grad_norm_max=float(finite_grads.max()) if len(finite_grads) else None,
        num_non_finite=int(len(losses) - len(finite)),
    )
