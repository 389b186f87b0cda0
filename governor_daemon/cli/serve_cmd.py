"""`governor serve`: run the daemon."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from governor_daemon import logs, settings
from tolaria.exit_codes import ExitCode


def register(sub: Any) -> None:
    """Add the `serve` sub-command."""
    p = sub.add_parser(
        "serve",
        help="run the governor daemon",
        description="Run the governor daemon. Settings: flags > GOVERNOR_* environment > --config TOML > defaults.",
        epilog="environment variables: " + ", ".join(settings.ENV_VARS),
    )
    settings.add_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Validate the settings, then serve until SIGTERM/SIGINT."""
    try:
        resolved = settings.resolve(args)
    except settings.SettingsError as exc:
        print(f"governor serve: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    logs.configure(resolved.log_format)
    from governor_daemon.server import serve  # grpc is imported only when serving

    return asyncio.run(serve(resolved))
