"""`governor replay TRACE`: run the policy over a recorded trace to tune thresholds offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from governor_daemon.cli.output import error, warning
from governor_daemon.errors import PolicyConfigError, TraceFormatError
from governor_daemon.offline.replay import ReplayDecision, replay, summarize
from governor_daemon.offline.trace import FORMATS, read_trace
from governor_daemon.policy import FIELD_NAMES, parse_assignments
from tolaria.exit_codes import ExitCode


def register(sub: Any) -> None:
    """Add the `replay` sub-command to ``sub`` (an argparse sub-parsers object)."""
    p = sub.add_parser(
        "replay",
        help="run the policy over a recorded trace (JSONL or CSV)",
        description=(
            "Run the governor's policy over a recorded training trace, as the daemon would have "
            "decided it. After a ROLLBACK the trace continues on a new timeline; after a HALT as if "
            "resumed at once. Exit 0 whenever the whole trace was read."
        ),
        epilog="policy keys: " + ", ".join(FIELD_NAMES),
    )
    p.add_argument("trace", type=Path, help="trace file (.jsonl or .csv, optionally .gz)")
    p.add_argument("--format", choices=FORMATS, help="trace format (default: from the file name)")
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one policy field; repeat for more",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per decision")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Execute `governor replay`; returns the exit code."""
    try:
        overrides = parse_assignments(args.policy)
        trace = read_trace(args.trace, args.format)
        decisions = replay(trace.records, overrides)
    except PolicyConfigError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    except TraceFormatError as exc:
        return error(args, f"{args.trace}: {exc}", ExitCode.USAGE)
    except OSError as exc:
        return error(args, f"cannot read {args.trace}: {exc.strerror or exc}", ExitCode.USAGE)
    if trace.unknown_keys:
        warning(args, f"governor replay: ignoring unknown key(s): {', '.join(trace.unknown_keys)}")
    if args.json:
        for rd in decisions:
            print(json.dumps(rd.as_dict(), allow_nan=False, default=str))
    else:
        print_table(decisions)
    return ExitCode.OK


def print_table(decisions: list[ReplayDecision]) -> None:
    """Validation decisions and every non-healthy train decision as a table, then a summary."""
    header = (
        f"{'run':<16} {'epoch':>5} {'step':>8} {'tl':>3} {'kind':<10} "
        f"{'verdict':<8} {'action':<8} {'reward':>7}  reason"
    )
    print(header)
    print("-" * len(header))
    for rd in decisions:
        d = rd.decision
        if d.kind == "train" and d.verdict == "healthy":
            continue
        reward = "" if d.punishment_reward is None else f"{d.punishment_reward:g}"
        epoch = "" if d.epoch is None else str(d.epoch)
        print(
            f"{rd.run_id[:16]:<16} {epoch:>5} {d.step:>8} {d.timeline:>3} {d.kind:<10} "
            f"{d.verdict!s:<8} {d.action!s:<8} {reward:>7}  {d.reason}"
        )
    print()
    for run_id, s in summarize(decisions).items():
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(s["verdicts"].items()))
        actions = ", ".join(f"{k} {v}" for k, v in sorted(s["actions"].items()) if k != "none") or "none"
        print(
            f"run {run_id}: {s['validation']} validation and {s['train']} train records; "
            f"verdicts: {verdicts}; actions: {actions}; "
            f"total punishment {s['total_punishment_reward']:g}; final timeline {s['final_timeline']}"
        )
