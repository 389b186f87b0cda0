"""`governor tokens init DIR` (a tokens file with fresh random tokens, made once) and `governor health`
(the gRPC health check, with the client's TLS settings): what a container deployment needs so that no
usable token is ever committed and the health check works with TLS on."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from governor_daemon.cli.output import unreachable_text
from tolaria import client_options
from tolaria.exit_codes import ExitCode

HEALTH_OPTIONS = (client_options.ADDRESS, *client_options.TLS_OPTIONS)
ENV_VARS = client_options.environment_variables(HEALTH_OPTIONS)
"""What `governor health` reads (a compose health check may set them)."""
ROLES = (("trainer-1", "trainer"), ("viewer-1", "viewer"), ("controller-1", "controller"))


def register(sub: Any) -> None:
    """Add `tokens init` and `health`."""
    p = sub.add_parser("tokens", help="make a tokens file")
    group = p.add_subparsers(dest="tokens_command", metavar="TOKENS_COMMAND", required=True)
    q = group.add_parser(
        "init",
        help="write DIR/tokens (0600) with a fresh token per role, and DIR/<role>.token (0640) for each "
        "client; an existing DIR/tokens is kept as it is",
    )
    q.add_argument("dir", type=Path)
    q.set_defaults(handler=init)
    p = sub.add_parser("health", help="exit 0 if the daemon's gRPC health service says SERVING")
    client_options.add_arguments(p, HEALTH_OPTIONS)
    p.add_argument("--timeout-s", type=float, default=2.0, help="deadline of the check, in seconds (default 2)")
    p.set_defaults(handler=health)


def init(args: argparse.Namespace) -> int:
    """Create the tokens file and the per-client token files, unless the tokens file exists."""
    folder: Path = args.dir
    tokens = folder / "tokens"
    if tokens.exists():
        print(f"{tokens} exists; kept as it is")
        return ExitCode.OK
    folder.mkdir(parents=True, exist_ok=True)
    chosen = {name: (role, secrets.token_urlsafe(32)) for name, role in ROLES}
    for role, token in chosen.values():
        _write(folder / f"{role}.token", token + "\n", 0o640)
    lines = "".join(f"{name} {role} {token}\n" for name, (role, token) in chosen.items())
    _write(tokens, "# name role token (made by `governor tokens init`)\n" + lines, 0o600)
    print(f"wrote {tokens} and {', '.join(f'{role}.token' for _, role in ROLES)} in {folder}")
    return ExitCode.OK


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def health(args: argparse.Namespace) -> int:
    """One health check: exit 0 when SERVING, 4 when the daemon cannot be reached, 7 (CHECK_FAILED) for any other
    answer (the message says which)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tolaria.channel import TlsConfig, open_channel

    try:
        conn = client_options.resolve(args, options=HEALTH_OPTIONS)
        address = conn.address or client_options.DEFAULT_ADDRESS
        tls = TlsConfig.from_files(conn.tls_ca, conn.tls_cert, conn.tls_key) if conn.tls_ca else None
        channel = open_channel(address, tls)
    except (OSError, ValueError) as exc:
        print(f"governor health: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout_s)
        except grpc.RpcError as exc:
            unreachable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if unreachable:
                hint = unreachable_text(address, exc.code(), conn.tls_ca is not None)
                print(f"governor health: {hint}", file=sys.stderr)
                return ExitCode.GOVERNOR_UNREACHABLE
            print(f"governor health: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return ExitCode.CHECK_FAILED
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return ExitCode.OK if serving else ExitCode.CHECK_FAILED
