"""`governor audit`: review the journal offline: show, verify the chain, head hash, plot, export a replay trace."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from governor_daemon.cli.entries import EntryPrinter
from governor_daemon.cli.options import add_kind_argument
from governor_daemon.cli.output import error, warning
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
        (
            "export",
            "write a run's records as a trace `governor replay` reads, saying what it could not reconstruct",
            run_export,
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
            add_kind_argument(q)
            q.add_argument("--since", default=None, help="only entries at or after this UTC time (ISO 8601)")
            q.add_argument(
                "--vitals",
                action="store_true",
                help="one line per vitals entry (default: each run's consecutive ones summarised in one line)",
            )
        if name == "export":
            q.add_argument("--run", required=True, help="run id (its latest life in the journal)")
            q.add_argument("--out", type=Path, required=True, help="JSONL trace file to write (gzipped if *.gz)")
            q.add_argument("--force", action="store_true", help="overwrite --out if it exists")
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
    printer = EntryPrinter(each_vitals=args.vitals or "vitals" in kinds)
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
                printer.add(e.seq, e.ts, e.run, e.kind, e.payload)
    printer.flush()
    return ExitCode.OK


def run_plot(args: argparse.Namespace) -> int:
    """`governor audit plot RUN -o FILE.png` (needs the `plot` extra: the daemon installs without matplotlib)."""
    try:
        import matplotlib  # noqa: F401  (imported here only: no other command needs it)
    except ImportError:
        return error(args, f"matplotlib is not installed; it comes with the plot extra: {PLOT_INSTALL}", ExitCode.USAGE)
    from governor_daemon.offline.audit_plot import plot

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


def run_export(args: argparse.Namespace) -> int:
    """`governor audit export --run R --out FILE`: the run as a replay trace, and what it holds."""
    from governor_daemon.offline.export import ExportError, export_run

    if args.out.exists() and not args.force:
        return error(args, f"{args.out} exists; --force overwrites it", ExitCode.USAGE)
    try:
        report = export_run(args.data_dir, args.run, args.out)
    except ExportError as exc:
        return error(args, str(exc), ExitCode.USAGE)
    except OSError as exc:
        return error(args, f"cannot write {args.out}: {exc.strerror or exc}", ExitCode.USAGE)
    if args.json:
        print(json.dumps({"output": str(args.out), **report.as_dict()}))
        return ExitCode.OK
    show(f"wrote {args.out}: {report.validation_records} validation and {report.train.records} train records")
    for line in report.lines():
        show(line)
    show(f"replay it: governor replay {args.out}")
    return ExitCode.OK
