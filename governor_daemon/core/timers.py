"""Time, on the monotonic clock: idle runs expiring, rank deadlines of validation steps, stalled ranks (and
the stall watchdog), command timeouts; and the daemon's start and stop, which rearm and end them.

``tick_due`` names the runs a tick changes, with the same predicates the tick's own checks use, so a tick
touches (and its undo point copies) only those.
"""

from __future__ import annotations

from governor_daemon.core import events as ev
from governor_daemon.core.attach import unbind
from governor_daemon.core.effects import Effects, EndStream
from governor_daemon.core.records import decide, issue, journal_notice
from governor_daemon.core.registry import RankState, Run
from governor_daemon.core.state import CoreState
from governor_daemon.policy import RunState, StallTracker
from tolaria.journal import (
    CommandTimeout,
    DaemonStart,
    DaemonStop,
    RankDeadline,
    RunExpired,
    Stall,
    Superseded,
)


def tick(state: CoreState, now: float, fx: Effects) -> None:
    """Rank deadlines, stalls and command timeouts, on the monotonic clock: of the runs ``tick_due`` names
    (most ticks touch no run, and the undo point of a tick covers only these)."""
    for run in tick_due(state, now):
        if _expire(state, run, now, fx) or run.policy.state is RunState.FINISHED:
            continue
        _deadlines(fx, run, now)
        for rank in run.ranks.values():
            if rank.rank in run.policy.roster.finished or rank.tracker is None:
                continue
            if rank.tracker.check(now, run.policy.config.stall_timeout_s):
                _stalled(state, fx, run, rank, now)
        _timeouts(fx, run, now)


def _expire(state: CoreState, run: Run, now: float, fx: Effects) -> bool:
    """True if the run, with no trainer attached for ``idle_run_expiry_s``, left memory now (journaled)."""
    expiry = state.options.limits.idle_run_expiry_s
    idle = all(r.stream is None for r in run.ranks.values())
    if not (expiry > 0 and idle and now - run.idle_since >= expiry):
        return False
    del state.registry.runs[run.run_id]
    fx.append_record(run.run_id, RunExpired(idle_s=round(now - run.idle_since, 3), state=str(run.policy.state)))
    return True


def _deadlines(fx: Effects, run: Run, now: float) -> None:
    """Validation steps past their rank deadline: decided without the missing ranks, or superseded when the
    run has left their timeline."""
    policy = run.policy
    for group in run.aggregator.due(now, policy.config.rank_deadline_s, frozenset(policy.roster.finished)):
        if policy.is_stale(group.timeline):
            superseded = Superseded(
                timeline=group.timeline,
                step=group.step,
                current_timeline=policy.timeline,
                effects={"pending": run.aggregator.to_dict()},
            )
            fx.append_record(run.run_id, superseded)
            continue
        deadline = RankDeadline(
            step=group.step,
            timeline=group.timeline,
            missing_ranks=list(group.missing),
            rank_deadline_s=policy.config.rank_deadline_s,
        )
        fx.append_record(run.run_id, deadline)
        decide(fx, run, group, {"after_deadline": True}, now)


def _timeouts(fx: Effects, run: Run, now: float) -> None:
    """Open commands past their timeout; a timeout's follow-up command is journaled durably and issued."""
    policy = run.policy
    for notice in policy.check_timeouts(now):
        timeout = CommandTimeout(notice=journal_notice(notice), effects={"policy": policy.to_dict()})
        fx.append_record(run.run_id, timeout, sync=notice.command is not None)
        if notice.command is not None:
            issue(fx, run, notice.command, "command_timeout")


def _stalled(state: CoreState, fx: Effects, run: Run, rank: RankState, now: float) -> None:
    """The rank's attachment went past its stall threshold: the rank is STALLED (journaled), and with the
    watchdog (``end_stalled_ranks``) its trainer is told to end its process, for its launcher to restart
    it; never in a HALTED run, whose trainers wait at an agreement point for a Resume on purpose. A rank
    STALLED already (before its stream reconnected, or before a daemon restart) is journaled again only
    for the watchdog: a hung trainer whose connection thread reconnected is still hung."""
    policy = run.policy
    stream = rank.stream
    end_process = policy.config.end_stalled_ranks and stream is not None and policy.state is not RunState.HALTED
    if rank.rank in policy.roster.stalled and not end_process:
        return
    policy.roster.set_stalled(rank.rank, True)
    assert rank.tracker is not None
    waited = round(rank.tracker.seconds_since_progress(now), 3)
    stall = Stall(
        rank=rank.rank,
        latest_step=rank.latest_step,
        latest_timeline=rank.latest_timeline,
        seconds_without_progress=waited,
        threshold_s=rank.tracker.threshold_s(policy.config.stall_timeout_s),
        end_process=end_process,
        effects={"policy": policy.to_dict()},
    )
    fx.append_record(run.run_id, stall)
    if end_process and stream is not None:
        reason = f"rank {rank.rank} made no progress for {waited:.1f} s past step {rank.latest_step}"
        fx.send(stream, EndStream(f"stall watchdog (end_stalled_ranks): {reason}", True))
        unbind(state, stream, now, fx)  # the runtime drops a stream it sent EndStream on


def tick_due(state: CoreState, now: float) -> list[Run]:
    """The runs a tick at ``now`` changes: an idle run past its expiry, a step group past its rank
    deadline, a rank newly past its stall threshold, an open command past its timeout. It changes nothing;
    each clause is the predicate the tick's own call uses (``any_due``, ``due``, ``timeout_due``)."""
    expiry = state.options.limits.idle_run_expiry_s
    due = []
    for run in state.registry.runs.values():
        policy = run.policy
        if expiry > 0 and now - run.idle_since >= expiry and all(r.stream is None for r in run.ranks.values()):
            due.append(run)
        elif policy.state is RunState.FINISHED:
            continue
        elif (
            run.aggregator.any_due(now, policy.config.rank_deadline_s, frozenset(policy.roster.finished))
            or policy.timeout_due(now)
            or any(
                r.tracker is not None
                and r.rank not in policy.roster.finished
                and r.tracker.due(now, policy.config.stall_timeout_s)
                for r in run.ranks.values()
            )
        ):
            due.append(run)
    return due


def start(state: CoreState, e: ev.Start, fx: Effects) -> None:
    """Timers restart: a deadline never spans two processes' monotonic clocks."""
    for run in state.registry.runs.values():
        run.policy.ledger.rearm(e.now)
        run.aggregator.rearm(e.now)
        run.idle_since = e.now
        for rank in run.ranks.values():
            rank.stream = None
            rank.tracker = StallTracker(e.now) if rank.incarnation_id else None  # never-attached: no clock
    started = DaemonStart(
        runs_restored=e.runs_restored, entries_applied=e.entries_applied, moved_aside=list(e.moved_aside)
    )
    fx.append_record("", started, sync=True)


def stop(state: CoreState, e: ev.Stop, fx: Effects) -> None:
    """Every attachment ends (its detach journaled, as for any EndStream the core sends itself: the runtime does
    not report that stream's end) and its stream is asked to end; trainers reconnect to the next daemon."""
    for stream in list(state.streams):
        unbind(state, stream, e.now, fx)
        fx.send(stream, EndStream(e.reason))
    fx.append_record("", DaemonStop(reason=e.reason))
