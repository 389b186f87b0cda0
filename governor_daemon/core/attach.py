"""Attach and detach: a trainer's Hello binds its stream to a rank (creating the run on first sight), and the
stream's end unbinds it.

Every refusal (a bad policy override, a limit, another principal's run, a rejoin that does not match, a rank
held by another live process) is raised before anything changes.
"""

from __future__ import annotations

from typing import Any

from governor_daemon.core import events as ev
from governor_daemon.core.effects import CommandOut, Effects, EndStream, Welcome
from governor_daemon.core.registry import RankState, Run, RunMeta
from governor_daemon.core.state import Binding, CoreState
from governor_daemon.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    LimitExceededError,
    PermissionDeniedError,
    PolicyConfigError,
)
from governor_daemon.policy import PolicyConfig, RunState, StallTracker
from governor_daemon.policy.steps import verification_steps
from tolaria.journal import Attach, Detach, RunCreated, RunEvicted


def attach(state: CoreState, e: ev.Attach, fx: Effects) -> None:
    """Bind ``e.stream`` to the rank (a new run if the id is unknown): the Welcome, then any open command."""
    options = state.options
    try:
        config, ignored = options.defaults.merged(e.overrides, options.locked_fields)
    except PolicyConfigError as exc:
        raise InvalidInputError("hello.policy_overrides", str(exc)) from None
    run = state.registry.runs.get(e.run_id)
    replaced: int | None = None
    caught_up: dict[str, Any] = {}
    if run is None:
        _check_limits(state, e)
        run = _create(state, e, config, ignored, fx)
    else:
        replaced = _check_rejoin(run, e)
        caught_up = _catch_up(run, e)
    if replaced is not None:
        fx.send(replaced, EndStream("replaced by a newer attachment of the same incarnation"))
        state.streams.pop(replaced, None)
    rank = _bind(state, run, e, fx, caught_up)
    _welcome(run, rank, e.stream, fx)


def _check_limits(state: CoreState, e: ev.Attach) -> None:
    """A new run must fit under the active-run limits (all callers', and this principal's)."""
    limits = state.options.limits
    active = [r for r in state.registry.runs.values() if r.policy.state is not RunState.FINISHED]
    if len(active) >= limits.max_active_runs:
        raise LimitExceededError(f"{len(active)} active runs: the limit --max-active-runs is reached")
    own = sum(1 for r in active if r.meta.owner == e.principal)
    if own >= limits.max_active_runs_per_principal:
        raise LimitExceededError(
            f"{e.principal or 'this caller'} has {own} active runs: the limit "
            "--max-active-runs-per-principal is reached (finish or forget one)"
        )


def _check_rejoin(run: Run, e: ev.Attach) -> int | None:
    """A Hello for a known run must be its owner's and match how the run was created; returns the stream of an
    earlier attachment of the same incarnation, which this one replaces."""
    if run.meta.owner != e.principal:
        raise PermissionDeniedError(
            f"run {e.run_id} belongs to another principal; {e.principal or 'an anonymous caller'} "
            "may not attach to it (use a run id of your own)"
        )
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
    current = run.ranks.get(e.rank)
    if current is None or current.stream is None:
        return None
    if current.incarnation_id != e.incarnation_id:
        raise AlreadyExistsError(
            f"run {e.run_id} rank {e.rank} is attached by another live trainer process; "
            "a second trainer cannot take it over"
        )
    return current.stream


def _catch_up(run: Run, e: ev.Attach) -> dict[str, Any]:
    """A Hello ahead of the run's timeline, in a run that has issued no command in this life: the run was created
    again (forgotten, expired, its journal lost) by a peer's Hello from behind, so nothing in it depends on its
    timeline yet. It moves to the Hello's timeline, as if this Hello had created it (a trainer whose run the daemon
    no longer holds is not "ahead"); the peer's records of the old timeline go stale and a Resync brings it
    along. Returns what the attach entry adds (nothing when the run does not move)."""
    policy = run.policy
    if e.timeline <= policy.timeline or policy.ledger.next_command_id != 1:
        return {}
    before = policy.timeline
    policy.ledger.start_on(e.timeline)
    superseded = run.aggregator.discard_before(policy.timeline)
    effects: dict[str, Any] = {"policy": policy.to_dict()}
    if superseded:
        effects["pending"] = run.aggregator.to_dict()
    return {
        "run_timeline": [before, e.timeline],
        "superseded_steps": [[g.timeline, g.step] for g in superseded],
        "effects": effects,
    }


