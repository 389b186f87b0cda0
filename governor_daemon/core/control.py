"""What controllers ask of a run: a ROLLBACK, HALT or Resume, a policy change, forgetting the run.

Each names its run (NotFoundError if the daemon holds none), is journaled with its caller, and leaves its
answer in ``Effects.reply`` for the controller once the entries are durable.
"""

from __future__ import annotations

from dataclasses import dataclass

from governor_daemon.core import events as ev
from governor_daemon.core.effects import Effects
from governor_daemon.core.records import issue
from governor_daemon.core.state import CoreState
from governor_daemon.errors import InvalidInputError, PolicyConfigError, PolicyStateError
from governor_daemon.policy import Command, CommandKind, RunState
from tolaria.journal import ControllerRequest, PolicyChange, RunForgotten


@dataclass(frozen=True)
class CommandReply:
    """What a controller's ROLLBACK, HALT or Resume answers."""

    command: Command
    run_state: RunState


def controller_command(state: CoreState, e: ev.RequestRollback | ev.Halt | ev.Resume, fx: Effects) -> None:
    """The policy makes the command (or refuses it); journaled as the controller's request, then issued."""
    run = state.run(e.run_id)
    policy = run.policy
    if isinstance(e, ev.RequestRollback):
        action, command = "rollback", policy.request_rollback(e.reason, e.now)
    elif isinstance(e, ev.Halt):
        action, command = "halt", policy.halt(e.reason, e.now)
    else:
        action, command = "resume", policy.resume(e.reason, e.now)
    request = ControllerRequest(
        action=action, reason=e.reason, caller=e.caller, command=command.as_dict(), effects={"policy": policy.to_dict()}
    )
    fx.append_record(run.run_id, request)
    issue(fx, run, command, "controller")
    fx.reply = CommandReply(command, policy.state)


def update_policy(state: CoreState, e: ev.UpdatePolicy, fx: Effects) -> None:
    """The run's policy with ``e.changes`` merged in (the reply: the effective policy)."""
    run = state.run(e.run_id)
    if not e.changes:
        raise InvalidInputError("changes", "no policy field is set")
    try:
        config, _ = run.policy.config.merged(e.changes)
    except PolicyConfigError as exc:
        raise InvalidInputError("changes", str(exc)) from None
    before = run.policy.config.as_dict()
    run.policy.update_policy(config)
    change = PolicyChange(
        caller=e.caller,
        changes=e.changes,
        before={k: before[k] for k in e.changes},
        effective_policy=config.as_dict(),
        effects={"policy": run.policy.to_dict()},
    )
    fx.append_record(run.run_id, change)
    fx.reply = config


def forget(state: CoreState, e: ev.ForgetRun, fx: Effects) -> None:
    """The run leaves memory (it stays in the journal): only with no trainer attached and no command open but
    a HALT."""
    run = state.run(e.run_id)
    attached = sorted(r.rank for r in run.ranks.values() if r.stream is not None)
    if attached:
        raise PolicyStateError(f"run {e.run_id} has trainers attached (ranks {attached}); stop them first")
    open_cmd = run.policy.ledger.open
    if open_cmd is not None and open_cmd.command.kind is not CommandKind.HALT:
        # A trainer that received it may execute it while disconnected and come back on a timeline a
        # run created anew never reached (found by the simulation): let it finish or time out first.
        raise PolicyStateError(
            f"run {e.run_id} has {open_cmd.command.kind} {open_cmd.command.command_id} open; wait for its "
            "result or its timeout (the run is then HALTED), then forget it"
        )
    del state.registry.runs[run.run_id]
    fx.append_record(run.run_id, RunForgotten(reason=e.reason, caller=e.caller, state=str(run.policy.state)))
