"""An RL-style controller on ``tolaria.controller``: follow a governor's journal, keep each run's punishment ledger,
and optionally HALT a run that keeps rolling back.

    python examples/rl_controller.py --address 127.0.0.1:50051 [--run RUN] [--halt-after N]
        [--until-finished] [--max-events N] [--from CURSOR]

Every command the governor issues carries the punishment reward an RL agent learns from: -death_penalty for a
ROLLBACK or HALT (after a NaN, a divergence, the loop breaker, a controller), 0 for a RESUME, charged when a
trainer executes it (a command no trainer ran costs nothing). The controller sums the charges per run from the
``command_result`` events, prints each command with the decision that caused it and the trainer's result, and,
when a run finishes, checks its sum against the daemon's own ledger (``panic_state``'s total). It follows
the journal across daemon restarts without losing or repeating an event (``events`` resumes from its cursor).

It imports nothing but ``tolaria.controller``: no torch, none of the daemon's code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence

from tolaria.controller import (
    CommandIssued,
    CommandResult,
    CommandType,
    ControllerClient,
    ControllerError,
    Decision,
    RunFinished,
    RunState,
    VerdictKind,
)

# What the controller reads: validation decisions (why), commands (a non-finite train step's has cause
# "train_step"), results (what the trainer did, and the reward it charged), finishes (the end of a run), and
# run_created (a run id can be created again after it was forgotten: a fresh ledger). The daemon filters by
# kind, so vitals never travel.
KINDS = ("run_created", "decision", "command", "command_result", "finish")


class Ledger:
    """Per-run punishment rewards and rollback counts, from the events."""

    def __init__(self) -> None:
        self.reward: defaultdict[str, float] = defaultdict(float)
        self.rollbacks: Counter[str] = Counter()
        self.finished: set[str] = set()

    def restart(self, run_id: str) -> None:
        """A run (re)created: its ledger starts at zero."""
        self.reward[run_id] = 0.0
        self.rollbacks[run_id] = 0
        self.finished.discard(run_id)


def halt_if_looping(client: ControllerClient, ledger: Ledger, run_id: str, halt_after: int) -> None:
    """HALT a run once it has rolled back ``halt_after`` times (unless it is already halted or finished)."""
    if not halt_after or ledger.rollbacks[run_id] != halt_after:
        return
    try:
        if client.panic_state(run_id).state in (RunState.HALTED, RunState.FINISHED):
            return
        receipt = client.halt(run_id, f"rl_controller: {halt_after} rollbacks")
    except ControllerError as exc:
        print(f"  could not halt {run_id}: {exc}", flush=True)
        return
    print(f"  >> halted {run_id} after {halt_after} rollbacks: command {receipt.command_id}", flush=True)


def on_finished(client: ControllerClient, ledger: Ledger, event: RunFinished) -> None:
    """A rank finished: once the run is FINISHED, compare the ledger with the daemon's."""
    try:
        status = client.panic_state(event.run_id)
    except ControllerError as exc:  # forgotten or evicted since: the journal's sum is all there is
        print(f"{event.run_id}: finished; total reward {ledger.reward[event.run_id]:g} ({exc})", flush=True)
        ledger.finished.add(event.run_id)
        return
    if status.state is not RunState.FINISHED:
        return
    ledger.finished.add(event.run_id)
    mine = ledger.reward[event.run_id]
    agree = "matches" if mine == status.total_punishment_reward else "DIFFERS FROM"
    print(
        f"{event.run_id}: finished ({event.status}) after {status.num_rollbacks} rollback(s), "
        f"{status.num_halts} halt(s); total reward {mine:g} {agree} the daemon's {status.total_punishment_reward:g}",
        flush=True,
    )


def follow(client: ControllerClient, args: argparse.Namespace) -> Ledger:
    """Read events until --max-events, --until-finished or the end of the stream; returns the ledger."""
    ledger = Ledger()
    with client.events(args.cursor, args.run, KINDS, reconnect_for_s=args.reconnect_for_s) as stream:
        for count, event in enumerate(stream, start=1):
            if event.kind == "run_created":
                ledger.restart(event.run_id)
            elif isinstance(event, Decision) and event.verdict is not VerdictKind.HEALTHY:
                print(
                    f"[{event.cursor}] {event.run_id}: {event.verdict} at step {event.step} ({event.rule}, "
                    f"{event.source}): {event.reason}",
                    flush=True,
                )
            elif isinstance(event, CommandIssued):
                command = event.command
                print(
                    f"[{event.cursor}] {event.run_id}: {command.type} command {command.command_id} ({event.cause}), "
                    f"punishment reward {command.punishment_reward:g} once executed",
                    flush=True,
                )
                if command.type is CommandType.ROLLBACK:
                    ledger.rollbacks[event.run_id] += 1
                    halt_if_looping(client, ledger, event.run_id, args.halt_after)
            elif isinstance(event, CommandResult):
                outcome = "succeeded" if event.succeeded else f"FAILED: {event.error}"
                if event.charged is not None:  # the command's first result: a trainer executed it
                    ledger.reward[event.run_id] += event.charged
                did = "halted" if event.command_kind == "halt" else f"restored step {event.restored_step}"
                print(
                    f"[{event.cursor}] {event.run_id}: command {event.command_id} {outcome} on rank {event.rank}; "
                    f"{did}, timeline {event.new_timeline}, run total {ledger.reward[event.run_id]:g}",
                    flush=True,
                )
            elif isinstance(event, RunFinished):
                on_finished(client, ledger, event)
                if args.until_finished and args.run and ledger.finished >= set(args.run):
                    break
            if args.max_events and count >= args.max_events:
                break
        print(f"(resume with --from {stream.cursor})", flush=True)
    return ledger


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("GOVERNOR_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("GOVERNOR_TOKEN", ""), help="a controller's token")
    parser.add_argument("--run", action="append", default=[], help="only this run (repeatable)")
    parser.add_argument("--from", dest="cursor", type=int, default=0, help="journal cursor to start after")
    parser.add_argument("--halt-after", type=int, default=0, help="HALT a run after this many rollbacks (0: never)")
    parser.add_argument("--until-finished", action="store_true", help="stop once every --run has finished")
    parser.add_argument("--max-events", type=int, default=0, help="stop after this many events (0: follow)")
    parser.add_argument("--reconnect-for-s", type=float, default=60.0, help="give up after this long without a daemon")
    args = parser.parse_args(argv)
    if args.until_finished and not args.run:
        parser.error("--until-finished needs --run")
    try:
        with ControllerClient(args.address, token=args.token or None) as client:
            ledger = follow(client, args)
    except ControllerError as exc:
        print(f"rl_controller: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    for run_id, reward in sorted(ledger.reward.items()):
        print(f"ledger {run_id}: {ledger.rollbacks[run_id]} rollback(s), total reward {reward:g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
