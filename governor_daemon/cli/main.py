"""Entry point of the `governor` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from governor_daemon.cli import audit_cmd, control_cmds, replay_cmd, serve_cmd, tokens_cmd
from governor_daemon.cli.output import exits_quietly_on_closed_pipe
from tolaria import package_version
from tolaria.exit_codes import ExitCode, epilog


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="governor",
        description="Tolaria governor: training-safety daemon, controller client and audit tools.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve_cmd.register(sub)
    replay_cmd.register(sub)
    audit_cmd.register(sub)
    control_cmds.register(sub)
    tokens_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (argparse's usage errors exit 2 themselves)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = exits_quietly_on_closed_pipe(lambda: args.handler(args))
    except KeyboardInterrupt:
        print("governor: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
