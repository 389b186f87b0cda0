"""Client commands for people and controllers: status, runs, watch, rollback, halt, resume, policy.

Each takes --address and --token (also GOVERNOR_ADDRESS, GOVERNOR_TOKEN) and --json. gRPC errors
become one-line messages and exit codes: unreachable 4, refused input or state 2, anything else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from governor_daemon.cli.audit_cmd import lr_text
from governor_daemon.cli.output import error, message_to_dict, validation_summary
from governor_daemon.errors import PolicyConfigError
from governor_daemon.exit_codes import ExitCode
from governor_daemon.policy import parse_assignments
from governor_daemon.text import show
from tolaria.governor.v1 import common_pb2, control_service_pb2_grpc
from tolaria.governor.v1 import control_service_pb2 as pb

USAGE_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
UNREACHABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _common(p: argparse.ArgumentParser, timeout_help: str = "deadline of each call, in seconds") -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("GOVERNOR_ADDRESS", "127.0.0.1:50051"),
        help="governor address [GOVERNOR_ADDRESS; default 127.0.0.1:50051]",
    )
    p.add_argument("--token", default=os.environ.get("GOVERNOR_TOKEN", ""), help="bearer token [GOVERNOR_TOKEN]")
    watch = p.prog.endswith(" watch")
    p.add_argument("--timeout-s", type=float, default=None if watch else 10.0, help=timeout_help)
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("GOVERNOR_TLS_CA", ""),
        help="PEM CA of the daemon's certificate: use TLS [GOVERNOR_TLS_CA]",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("GOVERNOR_CLIENT_CERT", ""),
        help="client certificate for mTLS [GOVERNOR_CLIENT_CERT]",
    )
    p.add_argument(
        "--tls-key", default=os.environ.get("GOVERNOR_CLIENT_KEY", ""), help="client key for mTLS [GOVERNOR_CLIENT_KEY]"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: Any) -> None:
    """Add the client commands."""
    p = sub.add_parser("status", help="panic state of one run (or all runs)")
    p.add_argument("run", nargs="?", help="run id (all runs when omitted)")
    _common(p)
    p.set_defaults(handler=lambda a: _call(a, status))
    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--state", action="append", default=[], help="only runs in this state (repeatable)")
    _common(p)
    p.set_defaults(handler=lambda a: _call(a, runs))
    p = sub.add_parser("watch", help="stream journal events (resumable with --from)")
    p.add_argument("--run", action="append", default=[], help="only this run (repeatable)")
    p.add_argument("--kind", action="append", default=[], help="only this entry kind (repeatable)")
    p.add_argument("--from", dest="cursor", type=int, default=0, help="cursor to resume after (default 0)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many events (0: follow forever)")
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
        p.set_defaults(handler=lambda a, action=name: _call(a, lambda stub, args: command(stub, args, action)))
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


Handler = Callable[[control_service_pb2_grpc.ControlServiceStub, argparse.Namespace], None]


def _call(args: argparse.Namespace, handler: Handler) -> int:
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    try:
        channel = _channel(args)
    except OSError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    stub = _WithMetadata(control_service_pb2_grpc.ControlServiceStub(channel), metadata, args.timeout_s)
    try:
        handler(stub, args)  # type: ignore[arg-type]
    except grpc.RpcError as exc:
        code = exc.code()
        if code in UNREACHABLE_CODES:
            exit_code = ExitCode.GOVERNOR_UNREACHABLE
        else:
            exit_code = ExitCode.USAGE if code in USAGE_CODES else ExitCode.INTERNAL_ERROR
        details = exc.details() or ""
        return error(args, details if args.json else f"{code.name}: {details}", exit_code, code.name)
    except PolicyConfigError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    except KeyboardInterrupt:
        return ExitCode.OK
    finally:
        channel.close()
    return ExitCode.OK


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    ca = Path(args.tls_ca).read_bytes()
    cert = Path(args.tls_cert).read_bytes() if args.tls_cert else None
    key = Path(args.tls_key).read_bytes() if args.tls_key else None
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca, key, cert))


class _WithMetadata:
    """Adds the token and a deadline to every call of a stub (WatchEvents: --timeout-s only when given)."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], timeout_s: float) -> None:
        self._stub, self._metadata, self._timeout = stub, metadata, timeout_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=self._timeout)


