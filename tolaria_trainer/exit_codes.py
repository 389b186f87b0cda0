"""Exit codes of `tolaria-train` (the same numbers as the `governor` CLI)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes, DESIGN.md section 6."""

    OK = 0
    INTERNAL_ERROR = 1
    USAGE = 2
    HALTED = 3
    GOVERNOR_UNREACHABLE = 4
    ROLLBACK_FAILED = 5


EPILOG = """exit codes:
  0  completed
  1  internal error, or --max-epochs-total reached before --epochs of progress
  2  usage or configuration error
  3  halted by the governor and not resumed within --halt-wait-s
  4  governor unreachable past the --fail-closed deadline
  5  a rollback failed"""
