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
from google.protobuf import json_format

from governor_daemon.errors import PolicyConfigError
from governor_daemon.exit_codes import ExitCode
from governor_daemon.policy import parse_assignments
from governor_daemon.text import printable, show
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("GOVERNOR_ADDRESS", "127.0.0.1:50051"),
        help="governor address [GOVERNOR_ADDRESS; default 127.0.0.1:50051]",
    )
    p.add_argument("--token", default=os.environ.get("GOVERNOR_TOKEN", ""), help="bearer token [GOVERNOR_TOKEN]")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call")
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
    _common(p)
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
        print(f"governor {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    stub = _WithMetadata(control_service_pb2_grpc.ControlServiceStub(channel), metadata, args.timeout_s)
    try:
        handler(stub, args)  # type: ignore[arg-type]
    except grpc.RpcError as exc:
        code = exc.code()
        print(f"governor {args.command}: {code.name}: {printable(exc.details() or '')}", file=sys.stderr)
        if code in UNREACHABLE_CODES:
            return ExitCode.GOVERNOR_UNREACHABLE
        return ExitCode.USAGE if code in USAGE_CODES else ExitCode.INTERNAL_ERROR
    except PolicyConfigError as exc:
        print(f"governor {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
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
    """Adds the token and a deadline to every call of a stub (streams get no deadline)."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], timeout_s: float) -> None:
        self._stub, self._metadata, self._timeout = stub, metadata, timeout_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        timeout = None if name == "WatchEvents" else self._timeout
        return lambda request: method(request, metadata=self._metadata, timeout=timeout)


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
        print(json.dumps([json_format.MessageToDict(r, preserving_proto_field_name=True) for r in runs_]))
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
    if args.json:
        print(json.dumps(json_format.MessageToDict(run, preserving_proto_field_name=True)))
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
    if run.HasField("open_command"):
        oc = run.open_command
        show(f"  open command {oc.command_id} {common_pb2.CommandType.Name(oc.type)} for {oc.age_s:.1f} s: {oc.reason}")
    for rank in run.ranks:
        show(
            f"  rank {rank.rank}: {'attached' if rank.attached else 'detached'}{', STALLED' if rank.stalled else ''}, "
            f"step {rank.latest_step}, records {rank.num_records}, gaps {rank.num_record_gaps}, "
            f"seq {rank.last_durable_seq}, generation {rank.generation}"
        )


def runs(stub: Any, args: argparse.Namespace) -> None:
    """`governor runs`."""
    states = [common_pb2.RunState.Value("RUN_STATE_" + s.upper()) for s in args.state]
    _print_runs(args, list(stub.ListRuns(pb.ListRunsRequest(states=states)).runs))


def _events(stub: Any, args: argparse.Namespace) -> Iterator[pb.WatchEventsResponse]:
    request = pb.WatchEventsRequest(cursor=args.cursor, run_ids=args.run, kinds=args.kind)
    yield from stub.WatchEvents(request)


def watch(stub: Any, args: argparse.Namespace) -> None:
    """`governor watch`: one line (or JSON object) per journal entry, with its cursor."""
    for count, event in enumerate(_events(stub, args), start=1):
        if args.json:
            print(
                json.dumps(
                    {
                        "cursor": event.cursor,
                        "ts": event.ts,
                        "run": event.run_id,
                        "kind": event.kind,
                        "payload": json.loads(event.payload_json),
                        "hash": event.hash,
                    }
                ),
                flush=True,
            )
        else:
            payload = json.loads(event.payload_json)
            payload.pop("effects", None)
            show(f"{event.cursor:>8} {event.ts} {event.run_id or '-':<28} {event.kind:<18} {json.dumps(payload)[:160]}")
        if args.limit and count >= args.limit:
            return


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
    values = json_format.MessageToDict(policy, preserving_proto_field_name=True)
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