def _state_name(value: Any) -> str:
    return common_pb2.RunState.Name(value).removeprefix("RUN_STATE_")


def _row(run: pb.RunStatus) -> str:
    mean = f"{run.history_mean:.4g}" if run.HasField("history_mean") else "-"
    return (
        f"{run.run_id:<36} {_state_name(run.state):<13} {run.timeline:>3} {run.num_rollbacks:>4} {run.num_halts:>3} "
        f"{run.total_punishment_reward:>8g} {run.latest_validation_step:>8} {mean:>8}  {run.last_reason[:70]}"
    )


HEADER = f"{'run':<36} {'state':<13} {'tl':>3} {'rb':>4} {'hlt':>3} {'reward':>8} {'step':>8} {'mean':>8}  last reason"


def _print_runs(args: argparse.Namespace, runs_: list[pb.RunStatus]) -> None:
    if args.json:
        print(json.dumps([message_to_dict(r) for r in runs_]))
        return
    show(HEADER)
    for run in runs_:
        show(_row(run))


def status(stub: Any, args: argparse.Namespace) -> None:
    """`governor status [RUN]`."""
    if args.run is None:
        _print_runs(args, list(stub.ListRuns(pb.ListRunsRequest()).runs))
        return
    run = stub.GetPanicState(pb.GetPanicStateRequest(run_id=args.run)).run
    validation, result = _latest_entries(stub, run)
    if args.json:
        extra = {"latest_validation": validation, "latest_command_result": result}
        print(json.dumps({**message_to_dict(run), **{k: v for k, v in extra.items() if v is not None}}))
        return
    show(f"run {run.run_id} ({run.task}, {run.world_size} rank(s), profile {run.profile})")
    show(
        f"  state {_state_name(run.state)}, timeline {run.timeline}, rollbacks {run.num_rollbacks}, "
        f"halts {run.num_halts}, total reward {run.total_punishment_reward:g}"
    )
    mean = f"{run.history_mean:.4g}" if run.HasField("history_mean") else "-"
    std = f"{run.history_std:.4g}" if run.HasField("history_std") else "-"
    show(
        f"  history {run.history_size} losses, mean {mean}, std {std}; "
        f"consecutive anomalies {run.consecutive_anomalies}"
    )
    show(
        f"  last verdict {common_pb2.VerdictKind.Name(run.last_verdict).removeprefix('VERDICT_KIND_')}: "
        f"{run.last_reason}"
    )
    if validation is not None:
        summary = validation_summary(validation)
        show(
            f"  last validation: epoch {validation.get('epoch')} step {validation.get('step')} "
            f"loss {validation.get('loss')}{f', {summary}' if summary else ''}"
        )
    if result is not None:
        state = "succeeded" if result.get("succeeded") else f"FAILED ({result.get('error')})"
        show(
            f"  last command result: command {result.get('command_id')} {state} on rank {result.get('rank')}; "
            f"timeline {result.get('new_timeline')}, restored step {result.get('restored_step')}{lr_text(result)}"
        )
    if run.HasField("open_command"):
        oc = run.open_command
        show(f"  open command {oc.command_id} {common_pb2.CommandType.Name(oc.type)} for {oc.age_s:.1f} s: {oc.reason}")
    for rank in run.ranks:
        show(
            f"  rank {rank.rank}: {'attached' if rank.attached else 'detached'}{', STALLED' if rank.stalled else ''}, "
            f"step {rank.latest_step}, records {rank.num_records}, gaps {rank.num_record_gaps}, "
            f"seq {rank.last_durable_seq}, generation {rank.generation}"
        )


# How far back `status` looks in the run's journal entries for its latest validation record and command
# result (RunStatus carries neither): entries of other runs are filtered out by the daemon.
RECENT_ENTRIES = 4096


