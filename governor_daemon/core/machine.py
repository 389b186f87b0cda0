"""The daemon's protocol as a deterministic state machine: ``GovernorCore.handle(event) -> Effects``.

Everything the daemon decides happens here, synchronously, with no grpc, protobuf, asyncio, file or
clock access: events come in (``core/events.py``), and journal entries, messages and replies come
out as data (``core/effects.py``). The same object runs in ``governor serve`` and in the seeded
simulation of ``tests/simulation``. The rules it implements, and the invariants they keep, are
written down in docs/protocol.md.

Every handler first checks everything that can refuse the event (raising ``GovernorError``, having
changed nothing), then changes state and records each change as an entry in the same call: no state
change without its entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from governor_daemon import train_records
from governor_daemon.core import events as ev
from governor_daemon.core.effects import (
    Ack,
    CommandOut,
    Effects,
    EndStream,
    Resync,
    VerdictOut,
    Welcome,
)
from governor_daemon.core.kinds import EntryKind
from governor_daemon.core.registry import RankState, Registry, Run, RunMeta
from governor_daemon.core.undo import undo_point
from governor_daemon.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    PolicyConfigError,
    PolicyStateError,
)
from governor_daemon.journal.entry import Entry
from governor_daemon.policy import (
    AddOutcome,
    Command,
    CommandKind,
    Notice,
    PolicyConfig,
    RunState,
    StallTracker,
    StepGroup,
    Verdict,
)
from governor_daemon.policy.decisions import float_to_json
from governor_daemon.policy.steps import pinned_states_to_json, verification_steps

MAX_SEQ_JUMP = 1 << 32
"""The furthest a message's seq may lie beyond the rank's last accepted seq (gaps stay countable)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send and on what the daemon keeps."""

    max_records_per_batch: int = 4096
    max_string_length: int = 4096
    max_per_class: int = 100_000
    max_active_runs: int = 1024
    retain_finished_runs: int = 256
    max_active_runs_per_principal: int = 256
    idle_run_expiry_s: float = 7 * 24 * 3600.0
    """A run with no trainer attached for this long leaves memory (0: never)."""
    journal_train_records: int = 10_000
    """While a run has sent fewer records than this (all ranks), its vitals entries keep each train-step
    record, not only the batch summary (governor_daemon/train_records.py; 0: never)."""


@dataclass(frozen=True)
class CoreOptions:
    """What the core needs from the serve configuration."""

    defaults: PolicyConfig = field(default_factory=PolicyConfig)
    locked_fields: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Binding:
    """Which (run, rank, incarnation, generation) a stream is attached as."""

    run_id: str
    rank: int
    incarnation_id: str
    generation: int


@dataclass(frozen=True)
class CommandReply:
    """What a controller's ROLLBACK, HALT or Resume answers."""

    command: Command
    run_state: RunState


