"""The daemon's core: turns trainer messages and controller requests into policy calls, journal
entries, verdicts, commands and acknowledgements.

Runs on one asyncio event loop; the servicers are thin adapters around it. Order of effects for a
decision: policy state changes in memory, the entry is appended (effects included), a PANIC's entry
is fsynced, then its Verdict and then its Command go out; Acks follow durability.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from governor_daemon.clock import Clock, SystemClock
from governor_daemon.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PolicyConfigError,
    PolicyStateError,
)
from governor_daemon.journal import Committed, Entry, GroupCommitter, Journal, Recovery
from governor_daemon.journal.segments import DEFAULT_SEGMENT_BYTES
from governor_daemon.metrics import Metrics
from governor_daemon.policy import (
    AddOutcome,
    Command,
    Decision,
    Notice,
    PolicyConfig,
    RunState,
    StallTracker,
    StepGroup,
    Verdict,
)
from governor_daemon.policy.decisions import float_to_json
from governor_daemon.registry import RankState, Registry, Run, RunMeta
from governor_daemon.security import CALLER
from governor_daemon.service import codec
from governor_daemon.service.streams import StreamHandle
from governor_daemon.service.validation import (
    Limits,
    check_run_id,
    check_text,
    validate_command_result,
    validate_hello,
    validate_seq,
    validate_validation,
    validate_vitals,
)
from tolaria.governor.v1 import common_pb2, control_service_pb2, trainer_service_pb2

log = structlog.get_logger("governor")


@dataclass
class GovernorOptions:
    """What the core needs from the serve configuration."""

    data_dir: Path
    defaults: PolicyConfig = field(default_factory=PolicyConfig)
    locked_fields: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    group_commit_s: float = 0.002
    hmac_key: bytes | None = None
    repair: bool = False


class Governor:
    """All runs, the journal, and the open streams."""

    def __init__(self, options: GovernorOptions, clock: Clock | None = None) -> None:
        self.options = options
        self.clock: Clock = clock or SystemClock()
        self.registry = Registry()
        self.journal: GroupCommitter | None = None
        self.recovery = Recovery()
        self.stopping = asyncio.Event()
        self.metrics = Metrics()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> Recovery:
        """Open the journal, restore state from it, journal the start. Raises JournalCorruptError."""
        journal = Journal(self.options.data_dir, self.options.segment_bytes, self.options.hmac_key)
        self.recovery = journal.open(repair=self.options.repair)
        self.registry.restore(self.recovery.checkpoint, self.recovery.entries)
        journal.checkpoint_provider = self.registry.checkpoint
        self.journal = GroupCommitter(journal, self.options.group_commit_s)
        await self.journal.start()
        now_m = self.clock.monotonic()
        for run in self.registry.runs.values():
            for rank in run.ranks.values():
                rank.tracker = StallTracker(now_m)  # stall clocks restart at daemon start
        self._append(
            "",
            "daemon_start",
            {
                "runs_restored": len(self.registry.runs),
                "entries_applied": len(self.recovery.entries),
                "moved_aside": self.recovery.moved_aside,
            },
        )
        await self.journal.commit()
        return self.recovery

    async def close(self, reason: str = "daemon shutting down") -> None:
        """Tell every stream to end, journal the stop, flush and close the journal."""
        self.stopping.set()
        self.end_streams(reason)
        if self.journal is not None:
            self._append("", "daemon_stop", {"reason": reason})
            await self.journal.close()

    def end_streams(self, reason: str) -> None:
        """Ask every attached trainer to end its stream (it reconnects later)."""
        for run in self.registry.runs.values():
            for rank in run.ranks.values():
                if rank.stream is not None:
                    rank.stream.end(reason)

    @property
    def committer(self) -> GroupCommitter:
        """The journal (after start)."""
        assert self.journal is not None, "Governor.start() was not called"
        return self.journal

    def _append(self, run_id: str, kind: str, payload: dict[str, Any], effects: dict[str, Any] | None = None) -> Entry:
        if effects is not None:
            payload = {**payload, "effects": effects}
        entry = self.committer.append(run_id, kind, payload)
        if run_id and run_id in self.registry.runs:
            self.registry.runs[run_id].last_cursor = entry.seq
        return entry

    # ----------------------------------------------------------------- attach

    async def attach(self, hello: trainer_service_pb2.Hello, stream: StreamHandle) -> None:
        """Handle a Hello: create or join the run, bump the generation, send Welcome and open commands.

        Raises InvalidInputError, AlreadyExistsError, ConflictError or LimitExceededError; then
        nothing changed.
        """
        limits = self.options.limits
        validate_hello(hello, limits)
        overrides = codec.overrides_from_proto(hello.policy_overrides)
        try:
            config, ignored = self.options.defaults.merged(overrides, self.options.locked_fields)
        except PolicyConfigError as exc:
            raise InvalidInputError("hello.policy_overrides", str(exc)) from None
        run = self.registry.runs.get(hello.run_id)
        hello_rgl = hello.random_guess_loss if hello.HasField("random_guess_loss") else None
        num_classes = hello.num_classes if hello.HasField("num_classes") else None
        if run is None:
            active = sum(1 for r in self.registry.runs.values() if r.policy.state is not RunState.FINISHED)
            if active >= limits.max_active_runs:
                raise LimitExceededError(f"{active} active runs: the limit --max-active-runs is reached")
        else:
            self._check_rejoin(run, hello, overrides)
            state = run.ranks.get(hello.rank)
            if state is not None and state.stream is not None and not state.stream.closed:
                if state.stream.incarnation_id != hello.incarnation_id:
                    raise AlreadyExistsError(
                        f"run {hello.run_id} rank {hello.rank} is attached by live incarnation "
                        f"{state.stream.incarnation_id}; a second trainer cannot take it over"
                    )
                state.stream.end("replaced by a newer attachment of the same incarnation")
        if run is None:
            meta = RunMeta(hello.task, hello.world_size, overrides, hello_rgl, num_classes, ignored)
            run = Run.create(hello.run_id, meta, config)
            self.registry.runs[run.run_id] = run
            self._evict_finished()
            if ignored:
                log.warning("policy overrides ignored (locked)", run_id=run.run_id, fields=ignored)
            self._append(
                run.run_id,
                "run_created",
                {
                    "task": hello.task,
                    "world_size": hello.world_size,
                    "overrides": overrides,
                    "ignored_policy_fields": ignored,
                    "effective_policy": config.as_dict(),
                    "trainer_version": hello.trainer_version,
                },
                {"meta": meta.as_dict(), "policy": run.policy.to_dict()},
            )
        rank = run.rank(hello.rank)
        new_incarnation = rank.incarnation_id != hello.incarnation_id
        rank.incarnation_id = hello.incarnation_id
        rank.generation += 1
        rank.stream = stream
        rank.tracker = StallTracker(self.clock.monotonic())
        stream.bind(run.run_id, hello.rank, hello.incarnation_id, rank.generation)
        self._append(
            run.run_id,
            "attach",
            {
                "rank": hello.rank,
                "incarnation_id": hello.incarnation_id,
                "new_incarnation": new_incarnation,
                "generation": rank.generation,
                "last_durable_seq": rank.last_durable_seq,
                "peer": stream.peer,
                "caller": CALLER.get() or f"anonymous@{stream.peer}",
            },
            {"ranks": {str(hello.rank): rank.effect()}},
        )
        await self.committer.commit()
        welcome = trainer_service_pb2.Welcome(
            generation=rank.generation,
            effective_policy=codec.policy_to_proto(run.policy.config),
            last_durable_seq=rank.last_durable_seq,
            timeline=run.policy.timeline,
            run_state=codec.RUN_STATE_TO_PROTO[run.policy.state],
            ignored_policy_fields=run.meta.ignored_fields,
        )
        rgl = run.policy.random_guess_loss()
        if rgl is not None:
            welcome.random_guess_loss = rgl
        stream.send(trainer_service_pb2.AttachResponse(welcome=welcome))
        if run.policy.open is not None:  # re-send the open command on the new attachment
            stream.send(codec.command_to_proto(run.policy.open.command, rank.generation))
        log.info(
            "trainer attached",
            run_id=run.run_id,
            rank=hello.rank,
            generation=rank.generation,
            incarnation_id=hello.incarnation_id,
            last_durable_seq=rank.last_durable_seq,
        )

    def _check_rejoin(self, run: Run, hello: trainer_service_pb2.Hello, overrides: dict[str, Any]) -> None:
        if hello.world_size != run.meta.world_size:
            raise ConflictError(
                f"run {run.run_id} has world_size {run.meta.world_size}, Hello says {hello.world_size}; "
                "use a new run id for a different job"
            )
        if overrides != run.meta.overrides:
            raise ConflictError(
                f"run {run.run_id} was created with policy overrides {run.meta.overrides}, this Hello asks "
                f"for {overrides}; a later Hello must match (controllers change policy with UpdatePolicy)"
            )
        if run.policy.state is RunState.FINISHED:
            raise ConflictError(f"run {run.run_id} has finished; start a new run id")

    def detach(self, stream: StreamHandle) -> None:
        """The stream ended (either side)."""
        stream.closed = True
        run = self.registry.runs.get(stream.run_id)
        if run is None:
            return
        rank = run.ranks.get(stream.rank)
        if rank is not None and rank.stream is stream:
            rank.stream = None
            self._append(run.run_id, "detach", {"rank": stream.rank, "generation": stream.generation})

    # ----------------------------------------------------------------- trainer messages

    def _bound(self, stream: StreamHandle) -> tuple[Run, RankState]:
        run = self.registry.runs[stream.run_id]
        return run, run.rank(stream.rank)

    def _src(self, stream: StreamHandle, seq: int) -> dict[str, Any]:
        return {"rank": stream.rank, "incarnation_id": stream.incarnation_id, "seq": seq}

    def _is_duplicate(self, stream: StreamHandle, rank: RankState, last_seq: int) -> bool:
        if last_seq <= rank.last_durable_seq:
            stream.track_ack(self.committer.journal.last_seq, rank.last_durable_seq)
            return True
        return False

    def _accept_report(self, stream: StreamHandle, seq: int) -> tuple[Run, RankState] | None:
        """Accept a single-seq report (snapshot, command result, finish); None for a resent duplicate."""
        run, rank = self._bound(stream)
        if self._is_duplicate(stream, rank, seq):
            return None
        rank.accept_seq(seq)
        return run, rank

    def _observe_step(self, run: Run, rank: RankState, step: int) -> None:
        rank.latest_step = max(rank.latest_step, step)
        if rank.tracker is not None and rank.tracker.observe_step(step, self.clock.monotonic()):
            run.policy.set_stalled(rank.rank, False)
            self._append(
                run.run_id,
                "stall_cleared",
                {"rank": rank.rank, "step": step},
                {"policy": run.policy.to_dict()},
            )

    def _stale(
        self,
        stream: StreamHandle,
        run: Run,
        rank: RankState,
        what: str,
        seq: int,
        timeline: int,
        extra: dict[str, Any],
    ) -> None:
        self.metrics.stale.inc()
        rank.accept_seq(seq)
        entry = self._append(
            run.run_id,
            "stale",
            {
                "what": what,
                **self._src(stream, seq),
                "timeline": timeline,
                "current_timeline": run.policy.timeline,
                **extra,
            },
            {"ranks": {str(rank.rank): rank.effect()}},
        )
        stream.track_ack(entry.seq, seq)

    def _check_future(self, field_name: str, run: Run, timeline: int) -> None:
        if timeline > run.policy.timeline:
            raise InvalidInputError(
                field_name, f"timeline {timeline} is ahead of the run's timeline {run.policy.timeline}"
            )

    async def on_vitals(self, stream: StreamHandle, batch: trainer_service_pb2.VitalsBatch) -> None:
        """Train-step records: seq filter, stale check, non-finite signal, stall progress."""
        all_steps = validate_vitals(batch, self.options.limits)
        run, rank = self._bound(stream)
        n = len(batch.step)
        last = batch.first_seq + n - 1
        if self._is_duplicate(stream, rank, last):
            return
        skip = max(0, rank.last_durable_seq + 1 - batch.first_seq)
        if run.policy.is_stale(batch.timeline):
            self._stale(
                stream,
                run,
                rank,
                "vitals_batch",
                last,
                batch.timeline,
                {"first_seq": batch.first_seq, "num_records": n - skip},
            )
            return
        self._check_future("vitals_batch.timeline", run, batch.timeline)
        # The repeated fields themselves when nothing is skipped: copying 256 values costs more than the rest.
        losses: Sequence[float] = batch.loss[skip:] if skip else batch.loss
        grads: Sequence[float] = batch.grad_norm[skip:] if skip else batch.grad_norm
        steps = all_steps[skip:]
        gaps_before = rank.num_gaps
        rank.accept_seq(last, batch.first_seq + skip)
        rank.num_records += n - skip
        self.metrics.records.inc(n - skip, kind="train")
        self.metrics.gaps.inc(rank.num_gaps - gaps_before)
        max_step = int(steps.max())
        self._observe_step(run, rank, max_step)
        decision: Decision | None = None
        bad = _first_non_finite(losses, grads)
        if bad is not None:
            decision = run.policy.judge_train_step(
                batch.timeline,
                int(steps[bad]),
                stream.rank,
                losses[bad],
                grads[bad] if len(grads) else None,
                self.clock.time(),
            )
        payload: dict[str, Any] = {
            **self._src(stream, last),
            "first_seq": batch.first_seq + skip,
            "num_records": n - skip,
            "num_gaps": rank.num_gaps - gaps_before,
            "num_dropped": batch.num_dropped_records,
            "max_step": max_step,
            "timeline": batch.timeline,
        }
        effects: dict[str, Any] = {"ranks": {str(rank.rank): rank.effect()}}
        if decision is not None:
            payload["decision"] = decision.as_dict()
            effects["policy"] = run.policy.to_dict()
        entry = self._append(run.run_id, "vitals", payload, effects)
        if decision is not None and decision.command is not None:
            await self.committer.commit()
            self._broadcast(run, decision.command)
        stream.track_ack(entry.seq, last)

    async def on_validation(self, stream: StreamHandle, record: trainer_service_pb2.ValidationRecord) -> None:
        """One validation record: decide now (one rank) or when the step is complete (several)."""
        received = time.perf_counter()
        validate_validation(record, self.options.limits)
        run, rank = self._bound(stream)
        if self._is_duplicate(stream, rank, record.seq):
            return
        details = _validation_details(record)
        if run.policy.is_stale(record.timeline):
            self._stale(stream, run, rank, "validation_record", record.seq, record.timeline, details)
            return
        self._check_future("validation_record.timeline", run, record.timeline)
        gaps_before = rank.num_gaps
        rank.accept_seq(record.seq)
        rank.num_records += 1
        self.metrics.records.inc(kind="validation")
        self.metrics.gaps.inc(rank.num_gaps - gaps_before)
        self._observe_step(run, rank, record.step)
        record_rgl = record.random_guess_loss if record.HasField("random_guess_loss") else None
        if run.meta.world_size == 1:
            group = StepGroup(
                record.timeline,
                record.step,
                self.clock.time(),
                record.epoch,
                record_rgl,
                {stream.rank: record.loss},
                {stream.rank: record.seq},
            )
            entry = await self._decide(run, group, {"record": details})
            self.metrics.decision_latency.observe(time.perf_counter() - received)
            stream.track_ack(entry.seq, record.seq)
            return
        outcome, ready = run.aggregator.add(
            stream.rank,
            record.timeline,
            record.step,
            record.loss,
            self.clock.time(),
            record.epoch,
            record_rgl,
            record.seq,
        )
        effects = {"ranks": {str(rank.rank): rank.effect()}, "pending": run.aggregator.to_dict()}
        if outcome is AddOutcome.LATE:
            self.metrics.late.inc()
        if outcome in (AddOutcome.LATE, AddOutcome.DUPLICATE):
            entry = self._append(run.run_id, str(outcome), {**self._src(stream, record.seq), **details}, effects)
        else:
            entry = self._append(run.run_id, "report", {**self._src(stream, record.seq), **details}, effects)
            if ready is not None:
                await self._decide(run, ready, {})
        stream.track_ack(entry.seq, record.seq)

    async def _decide(self, run: Run, group: StepGroup, extra: dict[str, Any]) -> Entry:
        policy = run.policy
        for missing in group.missing:
            policy.set_stalled(missing, True)
        decision = policy.judge_validation(
            group.timeline,
            group.step,
            group.losses,
            self.clock.time(),
            group.epoch,
            group.record_rgl,
            group.missing,
        )
        entry = self._append(
            run.run_id,
            "decision",
            {
                **extra,
                "seqs": {str(r): s for r, s in group.seqs.items()},
                "decision": decision.as_dict(),
            },
            {
                "policy": policy.to_dict(),
                "ranks": {str(r): run.rank(r).effect() for r in group.seqs},
                "pending": run.aggregator.to_dict(),
            },
        )
        self.metrics.verdicts.inc(kind=str(decision.verdict))
        if decision.verdict is Verdict.PANIC:
            self.metrics.panics.inc(rule=str(decision.rule))
        if decision.command is not None:
            await self.committer.commit()  # the decision is durable before its command leaves
        for rank_id, seq in group.seqs.items():
            target = run.ranks.get(rank_id)
            if target is not None and target.stream is not None:
                target.stream.send(codec.verdict_to_proto(decision, seq))
        if decision.command is not None:
            self._broadcast(run, decision.command)
        return entry

    async def on_snapshot(self, stream: StreamHandle, snap: trainer_service_pb2.SnapshotTaken) -> None:
        """The trainer published a snapshot: journal it."""
        validate_seq("snapshot_taken.seq", snap.seq)
        check_text("snapshot_taken.location", snap.location, self.options.limits)
        accepted = self._accept_report(stream, snap.seq)
        if accepted is None:
            return
        run, rank = accepted
        entry = self._append(
            run.run_id,
            "snapshot",
            {
                **self._src(stream, snap.seq),
                "timeline": snap.timeline,
                "step": snap.step,
                "snapshot_bytes": snap.snapshot_bytes,
                "duration_ms": snap.duration_ms,
                "location": snap.location,
            },
            {"ranks": {str(rank.rank): rank.effect()}},
        )
        stream.track_ack(entry.seq, snap.seq)

    async def on_command_result(self, stream: StreamHandle, result: trainer_service_pb2.CommandResult) -> None:
        """Close (or progress) the open command; a failure HALTs the run."""
        validate_command_result(result, self.options.limits)
        accepted = self._accept_report(stream, result.seq)
        if accepted is None:
            return
        run, rank = accepted
        succeeded = result.outcome == common_pb2.COMMAND_OUTCOME_SUCCEEDED
        if run.policy.open is not None and run.policy.open.command.command_id == result.command_id:
            kind = str(run.policy.open.command.kind)
            self.metrics.commands.inc(type=kind, outcome="succeeded" if succeeded else "failed")
        notices = run.policy.on_command_result(
            result.command_id, stream.rank, succeeded, result.new_timeline, result.error, self.clock.time()
        )
        entry = self._append(
            run.run_id,
            "command_result",
            {
                **self._src(stream, result.seq),
                "command_id": result.command_id,
                "succeeded": succeeded,
                "new_timeline": result.new_timeline,
                "restored_step": result.restored_step,
                "duration_ms": result.duration_ms,
                "error": result.error,
                "num_culled_seeds": result.num_culled_seeds,
                "notices": [_notice(n) for n in notices],
            },
            {"policy": run.policy.to_dict(), "ranks": {str(rank.rank): rank.effect()}},
        )
        follow_up = [n.command for n in notices if n.command is not None]
        if follow_up:
            await self.committer.commit()
            for command in follow_up:
                self._broadcast(run, command)
        stream.track_ack(entry.seq, result.seq)

    def on_heartbeat(self, stream: StreamHandle, beat: trainer_service_pb2.Heartbeat) -> None:
        """Keeps the stream alive; a step beyond the latest counts as progress."""
        run, rank = self._bound(stream)
        if beat.latest_step >= 0:
            self._observe_step(run, rank, beat.latest_step)

    async def on_finish(self, stream: StreamHandle, finish: trainer_service_pb2.Finish) -> None:
        """A rank is done."""
        validate_seq("finish.seq", finish.seq)
        check_text("finish.message", finish.message, self.options.limits)
        accepted = self._accept_report(stream, finish.seq)
        if accepted is None:
            return
        run, rank = accepted
        run.policy.finish(stream.rank)
        payload: dict[str, Any] = {
            **self._src(stream, finish.seq),
            "status": common_pb2.FinishStatus.Name(finish.status),
            "epochs_completed": finish.epochs_completed,
            "num_rollbacks": finish.num_rollbacks,
            "message": finish.message,
            "duration_s": finish.duration_s,
        }
        if finish.HasField("final_validation_loss"):
            payload["final_validation_loss"] = float_to_json(finish.final_validation_loss)
        if finish.HasField("final_validation_accuracy"):
            payload["final_validation_accuracy"] = finish.final_validation_accuracy
        entry = self._append(
            run.run_id,
            "finish",
            payload,
            {"policy": run.policy.to_dict(), "ranks": {str(rank.rank): rank.effect()}},
        )
        stream.track_ack(entry.seq, finish.seq)
        self._evict_finished()

    def _broadcast(self, run: Run, command: Command) -> None:
        self.metrics.commands.inc(type=str(command.kind), outcome="sent")
        for rank in run.ranks.values():
            if rank.stream is not None:
                rank.stream.send(codec.command_to_proto(command, rank.generation))

    def _evict_finished(self) -> None:
        finished = [r for r in self.registry.runs.values() if r.policy.state is RunState.FINISHED]
        excess = len(finished) - self.options.limits.retain_finished_runs
        for run in finished[: max(0, excess)]:
            del self.registry.runs[run.run_id]
            log.info("finished run evicted from memory", run_id=run.run_id)

    def auth_failure(self, method: str, peer: str, why: str, code: Any) -> None:
        """Journal a refused call (UNAUTHENTICATED or PERMISSION_DENIED)."""
        name = str(getattr(code, "name", code))
        self.metrics.auth_failures.inc(code=name)
        if self.journal is not None and not self.stopping.is_set():
            self._append("", "auth_failure", {"method": method, "peer": peer, "reason": why, "code": name})
        log.warning("call refused", method=method, peer=peer, reason=why)

    # ----------------------------------------------------------------- periodic work

    async def tick(self) -> None:
        """Rank deadlines, stalls and command timeouts. Call a few times a second."""
        now, now_m = self.clock.time(), self.clock.monotonic()
        for run in list(self.registry.runs.values()):
            policy = run.policy
            if policy.state is RunState.FINISHED:
                continue
            for group in run.aggregator.due(now, policy.config.rank_deadline_s):
                self._append(
                    run.run_id,
                    "rank_deadline",
                    {
                        "step": group.step,
                        "timeline": group.timeline,
                        "missing_ranks": list(group.missing),
                        "rank_deadline_s": policy.config.rank_deadline_s,
                    },
                )
                await self._decide(run, group, {"after_deadline": True})
            for rank in run.ranks.values():
                if rank.rank in policy.finished_ranks or rank.tracker is None:
                    continue
                if rank.tracker.check(now_m, policy.config.stall_timeout_s):
                    policy.set_stalled(rank.rank, True)
                    self._append(
                        run.run_id,
                        "stall",
                        {
                            "rank": rank.rank,
                            "latest_step": rank.latest_step,
                            "seconds_without_progress": round(rank.tracker.seconds_since_progress(now_m), 3),
                            "threshold_s": rank.tracker.threshold_s(policy.config.stall_timeout_s),
                        },
                        {"policy": policy.to_dict()},
                    )
            for notice in policy.check_timeouts(now):
                self.metrics.commands.inc(type="unknown", outcome="timeout")
                self._append(run.run_id, notice.kind, _notice(notice), {"policy": policy.to_dict()})
                log.warning("command timed out; run halted", run_id=run.run_id, reason=notice.reason)

    # ----------------------------------------------------------------- controllers

    def run(self, run_id: str) -> Run:
        """The run, or NotFoundError."""
        check_run_id("run_id", run_id)
        run = self.registry.runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}; `governor runs` lists the known runs")
        return run

    def status(self, run_id: str) -> control_service_pb2.RunStatus:
        """GetPanicState."""
        return codec.run_status_to_proto(self.run(run_id), self.clock.time(), self.clock.monotonic())

    def list_runs(self, states: Iterable[int]) -> list[control_service_pb2.RunStatus]:
        """ListRuns, optionally filtered by proto run states."""
        by_value = {int(k): v for k, v in codec.PROTO_TO_RUN_STATE.items()}
        wanted = {by_value[s] for s in states if s in by_value}
        now, now_m = self.clock.time(), self.clock.monotonic()
        return [
            codec.run_status_to_proto(run, now, now_m)
            for run in self.registry.runs.values()
            if not wanted or run.policy.state in wanted
        ]

    async def request_rollback(self, run_id: str, reason: str, caller: str) -> Command:
        """A controller's ROLLBACK. PolicyStateError if not possible now."""
        check_text("reason", reason, self.options.limits)
        run = self.run(run_id)
        command = run.policy.request_rollback(reason, self.clock.time())
        return await self._controller_command(run, "rollback", reason, caller, command)

    async def halt(self, run_id: str, reason: str, caller: str) -> Command:
        """A controller's HALT."""
        check_text("reason", reason, self.options.limits)
        run = self.run(run_id)
        command = run.policy.halt(reason, self.clock.time())
        return await self._controller_command(run, "halt", reason, caller, command)

    async def resume(self, run_id: str, reason: str, caller: str) -> Command:
        """A controller's Resume of a HALTED run."""
        check_text("reason", reason, self.options.limits)
        run = self.run(run_id)
        command = run.policy.resume(reason, self.clock.time())
        return await self._controller_command(run, "resume", reason, caller, command)

    async def _controller_command(self, run: Run, action: str, reason: str, caller: str, command: Command) -> Command:
        self._append(
            run.run_id,
            "controller_request",
            {
                "action": action,
                "reason": reason,
                "caller": caller,
                "command": command.as_dict(),
            },
            {"policy": run.policy.to_dict()},
        )
        await self.committer.commit()
        self._broadcast(run, command)
        log.info(
            "controller request",
            run_id=run.run_id,
            action=action,
            caller=caller,
            command_id=command.command_id,
        )
        return command

    async def update_policy(self, run_id: str, changes: dict[str, Any], caller: str) -> PolicyConfig:
        """A controller's UpdatePolicy; effective from the next record. InvalidInputError for bad values."""
        run = self.run(run_id)
        if not changes:
            raise InvalidInputError("changes", "no policy field is set")
        try:
            config, _ = run.policy.config.merged(changes)
        except PolicyConfigError as exc:
            raise InvalidInputError("changes", str(exc)) from None
        before = run.policy.config.as_dict()
        run.policy.update_policy(config)
        self._append(
            run.run_id,
            "policy_change",
            {
                "caller": caller,
                "changes": changes,
                "before": {k: before[k] for k in changes},
                "effective_policy": config.as_dict(),
            },
            {"policy": run.policy.to_dict()},
        )
        await self.committer.commit()
        return config

    async def watch(self, cursor: int, run_ids: Iterable[str], kinds: Iterable[str]) -> AsyncIterator[Committed]:
        """Committed journal entries after ``cursor``, filtered, then live ones until shutdown."""
        runs, wanted = set(run_ids), set(kinds)
        for run_id in runs:
            check_run_id("run_ids", run_id)
        async for entry in self.committer.follow(cursor, self.stopping):
            if (not runs or entry.run in runs) and (not wanted or entry.kind in wanted):
                yield entry


