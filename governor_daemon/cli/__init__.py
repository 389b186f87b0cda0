"""The `governor` command line: one module per command group, wired up in ``main``."""

from governor_daemon.cli.main import main

__all__ = ["main"]