def _latest_entries(stub: Any, run: pb.RunStatus) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The run's latest journaled validation record (accuracy, per-class accuracy) and command result.

    Read with WatchEvents (a viewer's call) up to the run's last cursor; (None, None) when the window
    holds neither or the call is refused.
    """
    validation: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    if run.last_cursor == 0:
        return None, None
    request = pb.WatchEventsRequest(cursor=max(0, run.last_cursor - RECENT_ENTRIES), run_ids=[run.run_id])
    responses = stub.WatchEvents(request)
    try:
        for event in responses:
            payload = json.loads(event.payload_json)
            payload.pop("effects", None)
            if event.kind == "decision" and isinstance(payload.get("record"), dict):
                validation = payload["record"]
            elif event.kind == "report" and "loss" in payload:
                validation = payload
            elif event.kind == "command_result":
                result = payload
            if event.cursor >= run.last_cursor:
                break
    except grpc.RpcError:
        pass
    finally:
        responses.cancel()
    return validation, result


def runs(stub: Any, args: argparse.Namespace) -> None:
    """`governor runs`."""
    states = [common_pb2.RunState.Value("RUN_STATE_" + s.upper()) for s in args.state]
    _print_runs(args, list(stub.ListRuns(pb.ListRunsRequest(states=states)).runs))


def _events(stub: Any, args: argparse.Namespace) -> Iterator[pb.WatchEventsResponse]:
    request = pb.WatchEventsRequest(cursor=args.cursor, run_ids=args.run, kinds=args.kind)
    yield from stub.WatchEvents(request)


def watch(stub: Any, args: argparse.Namespace) -> None:
    """`governor watch`: one line (or JSON object) per journal entry, with its cursor.

    With --timeout-s the stream ends at that deadline: exit 0, whatever --limit said (the events printed
    and their cursors tell how far it got; --from the last one resumes).
    """
    count = 0
    try:
        for count, event in enumerate(_events(stub, args), start=1):
            _print_event(args, event)
            if args.limit and count >= args.limit:
                return
    except grpc.RpcError as exc:
        if args.timeout_s is None or exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        if not args.json:
            print(f"governor watch: --timeout-s {args.timeout_s:g} reached after {count} event(s)", file=sys.stderr)


def _print_event(args: argparse.Namespace, event: pb.WatchEventsResponse) -> None:
    payload = json.loads(event.payload_json)
    if args.json:
        obj = {"cursor": event.cursor, "ts": event.ts, "run": event.run_id, "kind": event.kind, "payload": payload}
        print(json.dumps({**obj, "hash": event.hash}), flush=True)
    else:
        payload.pop("effects", None)
        show(f"{event.cursor:>8} {event.ts} {event.run_id or '-':<28} {event.kind:<18} {json.dumps(payload)[:160]}")


def command(stub: Any, args: argparse.Namespace, action: str) -> None:
    """`governor rollback|halt|resume RUN`."""
    call = {
        "rollback": (stub.RequestRollback, pb.RequestRollbackRequest),
        "halt": (stub.Halt, pb.HaltRequest),
        "resume": (stub.Resume, pb.ResumeRequest),
    }[action]
    response = call[0](call[1](run_id=args.run, reason=args.reason))
    if args.json:
        print(json.dumps({"command_id": response.command_id, "run_state": _state_name(response.run_state)}))
    else:
        show(f"{action}: command {response.command_id} sent to run {args.run}; state {_state_name(response.run_state)}")


def forget(stub: Any, args: argparse.Namespace) -> None:
    """`governor forget RUN`."""
    response = stub.ForgetRun(pb.ForgetRunRequest(run_id=args.run, reason=args.reason))
    if args.json:
        print(json.dumps({"cursor": response.cursor}))
    else:
        show(f"run {args.run} forgotten (journal cursor {response.cursor}); its history stays in the journal")


def _print_policy(args: argparse.Namespace, policy: common_pb2.Policy) -> None:
    values = message_to_dict(policy)
    if args.json:
        print(json.dumps(values))
    else:
        for key in sorted(values):
            show(f"{key:<28} {values[key]}")


def policy_get(stub: Any, args: argparse.Namespace) -> None:
    """`governor policy get RUN`."""
    _print_policy(args, stub.GetPolicy(pb.GetPolicyRequest(run_id=args.run)).policy)


def policy_set(stub: Any, args: argparse.Namespace) -> None:
    """`governor policy set RUN KEY=VALUE...`."""
    changes = parse_assignments(args.pairs)
    message = common_pb2.Policy(**{k: v for k, v in changes.items() if v is not None})
    _print_policy(args, stub.UpdatePolicy(pb.UpdatePolicyRequest(run_id=args.run, changes=message)).policy)