class GovernorCore:
    """All runs and which stream each rank is attached by. Not thread-safe: one caller at a time."""

    def __init__(self, options: CoreOptions | None = None) -> None:
        self.options = options or CoreOptions()
        self.registry = Registry()
        self.streams: dict[int, Binding] = {}

    # ----------------------------------------------------------------- state

    def restore(self, checkpoint: dict[str, Any] | None, entries: Sequence[Entry]) -> None:
        """Rebuild the journaled state from a checkpoint and the entries after it (before ``Start``)."""
        self.registry.restore(checkpoint, list(entries))
        self.streams.clear()

    def checkpoint(self) -> dict[str, Any]:
        """Every run's journaled state (a checkpoint entry's payload)."""
        return self.registry.checkpoint()

    def note_appended(self, run_id: str, seq: int) -> None:
        """The adapter appended an entry of ``run_id`` as ``seq`` (a run's ``last_cursor``)."""
        run = self.registry.runs.get(run_id)
        if run is not None:
            run.last_cursor = seq

    def run(self, run_id: str) -> Run:
        """The run, or NotFoundError."""
        run = self.registry.runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}; `governor runs` lists the known runs")
        return run

    # ----------------------------------------------------------------- dispatch

    @contextmanager
    def transaction(self, event: ev.Event) -> Iterator[Effects]:
        """Apply one event and yield its effects for the caller to journal; if anything raises, in the
        handler or in the caller's block (the journal refusing an entry), the state is put back as it was
        (core/undo.py) and the exception goes on: an event changes nothing unless its entries are appended."""
        undo = undo_point(self, event)
        try:
            yield self._dispatch(event)
        except BaseException:
            undo()
            raise

    def handle(self, event: ev.Event) -> Effects:
        """Apply one event. Raises GovernorError for a refused event, or whatever else raised inside it; either
        way it changed nothing (``transaction``)."""
        with self.transaction(event) as fx:
            return fx

    def _dispatch(self, event: ev.Event) -> Effects:
        fx = Effects()
        match event:
            case ev.Vitals():
                self._vitals(event, fx)
            case ev.Validation():
                self._validation(event, fx)
            case ev.Attach():
                self._attach(event, fx)
            case ev.SnapshotTaken():
                self._snapshot(event, fx)
            case ev.SnapshotAdopted():
                self._adopted(event, fx)
            case ev.CommandResult():
                self._command_result(event, fx)
            case ev.Heartbeat():
                pass  # liveness only: never progress, never journaled
            case ev.Finish():
                self._finish(event, fx)
            case ev.Detach():
                self._detach(event, fx)
            case ev.RequestRollback() | ev.Halt() | ev.Resume():
                self._controller_command(event, fx)
            case ev.UpdatePolicy():
                self._update_policy(event, fx)
            case ev.ForgetRun():
                self._forget(event, fx)
            case ev.Tick():
                self._tick(event.now, fx)
            case ev.Start():
                self._start(event, fx)
            case ev.Stop():
                self._stop(event, fx)
        return fx

    # ----------------------------------------------------------------- attach and detach

    def _attach(self, e: ev.Attach, fx: Effects) -> None:
        limits = self.options.limits
        try:
            config, ignored = self.options.defaults.merged(e.overrides, self.options.locked_fields)
        except PolicyConfigError as exc:
            raise InvalidInputError("hello.policy_overrides", str(exc)) from None
        run = self.registry.runs.get(e.run_id)
        replaced: int | None = None
        if run is None:
            active = [r for r in self.registry.runs.values() if r.policy.state is not RunState.FINISHED]
            if len(active) >= limits.max_active_runs:
                raise LimitExceededError(f"{len(active)} active runs: the limit --max-active-runs is reached")
            own = sum(1 for r in active if r.meta.owner == e.principal)
            if own >= limits.max_active_runs_per_principal:
                raise LimitExceededError(
                    f"{e.principal or 'this caller'} has {own} active runs: the limit "
                    "--max-active-runs-per-principal is reached (finish or forget one)"
                )
        else:
            if run.meta.owner != e.principal:
                raise PermissionDeniedError(
                    f"run {e.run_id} belongs to another principal; {e.principal or 'an anonymous caller'} "
                    "may not attach to it (use a run id of your own)"
                )
            _check_rejoin(run, e)
            current = run.ranks.get(e.rank)
            if current is not None and current.stream is not None:
                if current.incarnation_id != e.incarnation_id:
                    raise AlreadyExistsError(
                        f"run {e.run_id} rank {e.rank} is attached by another live trainer process; "
                        "a second trainer cannot take it over"
                    )
                replaced = current.stream
        if run is None:
            life = self.registry.lives + 1
            meta = RunMeta(
                e.task, e.world_size, e.overrides, e.random_guess_loss, e.num_classes, ignored, e.principal, life
            )
            run = Run.create(e.run_id, meta, config)
            self.registry.lives = life
            run.policy.timeline = e.timeline  # a trainer whose run the daemon no longer holds is not "ahead"
            self.registry.runs[run.run_id] = run
            fx.append(
                run.run_id,
                EntryKind.RUN_CREATED,
                {
                    "task": e.task,
                    "world_size": e.world_size,
                    "timeline": e.timeline,
                    "overrides": e.overrides,
                    "ignored_policy_fields": ignored,
                    "effective_policy": config.as_dict(),
                    "trainer_version": e.trainer_version,
                    "effects": {
                        "meta": meta.as_dict(),
                        "policy": run.policy.to_dict(),
                        "ranks": {str(r): state.effect() for r, state in run.ranks.items()},
                    },
                },
            )
            self._evict_finished(fx)
        if replaced is not None:
            fx.send(replaced, EndStream("replaced by a newer attachment of the same incarnation"))
            self.streams.pop(replaced, None)
        rank = run.rank(e.rank)
        new_incarnation = rank.incarnation_id != e.incarnation_id
        rank.incarnation_id = e.incarnation_id
        rank.generation += 1
        rank.stream = e.stream
        rank.tracker = StallTracker(e.now)
        self.streams[e.stream] = Binding(run.run_id, e.rank, e.incarnation_id, rank.generation)
        fx.append(
            run.run_id,
            EntryKind.ATTACH,
            {
                "rank": e.rank,
                "incarnation_id": e.incarnation_id,
                "new_incarnation": new_incarnation,
                "generation": rank.generation,
                "last_durable_seq": rank.last_durable_seq,
                "peer": e.peer,
                "caller": e.caller,
                "effects": {"ranks": {str(e.rank): rank.effect()}},
            },
        )
        policy = run.policy
        fx.send(
            e.stream,
            Welcome(
                rank.generation,
                policy.config,
                rank.last_durable_seq,
                policy.timeline,
                policy.state,
                policy.random_guess_loss(),
                tuple(run.meta.ignored_fields),
                verification_steps(policy.config),
                run.meta.life,
                rank.last_snapshot,
            ),
        )
        resend = policy.open.command if policy.open is not None else policy.halting_command()
        if resend is not None:  # the open command, or the HALT a halted run's new trainer must obey
            fx.send(e.stream, CommandOut(resend, rank.generation))

    def _detach(self, e: ev.Detach, fx: Effects) -> None:
        self._unbind(e.stream, e.now, fx)

    def _unbind(self, stream: int, now: float, fx: Effects) -> None:
        """The stream's attachment ends: a Detach, or an EndStream the core sends itself (the stall watchdog),
        after which the runtime no longer reports the stream's end."""
        binding = self.streams.pop(stream, None)
        if binding is None:
            return
        run = self.registry.runs.get(binding.run_id)
        rank = run.ranks.get(binding.rank) if run is not None else None
        if run is not None and rank is not None and rank.stream == stream:
            rank.stream = None
            if all(r.stream is None for r in run.ranks.values()):
                run.idle_since = now
            fx.append(run.run_id, EntryKind.DETACH, {"rank": binding.rank, "generation": binding.generation})

    # ----------------------------------------------------------------- records

    def _bound(self, stream: int) -> tuple[Binding, Run, RankState] | None:
        """The stream's run and rank; None for a stream that was replaced or ended (its messages are moot)."""
        binding = self.streams.get(stream)
        if binding is None:
            return None
        run = self.registry.runs.get(binding.run_id)
        if run is None:
            return None
        return binding, run, run.rank(binding.rank)

    def _check_seq(self, field_name: str, rank: RankState, first_seq: int) -> None:
        if first_seq > rank.last_durable_seq + MAX_SEQ_JUMP:
            raise InvalidInputError(
                field_name,
                f"seq {first_seq} jumps more than {MAX_SEQ_JUMP} past the last accepted seq {rank.last_durable_seq}",
            )

    def _classify(self, field_name: str, run: Run, timeline: int) -> bool:
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

    def _stale(
        self,
        fx: Effects,
        binding: Binding,
        run: Run,
        rank: RankState,
        what: str,
        first_seq: int,
        last_seq: int,
        timeline: int,
        extra: dict[str, Any],
    ) -> None:
        """Journal records of a left timeline, unjudged; tell a rank that has no command in flight."""
        rank.accept_seq(last_seq, first_seq)
        policy = run.policy
        in_flight = policy.open is not None and rank.rank not in policy.open.ranks_done
        fx.append(
            run.run_id,
            EntryKind.STALE,
            {
                "what": what,
                "rank": binding.rank,
                "incarnation_id": binding.incarnation_id,
                "seq": last_seq,
                "first_seq": first_seq,
                "timeline": timeline,
                "current_timeline": policy.timeline,
                "resync": not in_flight,
                **extra,
                "effects": {"ranks": {str(rank.rank): rank.effect()}},
            },
        )
        if not in_flight:
            fx.send(
                rank.stream,
                Resync(
                    policy.timeline,
                    last_seq,
                    f"records up to seq {last_seq} are on timeline {timeline}, the run is on {policy.timeline}: "
                    "journaled as stale, not judged",
                    policy.state,
                ),
            )
        fx.send(rank.stream, Ack(last_seq))

    def _progress(self, fx: Effects, run: Run, rank: RankState, timeline: int, step: int, now: float) -> None:
        """A record at (timeline, step): if it is later than the rank's latest, that is progress: the
        position moves, the stall clock restarts and a rank marked STALLED (no progress, or a missed
        rank deadline) recovers. A record at the latest position again is no progress.

        Call before the record's own entry, whose rank effect then holds the new position."""
        if rank.tracker is not None:
            rank.tracker.observe_step(step, now, timeline)
        if (timeline, step) <= (rank.latest_timeline, rank.latest_step):
            return
        rank.latest_timeline, rank.latest_step = timeline, step
        if rank.rank in run.policy.stalled_ranks:
            run.policy.set_stalled(rank.rank, False)
            fx.append(
                run.run_id,
                EntryKind.STALL_CLEARED,
                {"rank": rank.rank, "timeline": timeline, "step": step, "effects": {"policy": run.policy.to_dict()}},
            )

    def _vitals(self, e: ev.Vitals, fx: Effects) -> None:
        bound = self._bound(e.stream)
        if bound is None:
            return
        binding, run, rank = bound
        last = e.last_seq
        if last <= rank.last_durable_seq:
            fx.send(e.stream, Ack(rank.last_durable_seq))
            return
        self._check_seq("vitals_batch.first_seq", rank, e.first_seq)
        skip = max(0, rank.last_durable_seq + 1 - e.first_seq)
        first = e.first_seq + skip
        if not self._classify("vitals_batch.timeline", run, e.timeline):
            self._stale(
                fx, binding, run, rank, "vitals_batch", first, last, e.timeline, {"num_records": len(e.steps) - skip}
            )
            return
        steps = e.steps[skip:] if skip else e.steps
        gaps_before = rank.num_gaps
        rank.accept_seq(last, first)
        max_step = int(steps.max())
        self._progress(fx, run, rank, e.timeline, max_step, e.now)
        num = len(steps)
        payload: dict[str, Any] = {
            "rank": binding.rank,
            "incarnation_id": binding.incarnation_id,
            "seq": last,
            "first_seq": first,
            "num_records": 0 if e.shed else num,
            "num_gaps": rank.num_gaps - gaps_before,
            "num_dropped": e.num_dropped,
            "max_step": max_step,
            "timeline": e.timeline,
        }
        loss_array = np.asarray(e.losses[skip:] if skip else e.losses, dtype=np.float64)
        grad_array = np.asarray(e.grads[skip:] if skip else e.grads, dtype=np.float64) if len(e.grads) else None
        lr_array = np.asarray(e.lrs[skip:] if skip else e.lrs, dtype=np.float64) if len(e.lrs) else None
        # A shed batch gets the non-finite check only (docs/protocol.md, "Shedding")
        decision, step_state = run.policy.judge_train_batch(
            e.timeline,
            binding.rank,
            np.asarray(steps, dtype=np.int64),
            loss_array,
            grad_array,
            e.now,
            lrs=lr_array,
            pins=e.pins,
            shed=e.shed,
        )
        if e.shed:
            rank.num_shed += num
            payload["num_shed"] = num
        else:
            budget = self.options.limits.journal_train_records
            if budget and sum(r.num_records for r in run.ranks.values()) < budget:
                payload["records"] = train_records.encode(np.asarray(steps), loss_array, grad_array, lr_array)
            rank.num_records += num
            payload["train"] = train_summary(steps, loss_array, grad_array)
        effects: dict[str, Any] = {"ranks": {str(rank.rank): rank.effect()}}
        if step_state is not None:
            effects["steps"] = {str(binding.rank): step_state.as_dict()}
        if decision is not None:
            payload["decision"] = decision.as_dict()
            effects["policy"] = run.policy.to_dict()
        fx.append(run.run_id, EntryKind.VITALS, {**payload, "effects": effects}, sync=decision is not None)
        if decision is not None and decision.command is not None:
            self._issue(fx, run, decision.command, "train_step")
        fx.send(e.stream, Ack(last, num_shed=num if e.shed else 0))

    def _validation(self, e: ev.Validation, fx: Effects) -> None:
        bound = self._bound(e.stream)
        if bound is None:
            return
        binding, run, rank = bound
        if e.seq <= rank.last_durable_seq:
            fx.send(e.stream, Ack(rank.last_durable_seq))
            return
        self._check_seq("validation_record.seq", rank, e.seq)
        if not self._classify("validation_record.timeline", run, e.timeline):
            self._stale(fx, binding, run, rank, "validation_record", e.seq, e.seq, e.timeline, e.details)
            return
        rank.accept_seq(e.seq)
        rank.num_records += 1
        self._progress(fx, run, rank, e.timeline, e.step, e.now)
        src = {"rank": binding.rank, "incarnation_id": binding.incarnation_id, "seq": e.seq}
        if run.meta.world_size == 1:
            group = StepGroup(
                e.timeline, e.step, e.now, e.epoch, e.record_rgl, {binding.rank: e.loss}, {binding.rank: e.seq}
            )
            self._decide(fx, run, group, {**src, "record": e.details}, e.now)
        else:
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
                frozenset(run.policy.finished_ranks),
            )
            kind = EntryKind.REPORT if outcome in (AddOutcome.PENDING, AddOutcome.READY) else EntryKind(str(outcome))
            effects = {"ranks": {str(rank.rank): rank.effect()}, "pending": run.aggregator.to_dict()}
            fx.append(run.run_id, kind, {**src, **e.details, "effects": effects})
            if ready is not None:
                self._decide(fx, run, ready, {}, e.now)
            elif kind is not EntryKind.REPORT:  # never judged: say so, so that no snapshot waits for it
                policy = run.policy
                reason = (
                    f"{kind} report: step {e.step} of timeline {e.timeline} was decided without rank "
                    f"{binding.rank}'s record; no snapshot"
                )
                verdict = policy.last_verdict or Verdict.HEALTHY
                fx.send(e.stream, VerdictOut(e.seq, e.timeline, e.step, verdict, reason, False, policy.state))
        fx.send(e.stream, Ack(e.seq))

    def _decide(self, fx: Effects, run: Run, group: StepGroup, extra: dict[str, Any], now: float) -> None:
        """Judge one complete (or overdue) validation step; verdicts to its ranks, then any command."""
        policy = run.policy
        for missing in group.missing:
            policy.set_stalled(missing, True)
        decision = policy.judge_validation(
            group.timeline,
            group.step,
            group.losses,
            now,
            group.epoch,
            group.record_rgl,
            group.missing,
        )
        fx.append(
            run.run_id,
            EntryKind.DECISION,
            {
                **extra,
                "seqs": {str(r): s for r, s in group.seqs.items()},
                "decision": decision.as_dict(),
                "effects": {
                    "policy": policy.to_dict(),
                    "ranks": {str(r): run.rank(r).effect() for r in group.seqs},
                    "pending": run.aggregator.to_dict(),
                },
            },
            sync=True,  # a verdict never waits for the group-commit window (docs/protocol.md, "Decisions")
        )
        for rank_id, seq in group.seqs.items():
            target = run.rank(rank_id)
            if group.incarnations.get(rank_id, target.incarnation_id) == target.incarnation_id:
                fx.send(target.stream, VerdictOut.of(seq, decision))  # never to a later incarnation
        if decision.command is not None:
            self._issue(fx, run, decision.command, "decision")

    def _issue(self, fx: Effects, run: Run, command: Command, cause: str) -> None:
        """Journal a command (durable before it leaves) and send it to every attached rank."""
        fx.append(run.run_id, EntryKind.COMMAND, {"cause": cause, "command": command.as_dict()}, sync=True)
        for rank in run.ranks.values():
            fx.send(rank.stream, CommandOut(command, rank.generation))

    # ----------------------------------------------------------------- reports

    def _accept_report(
        self, stream: int, field_name: str, seq: int, fx: Effects
    ) -> tuple[Binding, Run, RankState] | None:
        """A single-seq report (snapshot, command result, finish); None when moot or a resent duplicate."""
        bound = self._bound(stream)
        if bound is None:
            return None
        rank = bound[2]
        if seq <= rank.last_durable_seq:
            fx.send(stream, Ack(rank.last_durable_seq))
            return None
        self._check_seq(field_name, rank, seq)
        return bound

    def _snapshot(self, e: ev.SnapshotTaken, fx: Effects) -> None:
        bound = self._accept_report(e.stream, "snapshot_taken.seq", e.seq, fx)
        if bound is None:
            return
        binding, run, rank = bound
        rank.accept_seq(e.seq)
        rank.published(e.timeline, e.step, e.digest)
        pinned = run.policy.pin(binding.rank, e.timeline, e.step)
        effects: dict[str, Any] = {"ranks": {str(rank.rank): rank.effect()}}
        if pinned is not None:
            effects["pins"] = {str(binding.rank): pinned_states_to_json(run.policy.pins[binding.rank])}
        fx.append(
            run.run_id,
            EntryKind.SNAPSHOT,
            {
                "rank": binding.rank,
                "incarnation_id": binding.incarnation_id,
                "seq": e.seq,
                "timeline": e.timeline,
                "step": e.step,
                "snapshot_bytes": e.snapshot_bytes,
                "duration_ms": e.duration_ms,
                "location": e.location,
                "digest": e.digest,
                # The detectors resume from here after a restore to this snapshot (policy/steps.py).
                "detector_state": "pinned" if pinned is not None else "none: a restore to it re-warms the detectors",
                "effects": effects,
            },
        )
        fx.send(e.stream, Ack(e.seq))

    def _adopted(self, e: ev.SnapshotAdopted, fx: Effects) -> None:
        """A restarted trainer adopted the snapshot its Welcome named: the run goes on from it on a new
        timeline (``RunPolicy.on_adopted``). A snapshot that is not the rank's last published one (the run
        was forgotten and created again since that Welcome) is journaled and changes nothing."""
        bound = self._accept_report(e.stream, "snapshot_adopted.seq", e.seq, fx)
        if bound is None:
            return
        binding, run, rank = bound
        policy = run.policy
        if e.timeline > policy.timeline:
            raise InvalidInputError(
                "snapshot_adopted.timeline", f"{e.timeline} is ahead of the run's timeline {policy.timeline}"
            )
        rank.accept_seq(e.seq)
        snapshot_timeline, step, digest = e.snapshot
        payload: dict[str, Any] = {
            "rank": binding.rank,
            "incarnation_id": binding.incarnation_id,
            "seq": e.seq,
            "timeline": e.timeline,
            "new_timeline": e.timeline + 1,
            "snapshot": {"timeline": snapshot_timeline, "step": step, "digest": digest},
            "duration_ms": e.duration_ms,
        }
        effects: dict[str, Any] = {"ranks": {str(rank.rank): rank.effect()}}
        if rank.last_snapshot != e.snapshot:
            reason = (
                f"step {step} of timeline {snapshot_timeline} is not rank {binding.rank}'s last published snapshot "
                f"{list(rank.last_snapshot) if rank.last_snapshot else 'none'}; the adoption changes nothing"
            )
            payload["notices"] = [{"kind": "unknown_snapshot", "reason": reason, "command": None}]
        else:
            moved = policy.on_adopted(binding.rank, e.timeline, step)
            superseded = run.aggregator.discard_before(policy.timeline) if moved else []
            effects["policy"] = policy.to_dict()
            if superseded:
                effects["pending"] = run.aggregator.to_dict()
            payload["run_timeline"] = policy.timeline
            payload["superseded_steps"] = [[g.timeline, g.step] for g in superseded]
        payload["effects"] = effects
        fx.append(run.run_id, EntryKind.SNAPSHOT_ADOPTED, payload)
        fx.send(e.stream, Ack(e.seq))

    def _command_result(self, e: ev.CommandResult, fx: Effects) -> None:
        bound = self._accept_report(e.stream, "command_result.seq", e.seq, fx)
        if bound is None:
            return
        binding, run, rank = bound
        policy = run.policy
        payload: dict[str, Any] = {
            "rank": binding.rank,
            "incarnation_id": binding.incarnation_id,
            "seq": e.seq,
            "command_id": e.command_id,
            "succeeded": e.succeeded,
            "new_timeline": e.new_timeline,
            "restored_step": e.restored_step,
            "duration_ms": e.duration_ms,
            "error": e.error,
            "num_culled_seeds": e.num_culled_seeds,
            **({} if e.lr_after_restore is None else {"lr_after_restore": float_to_json(e.lr_after_restore)}),
        }
        command = policy.command(e.command_id)
        if command is not None:
            payload["command_kind"] = str(command.kind)
        moves = command is not None and command.kind is not CommandKind.HALT
        other = None
        if e.command_id >= policy.next_command_id:  # never issued here: forged, or a result for a run the
            other = f"command {e.command_id} was never issued in run {run.run_id}"  # daemon has forgotten
        elif command is not None and e.succeeded and moves and e.new_timeline != command.timeline + 1:
            # Not this command's result: one of an earlier life of the run (forgotten and created again),
            # executed by a trainer that had not heard yet, whose ids start at 1 again (found by the simulation).
            other = (
                f"{command.kind} {command.command_id} was made on timeline {command.timeline}, so it moves a rank "
                f"to {command.timeline + 1}, not {e.new_timeline}: the result is of another command"
            )
        if other is not None:  # journaled; it changes nothing else
            rank.accept_seq(e.seq)
            unknown = f"{other}; the result changes nothing"
            payload["notices"] = [{"kind": "unknown_command", "reason": unknown, "command": None}]
            payload["effects"] = {"ranks": {str(rank.rank): rank.effect()}}
            fx.append(run.run_id, EntryKind.COMMAND_RESULT, payload)
            fx.send(e.stream, Ack(e.seq))
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
            e.command_id, binding.rank, e.succeeded, e.new_timeline, e.error, e.now, e.restored_step
        )
        effects: dict[str, Any] = {"policy": policy.to_dict(), "ranks": {str(rank.rank): rank.effect()}}
        superseded = run.aggregator.discard_before(policy.timeline) if policy.timeline != timeline_before else []
        if superseded:
            effects["pending"] = run.aggregator.to_dict()
        follow_up = [n.command for n in notices if n.command is not None]
        payload["notices"] = [_notice(n) for n in notices]
        payload["superseded_steps"] = [[g.timeline, g.step] for g in superseded]
        payload["effects"] = effects
        fx.append(run.run_id, EntryKind.COMMAND_RESULT, payload, sync=bool(follow_up))
        for command in follow_up:
            self._issue(fx, run, command, "command_failed")
        fx.send(e.stream, Ack(e.seq))

    def _finish(self, e: ev.Finish, fx: Effects) -> None:
        bound = self._accept_report(e.stream, "finish.seq", e.seq, fx)
        if bound is None:
            return
        binding, run, rank = bound
        rank.accept_seq(e.seq)
        notices = run.policy.finish(binding.rank)
        payload: dict[str, Any] = {
            "rank": binding.rank,
            "incarnation_id": binding.incarnation_id,
            "seq": e.seq,
            "status": e.status,
            "epochs_completed": e.epochs_completed,
            "num_rollbacks": e.num_rollbacks,
            "message": e.message,
            "duration_s": e.duration_s,
            "notices": [_notice(n) for n in notices],
        }
        if e.final_validation_loss is not None:
            payload["final_validation_loss"] = float_to_json(e.final_validation_loss)
        if e.final_validation_accuracy is not None:
            payload["final_validation_accuracy"] = e.final_validation_accuracy
        payload["effects"] = {"policy": run.policy.to_dict(), "ranks": {str(rank.rank): rank.effect()}}
        fx.append(run.run_id, EntryKind.FINISH, payload)
        fx.send(e.stream, Ack(e.seq))
        self._evict_finished(fx)

    def _evict_finished(self, fx: Effects) -> None:
        finished = [r for r in self.registry.runs.values() if r.policy.state is RunState.FINISHED]
        excess = len(finished) - self.options.limits.retain_finished_runs
        for run in finished[: max(0, excess)]:  # a stream still open on it is moot from now on
            del self.registry.runs[run.run_id]
            fx.append(run.run_id, EntryKind.RUN_EVICTED, {"effects": {"forget": True}})

    # ----------------------------------------------------------------- controllers

    def _controller_command(self, e: ev.RequestRollback | ev.Halt | ev.Resume, fx: Effects) -> None:
        run = self.run(e.run_id)
        policy = run.policy
        if isinstance(e, ev.RequestRollback):
            action, command = "rollback", policy.request_rollback(e.reason, e.now)
        elif isinstance(e, ev.Halt):
            action, command = "halt", policy.halt(e.reason, e.now)
        else:
            action, command = "resume", policy.resume(e.reason, e.now)
        fx.append(
            run.run_id,
            EntryKind.CONTROLLER_REQUEST,
            {
                "action": action,
                "reason": e.reason,
                "caller": e.caller,
                "command": command.as_dict(),
                "effects": {"policy": policy.to_dict()},
            },
        )
        self._issue(fx, run, command, "controller")
        fx.reply = CommandReply(command, policy.state)

    def _update_policy(self, e: ev.UpdatePolicy, fx: Effects) -> None:
        run = self.run(e.run_id)
        if not e.changes:
            raise InvalidInputError("changes", "no policy field is set")
        try:
            config, _ = run.policy.config.merged(e.changes)
        except PolicyConfigError as exc:
            raise InvalidInputError("changes", str(exc)) from None
        before = run.policy.config.as_dict()
        run.policy.update_policy(config)
        fx.append(
            run.run_id,
            EntryKind.POLICY_CHANGE,
            {
                "caller": e.caller,
                "changes": e.changes,
                "before": {k: before[k] for k in e.changes},
                "effective_policy": config.as_dict(),
                "effects": {"policy": run.policy.to_dict()},
            },
        )
        fx.reply = config

    def _forget(self, e: ev.ForgetRun, fx: Effects) -> None:
        run = self.run(e.run_id)
        attached = sorted(r.rank for r in run.ranks.values() if r.stream is not None)
        if attached:
            raise PolicyStateError(f"run {e.run_id} has trainers attached (ranks {attached}); stop them first")
        open_cmd = run.policy.open
        if open_cmd is not None and open_cmd.command.kind is not CommandKind.HALT:
            # A trainer that received it may execute it while disconnected and come back on a timeline a
            # run created anew never reached (found by the simulation): let it finish or time out first.
            raise PolicyStateError(
                f"run {e.run_id} has {open_cmd.command.kind} {open_cmd.command.command_id} open; wait for its "
                "result or its timeout (the run is then HALTED), then forget it"
            )
        del self.registry.runs[run.run_id]
        entry = {"reason": e.reason, "caller": e.caller, "state": str(run.policy.state), "effects": {"forget": True}}
        fx.append(run.run_id, EntryKind.RUN_FORGOTTEN, entry)

    # ----------------------------------------------------------------- time

    def _tick(self, now: float, fx: Effects) -> None:
        """Rank deadlines, stalls and command timeouts, on the monotonic clock: of the runs ``tick_due`` names
        (most ticks touch no run, and the undo point of a tick covers only these)."""
        expiry = self.options.limits.idle_run_expiry_s
        for run in self.tick_due(now):
            policy = run.policy
            idle = all(r.stream is None for r in run.ranks.values())
            if expiry > 0 and idle and now - run.idle_since >= expiry:
                del self.registry.runs[run.run_id]
                fx.append(
                    run.run_id,
                    EntryKind.RUN_EXPIRED,
                    {"idle_s": round(now - run.idle_since, 3), "state": str(policy.state), "effects": {"forget": True}},
                )
                continue
            if policy.state is RunState.FINISHED:
                continue
            for group in run.aggregator.due(now, policy.config.rank_deadline_s, frozenset(policy.finished_ranks)):
                if policy.is_stale(group.timeline):
                    fx.append(
                        run.run_id,
                        EntryKind.SUPERSEDED,
                        {
                            "timeline": group.timeline,
                            "step": group.step,
                            "current_timeline": policy.timeline,
                            "effects": {"pending": run.aggregator.to_dict()},
                        },
                    )
                    continue
                fx.append(
                    run.run_id,
                    EntryKind.RANK_DEADLINE,
                    {
                        "step": group.step,
                        "timeline": group.timeline,
                        "missing_ranks": list(group.missing),
                        "rank_deadline_s": policy.config.rank_deadline_s,
                    },
                )
                self._decide(fx, run, group, {"after_deadline": True}, now)
            for rank in run.ranks.values():
                if rank.rank in policy.finished_ranks or rank.tracker is None:
                    continue
                if rank.tracker.check(now, policy.config.stall_timeout_s):
                    self._stalled(fx, run, rank, now)
            for notice in policy.check_timeouts(now):
                fx.append(
                    run.run_id,
                    EntryKind.COMMAND_TIMEOUT,
                    {**_notice(notice), "effects": {"policy": policy.to_dict()}},
                    sync=notice.command is not None,
                )
                if notice.command is not None:
                    self._issue(fx, run, notice.command, "command_timeout")

    def _stalled(self, fx: Effects, run: Run, rank: RankState, now: float) -> None:
        """The rank's attachment went past its stall threshold: the rank is STALLED (journaled), and with the
        watchdog (``end_stalled_ranks``) its trainer is told to end its process, for its launcher to restart
        it; never in a HALTED run, whose trainers wait at an agreement point for a Resume on purpose. A rank
        STALLED already (before its stream reconnected, or before a daemon restart) is journaled again only
        for the watchdog: a hung trainer whose connection thread reconnected is still hung."""
        policy = run.policy
        stream = rank.stream
        end_process = policy.config.end_stalled_ranks and stream is not None and policy.state is not RunState.HALTED
        if rank.rank in policy.stalled_ranks and not end_process:
            return
        policy.set_stalled(rank.rank, True)
        assert rank.tracker is not None
        waited = round(rank.tracker.seconds_since_progress(now), 3)
        fx.append(
            run.run_id,
            EntryKind.STALL,
            {
                "rank": rank.rank,
                "latest_step": rank.latest_step,
                "latest_timeline": rank.latest_timeline,
                "seconds_without_progress": waited,
                "threshold_s": rank.tracker.threshold_s(policy.config.stall_timeout_s),
                "end_process": end_process,
                "effects": {"policy": policy.to_dict()},
            },
        )
        if end_process and stream is not None:
            reason = f"rank {rank.rank} made no progress for {waited:.1f} s past step {rank.latest_step}"
            fx.send(stream, EndStream(f"stall watchdog (end_stalled_ranks): {reason}", True))
            self._unbind(stream, now, fx)  # the runtime drops a stream it sent EndStream on

    def tick_due(self, now: float) -> list[Run]:
        """The runs a tick at ``now`` changes: an idle run past its expiry, a step group past its rank
        deadline, a rank newly past its stall threshold, an open command past its timeout. It changes nothing;
        each clause is the predicate the tick's own call uses (``any_due``, ``due``, ``timeout_due``)."""
        expiry = self.options.limits.idle_run_expiry_s
        due = []
        for run in self.registry.runs.values():
            policy = run.policy
            if expiry > 0 and now - run.idle_since >= expiry and all(r.stream is None for r in run.ranks.values()):
                due.append(run)
            elif policy.state is RunState.FINISHED:
                continue
            elif (
                run.aggregator.any_due(now, policy.config.rank_deadline_s, frozenset(policy.finished_ranks))
                or policy.timeout_due(now)
                or any(
                    r.tracker is not None
                    and r.rank not in policy.finished_ranks
                    and r.tracker.due(now, policy.config.stall_timeout_s)
                    for r in run.ranks.values()
                )
            ):
                due.append(run)
        return due

    def _start(self, e: ev.Start, fx: Effects) -> None:
        """Timers restart: a deadline never spans two processes' monotonic clocks."""
        for run in self.registry.runs.values():
            run.policy.rearm(e.now)
            run.aggregator.rearm(e.now)
            run.idle_since = e.now
            for rank in run.ranks.values():
                rank.stream = None
                rank.tracker = StallTracker(e.now) if rank.incarnation_id else None  # never-attached: no clock
        fx.append(
            "",
            EntryKind.DAEMON_START,
            {
                "runs_restored": e.runs_restored,
                "entries_applied": e.entries_applied,
                "moved_aside": list(e.moved_aside),
            },
            sync=True,
        )

    def _stop(self, e: ev.Stop, fx: Effects) -> None:
        for stream in list(self.streams):
            fx.send(stream, EndStream(e.reason))
        fx.append("", EntryKind.DAEMON_STOP, {"reason": e.reason})


