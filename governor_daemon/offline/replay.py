"""Offline replay: run the policy engine over a recorded trace.

Semantics (same engine as the daemon, so the same verdicts and reasons): after a ROLLBACK the trace
continues as if the trainer had restored the decision's step (the next record is on the new timeline, and
a fault again within ``recurrence_steps`` climbs the recovery ladder); after a HALT as if a controller
resumed at once (which starts the ladder afresh). Train records are judged healthy or panic and never enter the history;
they are judged in batches of up to ``TRAIN_BATCH`` consecutive records of one rank, as a trainer
sends them (every 64 steps, or sooner: at each validation), by the same train-stream detectors; records
that name their ``batch`` (an export of a journal) are judged in exactly those batches. A "policy"
record sets its run's policy from there on (the overrides given to ``replay`` apply on top).
Multi-rank validation records are matched by (step, occurrence) and decided once every rank of that
step has reported, or at the end of the trace with the missing ranks named.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from governor_daemon.offline.trace import TraceRecord
from governor_daemon.policy import CommandKind, Decision, PolicyConfig, RunPolicy
from governor_daemon.policy.aggregation import AddOutcome, StepAggregator, StepGroup


@dataclass(frozen=True)
class ReplayDecision:
    """One decision of a replay, with the run and the trace line that completed it."""

    run_id: str
    line: int
    decision: Decision

    def as_dict(self) -> dict[str, Any]:
        """The JSON object `governor replay --json` prints."""
        d = self.decision
        return {
            "run_id": self.run_id,
            "kind": d.kind,
            "epoch": d.epoch,
            "step": d.step,
            "timeline": d.timeline,
            "ranks": list(d.ranks),
            "verdict": str(d.verdict),
            "action": str(d.action),
            "reason": d.reason,
            "punishment_reward": d.punishment_reward,
            "rule": str(d.rule),
            "onset_step": d.onset_step,
            "command": d.command.as_dict() if d.command else None,
        }


TRAIN_BATCH = 64


@dataclass
class _RunReplay:
    policy: RunPolicy
    aggregator: StepAggregator
    occurrences: Counter[tuple[int, int]]
    train: list[tuple[float, TraceRecord]] = field(default_factory=list)  # (now_s, record) not judged yet


def replay(records: list[TraceRecord] | tuple[TraceRecord, ...], overrides: Mapping[str, Any]) -> list[ReplayDecision]:
    """Decide every record of a trace under ``PolicyConfig`` defaults plus ``overrides``.

    Raises PolicyConfigError for bad overrides. The synthetic clock is the record index, so command
    timeouts and rank deadlines never fire offline.
    """
    PolicyConfig().merged(overrides)  # bad overrides fail before anything is decided
    runs: dict[str, _RunReplay] = {}
    trace_policy: dict[str, dict[str, Any]] = {}  # each run's policy fields from the trace's policy records
    out: list[ReplayDecision] = []
    for index, rec in enumerate(records):
        now_s = float(index)
        run = runs.get(rec.run_id)
        if rec.kind == "policy":
            fields = trace_policy.setdefault(rec.run_id, {})
            fields.update(rec.policy or {})
            if run is not None:  # a change mid-run: from the next record, as UpdatePolicy
                out.extend(_judge_train(rec.run_id, run))
                run.policy.update_policy(_config(fields, overrides))
            continue
        if run is None:
            config = _config(trace_policy.get(rec.run_id, {}), overrides)
            policy = RunPolicy(config, rec.world_size, rec.random_guess_loss, rec.num_classes)
            run = _RunReplay(policy, StepAggregator(rec.world_size), Counter())
            runs[rec.run_id] = run
        policy = run.policy
        if policy.num_classes is None and rec.num_classes is not None:
            policy.num_classes = rec.num_classes
        if policy.task_rgl is None and rec.random_guess_loss is not None:
            policy.task_rgl = rec.random_guess_loss  # a trace's first records may be train records without it
        if rec.kind == "train":
            last = run.train[-1][1] if run.train else None
            # A batch is one rank's consecutive steps (a step that does not advance starts a new one: the
            # trace went on from a restore), so an alarm's step names one record; or the batch the trace names.
            if last is not None and (
                last.rank != rec.rank
                or (
                    rec.batch != last.batch
                    if rec.batch is not None or last.batch is not None
                    else rec.step <= last.step or len(run.train) == TRAIN_BATCH
                )
            ):
                out.extend(_judge_train(rec.run_id, run))
            run.train.append((now_s, rec))
            continue
        out.extend(_judge_train(rec.run_id, run))
        # The k-th report of a step by a rank belongs with the other ranks' k-th report of that step.
        occurrence = run.occurrences[(rec.rank, rec.step)]
        run.occurrences[(rec.rank, rec.step)] += 1
        outcome, group = run.aggregator.add(
            rec.rank, occurrence, rec.step, rec.loss, now_s, rec.epoch, rec.random_guess_loss, rec.line
        )
        if outcome is AddOutcome.READY and group is not None:
            out.append(_decide(rec.run_id, policy, group, now_s))
    for run_id, run in runs.items():
        out.extend(_judge_train(run_id, run))
        for group in run.aggregator.flush():
            out.append(_decide(run_id, run.policy, group, float(len(records))))
    return out


def _config(trace_fields: Mapping[str, Any], overrides: Mapping[str, Any]) -> PolicyConfig:
    """Defaults, then the trace's policy fields for the run, then the caller's overrides."""
    return PolicyConfig().merged(trace_fields)[0].merged(overrides)[0]


def _judge_train(run_id: str, run: _RunReplay) -> list[ReplayDecision]:
    """Judge the run's pending train records as batches; records after an alarm form the next batch, on
    the timeline the command moved the run to."""
    out: list[ReplayDecision] = []
    policy = run.policy
    pending, run.train = run.train, []
    while pending:
        now_s, first = pending[0][0], pending[0][1]
        grads = [r.grad_norm for _, r in pending]
        lrs = [r.lr for _, r in pending]
        decision, _ = policy.judge_train_batch(
            policy.timeline,
            first.rank,
            np.array([r.step for _, r in pending], dtype=np.int64),
            np.array([r.loss for _, r in pending], dtype=np.float64),
            None if any(g is None for g in grads) else np.array(grads, dtype=np.float64),
            pending[-1][0],
            first.epoch,
            lrs=None if any(lr is None for lr in lrs) else np.array(lrs, dtype=np.float64),
        )
        alarm = (
            len(pending) if decision is None else next(i for i, (_, r) in enumerate(pending) if r.step == decision.step)
        )
        for t, rec in pending[:alarm]:  # the healthy records before the alarm, one decision each
            healthy = policy.judge_train_step(
                policy.timeline, rec.step, rec.rank, rec.loss, rec.grad_norm, t, rec.epoch
            )
            out.append(ReplayDecision(run_id, rec.line, healthy))
        if decision is None:
            break
        out.append(ReplayDecision(run_id, pending[alarm][1].line, decision))
        _complete(policy, decision, now_s)
        pending = pending[alarm + 1 :]
    return out


def _decide(run_id: str, policy: RunPolicy, group: StepGroup, now_s: float) -> ReplayDecision:
    decision = policy.judge_validation(
        policy.timeline, group.step, group.losses, now_s, group.epoch, group.record_rgl, group.missing
    )
    _complete(policy, decision, now_s)
    return ReplayDecision(run_id, max(group.seqs.values()), decision)


def _complete(policy: RunPolicy, decision: Decision, now_s: float) -> None:
    """Simulate every rank executing the command at once (and a controller resuming a HALT)."""
    command = decision.command
    if command is None:
        return
    ranks = range(policy.roster.world_size)
    if command.kind is CommandKind.HALT:
        for rank in ranks:
            policy.on_command_result(command.command_id, rank, True, policy.timeline, "", now_s)
        command = policy.resume("replay: resumed at once", now_s)
    new_timeline = policy.timeline + 1
    for rank in ranks:  # restored where the trace goes on: at the decision's step
        policy.on_command_result(command.command_id, rank, True, new_timeline, "", now_s, command.step)


def summarize(decisions: list[ReplayDecision]) -> dict[str, dict[str, Any]]:
    """Per-run counts: records by kind, verdicts, actions, punishment, final timeline."""
    summary: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "validation": 0,
            "train": 0,
            "verdicts": Counter(),
            "actions": Counter(),
            "total_punishment_reward": 0.0,
            "final_timeline": 0,
        }
    )
    for rd in decisions:
        s = summary[rd.run_id]
        d = rd.decision
        s[d.kind] += 1
        s["verdicts"][str(d.verdict)] += 1
        s["actions"][str(d.action)] += 1
        s["total_punishment_reward"] += d.punishment_reward or 0.0
        s["final_timeline"] = max(s["final_timeline"], d.timeline + (1 if d.command else 0))
    return dict(summary)
