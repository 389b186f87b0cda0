"""`governor audit`: review the journal offline (verify the chain, print the head hash)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from governor_daemon.cli.output import error, validation_summary, warning
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.journal.verify import verify_journal
from governor_daemon.text import show
from tolaria.exit_codes import ExitCode

# The distribution's name in pyproject.toml, with the extra that brings matplotlib.
PLOT_INSTALL = "pip install 'tolaria-governor[plot]'"


def register(sub: Any) -> None:
    """Add the `audit` command group."""
    p = sub.add_parser("audit", help="review the journal: show, verify, head hash, plot")
    group = p.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=True)
    for name, help_text, handler in (
        ("show", "show journal entries, filtered by run, kind and time", run_show),
        ("verify", "verify every entry's hash chain; names the first bad line", run_verify),
        ("head", "print the last entry's seq and hash (keep it elsewhere to detect truncation)", run_head),
        (
            "plot",
            "plot a run's losses with its profile's gates, the train stream, decisions and timelines to a PNG",
            run_plot,
        ),
    ):
        q = group.add_parser(name, help=help_text)
        q.add_argument(
            "--data-dir",
            type=Path,
            default=Path(os.environ.get("GOVERNOR_DATA_DIR", "governor-data")),
            help="journal directory [GOVERNOR_DATA_DIR; default governor-data]",
        )
        q.add_argument("--hmac-key-file", type=Path, default=None, help="key file if the journal uses HMAC")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "show":
            q.add_argument("--run", action="append", default=[], help="only this run (repeatable)")
            q.add_argument("--kind", action="append", default=[], help="only this kind (repeatable)")
            q.add_argument("--since", default=None, help="only entries at or after this UTC time (ISO 8601)")
        if name == "plot":
            q.add_argument("run", help="run id")
            q.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
        q.set_defaults(handler=handler)


def _key(args: argparse.Namespace) -> bytes | None:
    return args.hmac_key_file.read_bytes().strip() if args.hmac_key_file else None


def run_verify(args: argparse.Namespace) -> int:
    """`governor audit verify`: exit 0 if the chain verifies, 7 (CHECK_FAILED) otherwise, naming the line."""
    try:
        report = verify_journal(args.data_dir, _key(args))
    except OSError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "entries": report.num_entries,
                    "segments": report.num_segments,
                    "head_seq": report.head_seq,
                    "head_hash": report.head_hash,
                    "problem": report.problem,
                    "warnings": report.warnings,
                }
            )
        )
    else:
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if report.ok:
            print(
                f"ok: {report.num_entries} entries in {report.num_segments} segment(s) verify; "
                f"head seq {report.head_seq} hash {report.head_hash}"
            )
        else:
            print(f"FAILED: {report.problem}", file=sys.stderr)
    return ExitCode.OK if report.ok else ExitCode.CHECK_FAILED


def run_head(args: argparse.Namespace) -> int:
    """`governor audit head`: the last entry's seq and hash."""
    report = verify_journal(args.data_dir, _key(args))
    if report.num_entries == 0 and not report.ok:
        return error(args, str(report.problem), ExitCode.USAGE)
    if args.json:
        print(json.dumps({"seq": report.head_seq, "hash": report.head_hash, "verified": report.ok}))
    else:
        print(f"{report.head_seq} {report.head_hash}")
    return ExitCode.OK