def _first_non_finite(losses: Sequence[float], grads: Sequence[float]) -> int | None:
    """Index of the first record whose loss or gradient norm (when sent) is NaN or infinite."""
    isfinite = math.isfinite
    # A sum is finite only if every term is (or it overflowed): one C-level pass in the common case.
    if isfinite(sum(losses)) and isfinite(sum(grads)):
        return None
    for i, loss in enumerate(losses):
        if not isfinite(loss) or (len(grads) and not isfinite(grads[i])):
            return i
    return None


def _validation_details(record: trainer_service_pb2.ValidationRecord) -> dict[str, Any]:
    details: dict[str, Any] = {
        "seq": record.seq,
        "timeline": record.timeline,
        "step": record.step,
        "epoch": record.epoch,
        "loss": float_to_json(record.loss),
    }
    for name in ("accuracy", "perplexity", "train_loss", "train_accuracy", "random_guess_loss"):
        if record.HasField(name):
            details[name] = float_to_json(getattr(record, name))
    if record.per_class_accuracy:
        details["per_class_accuracy"] = [float_to_json(x) for x in record.per_class_accuracy]
    if record.seeds:
        details["seeds"] = [
            {"slot": s.slot, "blueprint": s.blueprint, "stage": s.stage, "alpha": s.alpha} for s in record.seeds
        ]
    return details


def _notice(notice: Notice) -> dict[str, Any]:
    return {
        "kind": notice.kind,
        "reason": notice.reason,
        "command": notice.command.as_dict() if notice.command else None,
    }


__all__ = ["Governor", "GovernorOptions", "PolicyStateError"]
