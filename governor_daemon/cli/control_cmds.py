"""Client commands for people and controllers: status, runs, watch, rollback, halt, resume, policy.

Each takes the connection flags `tolaria-train` takes too (``tolaria.client_options``: --address, --token,
--token-file, --tls-ca, --tls-cert, --tls-key and their GOVERNOR_* variables) and --json, and goes through
``tolaria.controller.ControllerClient``, the typed client controllers use. Its errors become one-line messages
and exit codes: unreachable 4 (naming the address and what to check), refused input or state 2, anything
else 1. Enums print as lowercase names (``name``), in tables and in --json alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc

from governor_daemon.cli.entries import EntryPrinter, result_text
from governor_daemon.cli.options import add_kind_argument
from governor_daemon.cli.output import error, unreachable_text, validation_summary
from governor_daemon.errors import PolicyConfigError
from governor_daemon.policy import parse_assignments
from governor_daemon.text import show
from tolaria import client_options
from tolaria.controller import (
    ControllerClient,
    ControllerError,
    Policy,
    RunState,
    RunStatus,
    TlsConfig,
    Unreachable,
)
from tolaria.exit_codes import ExitCode

USAGE_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# A unary call's deadline when --timeout-s is not given (watch: there it bounds the stream, and defaults to none).
DEFAULT_TIMEOUT_S = 10.0


def _common(p: argparse.ArgumentParser, timeout_help: str = "deadline of each call, in seconds") -> None:
    client_options.add_arguments(p)
    watch = p.prog.endswith(" watch")
    p.add_argument("--timeout-s", type=float, default=None if watch else DEFAULT_TIMEOUT_S, help=timeout_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: Any) -> None:
    """Add the client commands."""
    p = sub.add_parser("status", help="panic state of one run (or all runs)")
    p.add_argument("run", nargs="?", help="run id (all runs when omitted)")
    _common(p)
    p.set_defaults(handler=lambda a: _call(a, status))
    p = sub.add_parser("runs", help="list runs")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        type=str.lower,
        choices=[s.lower() for s in RunState if s is not RunState.UNSPECIFIED],
        help="only runs in this state (repeatable)",
    )
    _common(p)
    p.set_defaults(handler=lambda a: _call(a, runs))
    p = sub.add_parser("watch", help="stream journal events (resumable with --from)")
    p.add_argument("--run", action="append", default=[], help="only this run (repeatable)")
    add_kind_argument(p)
    p.add_argument("--from", dest="cursor", type=int, default=0, help="cursor to resume after (default 0)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many events (0: follow forever)")
    p.add_argument(
        "--vitals",
        action="store_true",
        help="one line per vitals entry (default: each run's consecutive ones summarised in one line)",
    )
    _common(
        p,
        "stop following after this many seconds and exit 0 (the last cursor printed resumes it); "
        "default: until --limit or Ctrl-C",
    )
    p.set_defaults(handler=lambda a: _call(a, watch))
    for name, help_text in (
        ("rollback", "order a ROLLBACK"),
        ("halt", "HALT a run"),
        ("resume", "resume a HALTED run"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run", help="run id")
        p.add_argument("--reason", default=f"{name} from the governor CLI", help="why (journaled)")
        _common(p)
        p.set_defaults(handler=lambda a, action=name: _call(a, lambda client, args: command(client, args, action)))
    p = sub.add_parser("forget", help="remove a finished or unattached run from the daemon's memory")
    p.add_argument("run", help="run id")
    p.add_argument("--reason", default="forget from the governor CLI", help="why (journaled)")
    _common(p)
    p.set_defaults(handler=lambda a: _call(a, forget))
    p = sub.add_parser("policy", help="read or change a run's policy")
    group = p.add_subparsers(dest="policy_command", metavar="POLICY_COMMAND", required=True)
    q = group.add_parser("get", help="effective policy of a run")
    q.add_argument("run")
    _common(q)
    q.set_defaults(handler=lambda a: _call(a, policy_get))
    q = group.add_parser("set", help="change policy fields of a run (effective from the next record)")
    q.add_argument("run")
    q.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    _common(q)
    q.set_defaults(handler=lambda a: _call(a, policy_set))


Handler = Callable[[ControllerClient, argparse.Namespace], None]


def _call(args: argparse.Namespace, handler: Handler) -> int:
    try:
        conn = client_options.resolve(args)
        tls = TlsConfig.from_files(conn.tls_ca, conn.tls_cert, conn.tls_key) if conn.tls_ca else None
    except (OSError, ValueError) as exc:
        return error(args, str(exc), ExitCode.USAGE)
    address = conn.address or client_options.DEFAULT_ADDRESS
    try:
        timeout_s = DEFAULT_TIMEOUT_S if args.timeout_s is None else args.timeout_s
        with ControllerClient(address, conn.token or None, tls, timeout_s) as client:
            handler(client, args)
    except ControllerError as exc:
        if isinstance(exc, Unreachable):
            exit_code = ExitCode.GOVERNOR_UNREACHABLE
            status_name = exc.code.name if exc.code is not None else exit_code.name
            return error(args, unreachable_text(address, exc.code, tls is not None), exit_code, status_name)
        exit_code = ExitCode.USAGE if exc.code in USAGE_CODES else ExitCode.INTERNAL_ERROR
        name = exc.code.name if exc.code is not None else exit_code.name
        return error(args, exc.details if args.json else f"{name}: {exc.details}", exit_code, name)
    except PolicyConfigError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    except KeyboardInterrupt:
        return ExitCode.OK
    return ExitCode.OK


# The contract's enums as the CLI spells them, in tables and in --json alike: lowercase names without the
# prefix (`finished`, what `runs --state` takes), not FINISHED or the wire's RUN_STATE_FINISHED.
_ENUM_PREFIXES = ("RUN_STATE_", "VERDICT_KIND_", "COMMAND_TYPE_")
_ENUM_FIELDS = frozenset({"state", "run_state", "last_verdict", "type"})


def name(value: str) -> str:
    """An enum value (``RunState.FINISHED`` or its wire name ``RUN_STATE_FINISHED``) as the CLI prints it:
    ``finished``."""
    text = str(value)
    for prefix in _ENUM_PREFIXES:
        text = text.removeprefix(prefix)
    return text.lower()


def json_names(obj: Any) -> Any:
    """A ``to_dict`` result with its enum fields (state, run_state, last_verdict, an open command's type)
    spelled as ``name`` spells them."""
    if isinstance(obj, dict):
        return {k: name(v) if k in _ENUM_FIELDS and isinstance(v, str) else json_names(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_names(v) for v in obj]
    return obj


def _row(run: RunStatus) -> str:
    mean = "-" if run.history_mean is None else f"{run.history_mean:.4g}"
    return (
        f"{run.run_id:<36} {name(run.state):<13} {run.timeline:>3} {run.num_rollbacks:>4} {run.num_halts:>3} "
        f"{run.total_punishment_reward:>8g} {run.latest_validation_step:>8} {mean:>8}  {run.last_reason[:70]}"
    )


HEADER = f"{'run':<36} {'state':<13} {'tl':>3} {'rb':>4} {'hlt':>3} {'reward':>8} {'step':>8} {'mean':>8}  last reason"


def _print_runs(args: argparse.Namespace, runs_: list[RunStatus]) -> None:
    if args.json:
        print(json.dumps([json_names(r.to_dict()) for r in runs_]))
        return
    show(HEADER)
    for run in runs_:
        show(_row(run))


def status(client: ControllerClient, args: argparse.Namespace) -> None:
    """`governor status [RUN]`."""
    if args.run is None:
        _print_runs(args, client.runs())
        return
    run = client.panic_state(args.run)
    validation, result = _latest_entries(client, run)
    if args.json:
        extra = {"latest_validation": validation, "latest_command_result": result}
        print(json.dumps({**json_names(run.to_dict()), **{k: v for k, v in extra.items() if v is not None}}))
        return
    show(f"run {run.run_id} ({run.task}, {run.world_size} rank(s), profile {run.profile})")
    show(
        f"  state {name(run.state)}, timeline {run.timeline}, rollbacks {run.num_rollbacks}, "
        f"halts {run.num_halts}, total reward {run.total_punishment_reward:g}"
    )
    mean = "-" if run.history_mean is None else f"{run.history_mean:.4g}"
    std = "-" if run.history_std is None else f"{run.history_std:.4g}"
    show(
        f"  history {run.history_size} losses, mean {mean}, std {std}; "
        f"consecutive anomalies {run.consecutive_anomalies}"
    )
    show(f"  last verdict {name(run.last_verdict)}: {run.last_reason}")
    if validation is not None:
        summary = validation_summary(validation)
        show(
            f"  last validation: epoch {validation.get('epoch')} step {validation.get('step')} "
            f"loss {validation.get('loss')}{f', {summary}' if summary else ''}"
        )
    if result is not None:
        show(f"  last command result, rank {result.get('rank')}: {result_text(result)}")
    if run.open_command is not None:
        oc = run.open_command
        show(f"  open command {oc.command_id} ({name(oc.type)}) for {oc.age_s:.1f} s: {oc.reason}")
    for rank in run.ranks:
        show(
            f"  rank {rank.rank}: {'attached' if rank.attached else 'detached'}{', STALLED' if rank.stalled else ''}, "
            f"step {rank.latest_step}, records {rank.num_records}, gaps {rank.num_record_gaps}, "
            + (f"shed {rank.num_shed_records}, " if rank.num_shed_records else "")
            + f"seq {rank.last_durable_seq}, generation {rank.generation}"
        )


# How far back `status` looks in the run's journal entries for its latest validation record and command
# result (RunStatus carries neither): entries of other runs are filtered out by the daemon.
RECENT_ENTRIES = 4096


def _latest_entries(client: ControllerClient, run: RunStatus) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The run's latest journaled validation record (accuracy, per-class accuracy) and command result.

    Read with WatchEvents (a viewer's call) up to the run's last cursor; (None, None) when the window
    holds neither or the call is refused.
    """
    validation: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    if run.last_cursor == 0:
        return None, None
    cursor = max(0, run.last_cursor - RECENT_ENTRIES)
    try:
        with client.events(cursor, [run.run_id], reconnect_for_s=0, deadline_s=client.timeout_s) as stream:
            for event in stream:
                payload = {k: v for k, v in event.payload.items() if k != "effects"}
                if event.kind == "decision" and isinstance(payload.get("record"), dict):
                    validation = payload["record"]
                elif event.kind == "report" and "loss" in payload:
                    validation = payload
                elif event.kind == "command_result":
                    result = payload
                if event.cursor >= run.last_cursor:
                    break
    except ControllerError:
        pass
    return validation, result


def runs(client: ControllerClient, args: argparse.Namespace) -> None:
    """`governor runs`."""
    _print_runs(args, client.runs(args.state))


def watch(client: ControllerClient, args: argparse.Namespace) -> None:
    """`governor watch`: one line (or JSON object) per journal entry, with its cursor; each run's
    consecutive vitals entries in one summary line unless --vitals (or --kind vitals).

    The stream is not resumed across a daemon restart: it ends where the daemon ends it (exit 0), and an
    unreachable daemon exits 4. With --timeout-s the stream ends at that deadline: exit 0, whatever --limit
    said (the events printed and their cursors tell how far it got; --from the last one resumes).
    """
    count = 0
    printer = EntryPrinter(each_vitals=args.vitals or "vitals" in args.kind)
    try:
        with client.events(args.cursor, args.run, args.kind, reconnect_for_s=0, deadline_s=args.timeout_s) as stream:
            for count, event in enumerate(stream, start=1):
                if args.json:
                    obj = {"cursor": event.cursor, "ts": event.ts, "run": event.run_id, "kind": event.kind}
                    print(json.dumps({**obj, "payload": event.payload, "hash": event.hash}), flush=True)
                else:
                    printer.add(event.cursor, event.ts, event.run_id, event.kind, event.payload)
                if args.limit and count >= args.limit:
                    return
    finally:
        printer.flush()  # the vitals summarised so far (also at --limit, a deadline or Ctrl-C)
    if stream.deadline_reached and not args.json:
        print(f"governor watch: --timeout-s {args.timeout_s:g} reached after {count} event(s)", file=sys.stderr)


def command(client: ControllerClient, args: argparse.Namespace, action: str) -> None:
    """`governor rollback|halt|resume RUN`."""
    send = {"rollback": client.rollback, "halt": client.halt, "resume": client.resume}[action]
    receipt = send(args.run, args.reason)
    if args.json:
        print(json.dumps({"command_id": receipt.command_id, "run_state": name(receipt.run_state)}))
    else:
        show(f"{action}: command {receipt.command_id} sent to run {args.run}; state {name(receipt.run_state)}")


def forget(client: ControllerClient, args: argparse.Namespace) -> None:
    """`governor forget RUN`."""
    cursor = client.forget(args.run, args.reason)
    if args.json:
        print(json.dumps({"cursor": cursor}))
    else:
        show(f"run {args.run} forgotten (journal cursor {cursor}); its history stays in the journal")


def _print_policy(args: argparse.Namespace, policy: Policy) -> None:
    values = policy.to_dict()
    if args.json:
        print(json.dumps(values))
    else:
        for key in sorted(values):
            show(f"{key:<28} {values[key]}")


def policy_get(client: ControllerClient, args: argparse.Namespace) -> None:
    """`governor policy get RUN`."""
    _print_policy(args, client.get_policy(args.run))


def policy_set(client: ControllerClient, args: argparse.Namespace) -> None:
    """`governor policy set RUN KEY=VALUE...`."""
    _print_policy(args, client.update_policy(args.run, **parse_assignments(args.pairs)))