def _since(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is not an ISO 8601 time (e.g. 2026-11-25T18:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lr_text(result: dict[str, Any]) -> str:
    """'; lr now X' for a journaled command result that carried the trainer's learning rate, else ''."""
    lr = result.get("lr_after_restore")
    if lr is None:
        return ""
    return f"; lr now {lr:.6g}" if isinstance(lr, int | float) else f"; lr now {lr}"


def result_text(result: dict[str, Any]) -> str:
    """What a journaled command result did: the restore of a ROLLBACK or RESUME, or the stop of a HALT (which
    restores nothing: hardening 2 found "restored step 150 in 0.0 ms" for one). Journals written before
    ``command_kind`` existed say the restore."""
    state = "succeeded" if result.get("succeeded") else f"FAILED ({result.get('error')})"
    kind = result.get("command_kind")
    what = f"command {result.get('command_id')}{f' ({kind})' if kind else ''} {state}"
    if kind == "halt":
        return f"{what}; halted on timeline {result.get('new_timeline')}"
    duration = result.get("duration_ms")
    took = f" in {duration:.1f} ms" if isinstance(duration, int | float) else ""
    restore = f"restored step {result.get('restored_step')}{took}" if result.get("succeeded") else "nothing restored"
    return f"{what}; timeline {result.get('new_timeline')}, {restore}{lr_text(result)}"


def describe(kind: str, payload: dict[str, Any]) -> str:
    """One human line for an entry's payload."""
    decision = payload.get("decision")
    if decision is not None:
        reward = "" if decision.get("punishment_reward") is None else f" reward {decision['punishment_reward']:g}"
        where = f"epoch {decision['epoch']} " if decision.get("epoch") is not None else ""
        record = validation_summary(payload.get("record") or {})
        return (
            f"{where}step {decision['step']} tl {decision['timeline']}: {decision['verdict'].upper()} "
            f"-> {decision['action']}{reward}: {decision['reason']}{f' [{record}]' if record else ''}"
        )
    if kind == "command_result":
        return f"rank {payload['rank']}: {result_text(payload)}"
    if kind == "report" and "loss" in payload:  # one rank's validation record of a multi-rank run
        record = validation_summary(payload)
        return (
            f"rank {payload['rank']}: validation epoch {payload['epoch']} step {payload['step']} "
            f"tl {payload['timeline']} loss {payload['loss']}{f', {record}' if record else ''}"
        )
    if kind == "controller_request":
        command_id = payload["command"]["command_id"]
        return f"{payload['caller']}: {payload['action']} (command {command_id}): {payload['reason']}"
    if kind == "finish":
        return (
            f"rank {payload['rank']}: {payload['status'].removeprefix('FINISH_STATUS_')} after "
            f"{payload['epochs_completed']} epochs, {payload['num_rollbacks']} rollback(s)"
        )
    rest = {k: v for k, v in payload.items() if k != "effects"}
    return json.dumps(rest, sort_keys=True)[:200]


def run_show(args: argparse.Namespace) -> int:
    """`governor audit show`."""
    try:
        since = _since(args.since)
    except ValueError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    segments = list_segments(args.data_dir)
    if not segments:
        return error(args, f"no journal in {args.data_dir}", ExitCode.USAGE)
    runs, kinds = set(args.run), set(args.kind)
    for path in segments:
        for item in read_segment(path):
            if not isinstance(item, LocatedEntry):
                warning(args, f"{item.path.name}:{item.line}: {item.reason}")
                continue
            e = item.entry
            if (runs and e.run not in runs) or (kinds and e.kind not in kinds) or (since and e.ts < since):
                continue
            if args.json:
                print(
                    json.dumps(
                        {"seq": e.seq, "ts": e.ts, "run": e.run, "kind": e.kind, "payload": e.payload, "hash": e.hash}
                    )
                )
            else:
                show(f"{e.seq:>7} {e.ts[:23]} {e.run or '-':<28} {e.kind:<18} {describe(e.kind, e.payload)}")
    return ExitCode.OK


def run_plot(args: argparse.Namespace) -> int:
    """`governor audit plot RUN -o FILE.png` (needs the `plot` extra: the daemon installs without matplotlib)."""
    try:
        import matplotlib  # noqa: F401  (imported here only: no other command needs it)
    except ImportError:
        return error(args, f"matplotlib is not installed; it comes with the plot extra: {PLOT_INSTALL}", ExitCode.USAGE)
    from governor_daemon.audit_plot import plot

    try:
        data = plot(args.data_dir, args.run, args.output)
    except ValueError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    counts = {"validations": len(data.validations), "rollbacks": data.count("rollback"), "halts": data.count("halt")}
    if args.json:
        print(json.dumps({"output": str(args.output), **counts, "profiles": data.profiles}))
        return ExitCode.OK
    print(
        f"wrote {args.output}: run {args.run} under profile {' → '.join(data.profiles) or 'unknown'}, "
        f"{counts['validations']} validations, {counts['rollbacks']} rollback(s), {counts['halts']} halt(s)"
    )
    return ExitCode.OK
