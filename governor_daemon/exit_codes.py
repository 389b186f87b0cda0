"""Exit codes of the `governor` CLI (the trainer's CLI uses the same numbers), with help texts."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes (docs/protocol.md, "Exit codes")."""

    OK = 0
    INTERNAL_ERROR = 1
    USAGE = 2
    HALTED = 3
    GOVERNOR_UNREACHABLE = 4
    ROLLBACK_FAILED = 5


HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.INTERNAL_ERROR: "internal error (a bug: please report it with the log)",
    ExitCode.USAGE: "usage or configuration error: the message names the flag or file to fix",
    ExitCode.HALTED: "the run was halted by the governor",
    ExitCode.GOVERNOR_UNREACHABLE: "the governor was unreachable past the fail-closed deadline",
    ExitCode.ROLLBACK_FAILED: "a rollback failed",
}


def epilog() -> str:
    """The exit-code table for --help texts."""
    return "exit codes:\n" + "\n".join(f"  {int(code)}  {HELP[code]}" for code in ExitCode)
