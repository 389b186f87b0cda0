"""`governor audit`: review the journal offline (verify the chain, print the head hash)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from governor_daemon.exit_codes import ExitCode
from governor_daemon.journal.verify import verify_journal


def register(sub: Any) -> None:
    """Add the `audit` command group."""
    p = sub.add_parser("audit", help="review the journal: verify the hash chain, print the head hash")
    group = p.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=True)
    for name, help_text, handler in (
        ("verify", "verify every entry's hash chain; names the first bad line", run_verify),
        ("head", "print the last entry's seq and hash (keep it elsewhere to detect truncation)", run_head),
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
        q.set_defaults(handler=handler)


def _key(args: argparse.Namespace) -> bytes | None:
    return args.hmac_key_file.read_bytes().strip() if args.hmac_key_file else None


def run_verify(args: argparse.Namespace) -> int:
    """`governor audit verify`: exit 0 if the chain verifies, 1 otherwise (with the line named)."""
    try:
        report = verify_journal(args.data_dir, _key(args))
    except OSError as exc:
        print(f"governor audit verify: {exc}", file=sys.stderr)
        return ExitCode.USAGE
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
    return ExitCode.OK if report.ok else ExitCode.INTERNAL_ERROR


def run_head(args: argparse.Namespace) -> int:
    """`governor audit head`: the last entry's seq and hash."""
    report = verify_journal(args.data_dir, _key(args))
    if report.num_entries == 0 and not report.ok:
        print(f"governor audit head: {report.problem}", file=sys.stderr)
        return ExitCode.USAGE
    if args.json:
        print(json.dumps({"seq": report.head_seq, "hash": report.head_hash, "verified": report.ok}))
    else:
        print(f"{report.head_seq} {report.head_hash}")
    return ExitCode.OK
