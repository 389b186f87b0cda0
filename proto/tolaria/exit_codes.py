"""Exit codes of both CLIs, `governor` and `tolaria-train`: one enum, one meaning per code.

Scripts, probes and job schedulers branch on these numbers, so a code never takes on a second meaning:
a new outcome gets a new code. Both CLIs build their --help epilog from this one table (``epilog()``),
and docs/protocol.md ("Exit codes") and the README list the same. It lives beside the generated
contract because both packages use it and neither imports the other.
"""

from __future__ import annotations

import enum


@enum.unique
class ExitCode(enum.IntEnum):
    """Process exit codes; ``HELP`` says what each one means."""

    OK = 0
    INTERNAL_ERROR = 1
    USAGE = 2
    HALTED = 3
    GOVERNOR_UNREACHABLE = 4
    ROLLBACK_FAILED = 5
    EPOCH_CAP = 6
    CHECK_FAILED = 7
    JOURNAL_FAILED = 8
    PEER_LOST = 9
    STALLED = 10
    INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process that Ctrl-C ended


HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.INTERNAL_ERROR: "internal error (a bug: please report it with the log)",
    ExitCode.USAGE: "usage or configuration error, or a refusal by the governor: the message says what to fix",
    ExitCode.HALTED: "tolaria-train: halted by the governor and not resumed within --halt-wait-s",
    ExitCode.GOVERNOR_UNREACHABLE: (
        "the governor was unreachable: is `governor serve` running at --address, plaintext or TLS? "
        "(tolaria-train: past the --fail-closed deadline)"
    ),
    ExitCode.ROLLBACK_FAILED: "tolaria-train: a rollback failed",
    ExitCode.EPOCH_CAP: "tolaria-train: --max-epochs-total reached before --epochs of progress",
    ExitCode.CHECK_FAILED: "a check failed: `audit verify` (the journal is broken), `health` (not serving)",
    ExitCode.JOURNAL_FAILED: "`serve` stopped: a journal write failed (disk full, I/O error); restart to recover",
    ExitCode.PEER_LOST: (
        "tolaria-train: another rank of the run was lost (a collective with it failed); a launcher's restart "
        "(torchrun --max-restarts, the Job's backoffLimit) adopts the last-known-good"
    ),
    ExitCode.STALLED: (
        "tolaria-train: ended by the governor's stall watchdog (policy end_stalled_ranks): no progress past the "
        "stall threshold; a launcher's restart adopts the last-known-good"
    ),
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def epilog() -> str:
    """The exit-code table for a --help epilog (argparse's RawDescriptionHelpFormatter keeps its lines)."""
    return "exit codes:\n" + "\n".join(f"  {int(code):>3}  {HELP[code]}" for code in ExitCode)