def _check_rejoin(run: Run, e: ev.Attach) -> None:
    if e.world_size != run.meta.world_size:
        raise ConflictError(
            f"run {run.run_id} has world_size {run.meta.world_size}, Hello says {e.world_size}; "
            "use a new run id for a different job"
        )
    if e.overrides != run.meta.overrides:
        raise ConflictError(
            f"run {run.run_id} was created with policy overrides {run.meta.overrides}, this Hello asks "
            f"for {e.overrides}; a later Hello must match (controllers change policy with UpdatePolicy)"
        )
    if run.policy.state is RunState.FINISHED:
        raise ConflictError(f"run {run.run_id} has finished; start a new run id")


def train_summary(
    steps: Sequence[int] | npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
) -> dict[str, Any]:
    """What a VITALS entry keeps of its batch's records for people (the audit plot): the step range, the
    mean and largest loss and the largest grad norm of the finite records ("nan" if none is finite)."""
    finite = losses[np.isfinite(losses)]
    finite_grads = grads[np.isfinite(grads)] if grads is not None else np.empty(0)
    return {
        "first_step": int(steps[0]),
        "last_step": int(steps[-1]),
        "loss_mean": float_to_json(float(finite.mean())) if len(finite) else "nan",
        "loss_max": float_to_json(float(finite.max())) if len(finite) else "nan",
        "grad_norm_max": float(finite_grads.max()) if len(finite_grads) else None,
        "num_non_finite": int(len(losses) - len(finite)),
    }


def _notice(notice: Notice) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": notice.kind,
        "reason": notice.reason,
        "command": notice.command.as_dict() if notice.command else None,
    }
    if notice.charged is not None:
        out["charged"] = notice.charged
    return out


__all__ = ["MAX_SEQ_JUMP", "Binding", "CommandReply", "CoreOptions", "GovernorCore", "Limits"]