def _create(state: CoreState, e: ev.Attach, config: PolicyConfig, ignored: list[str], fx: Effects) -> Run:
    """A new run, the next life of its id (journaled with its effective policy), then any eviction it causes."""
    life = state.registry.lives + 1
    meta = RunMeta(e.task, e.world_size, e.overrides, e.random_guess_loss, e.num_classes, ignored, e.principal, life)
    run = Run.create(e.run_id, meta, config)
    state.registry.lives = life
    run.policy.ledger.start_on(e.timeline)  # a trainer whose run the daemon no longer holds is not "ahead"
    state.registry.runs[run.run_id] = run
    created = RunCreated(
        task=e.task,
        world_size=e.world_size,
        timeline=e.timeline,
        overrides=e.overrides,
        ignored_policy_fields=ignored,
        effective_policy=config.as_dict(),
        trainer_version=e.trainer_version,
        effects={
            "meta": meta.as_dict(),
            "policy": run.policy.to_dict(),
            "ranks": {str(r): rank.effect() for r, rank in run.ranks.items()},
        },
    )
    fx.append_record(run.run_id, created)
    evict_finished(state, fx)
    return run


def _bind(state: CoreState, run: Run, e: ev.Attach, fx: Effects, caught_up: dict[str, Any]) -> RankState:
    """The rank's next generation, attached by ``e.stream`` with a fresh stall clock (journaled, with the run's
    move to the Hello's timeline, if it made one: ``_catch_up``)."""
    rank = run.rank(e.rank)
    new_incarnation = rank.incarnation_id != e.incarnation_id
    rank.incarnation_id = e.incarnation_id
    rank.generation += 1
    rank.stream = e.stream
    rank.tracker = StallTracker(e.now)
    state.streams[e.stream] = Binding(run.run_id, e.rank, e.incarnation_id, rank.generation)
    attached = Attach(
        rank=e.rank,
        incarnation_id=e.incarnation_id,
        new_incarnation=new_incarnation,
        generation=rank.generation,
        last_durable_seq=rank.last_durable_seq,
        peer=e.peer,
        caller=e.caller,
        run_timeline=caught_up.get("run_timeline"),
        superseded_steps=caught_up.get("superseded_steps"),
        effects={"ranks": {str(e.rank): rank.effect()}, **caught_up.get("effects", {})},
    )
    fx.append_record(run.run_id, attached)
    return rank


def _welcome(run: Run, rank: RankState, stream: int, fx: Effects) -> None:
    """The Welcome, then the open command, or the HALT a halted run's new trainer must obey."""
    policy = run.policy
    fx.send(
        stream,
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
    resend = policy.ledger.open.command if policy.ledger.open is not None else policy.ledger.halting_command()
    if resend is not None:
        fx.send(stream, CommandOut(resend, rank.generation))


def detach(state: CoreState, e: ev.Detach, fx: Effects) -> None:
    """The stream ended."""
    unbind(state, e.stream, e.now, fx)


def unbind(state: CoreState, stream: int, now: float, fx: Effects) -> None:
    """The stream's attachment ends: a Detach, or an EndStream the core sends itself (the stall watchdog),
    after which the runtime no longer reports the stream's end."""
    binding = state.streams.pop(stream, None)
    if binding is None:
        return
    run = state.registry.runs.get(binding.run_id)
    rank = run.ranks.get(binding.rank) if run is not None else None
    if run is not None and rank is not None and rank.stream == stream:
        rank.stream = None
        if all(r.stream is None for r in run.ranks.values()):
            run.idle_since = now
        fx.append_record(run.run_id, Detach(rank=binding.rank, generation=binding.generation))


def evict_finished(state: CoreState, fx: Effects) -> None:
    """Finished runs beyond ``retain_finished_runs`` leave memory, oldest first (journaled)."""
    finished = [r for r in state.registry.runs.values() if r.policy.state is RunState.FINISHED]
    excess = len(finished) - state.options.limits.retain_finished_runs
    for run in finished[: max(0, excess)]:  # a stream still open on it is moot from now on
        del state.registry.runs[run.run_id]
        fx.append_record(run.run_id, RunEvicted())
