"""`tolaria-train`: train a task under the governor (or without one).

This module imports nothing that needs torch until ``main`` has checked that torch imports, so that an
install without the trainer extra gets a message naming it instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from google.protobuf.descriptor import FieldDescriptor

from tolaria.exit_codes import ExitCode, epilog
from tolaria.governor.v1 import common_pb2
from tolaria_trainer.address import check_governor_address
from tolaria_trainer.errors import TrainerError

ENV_VARS = (
    "TOLARIA_GOVERNOR",
    "TOLARIA_TOKEN",
    "TOLARIA_TOKEN_FILE",
    "TOLARIA_TLS_CA",
    "TOLARIA_TLS_CERT",
    "TOLARIA_TLS_KEY",
)
"""Environment variables `tolaria-train` reads."""
MIN_HISTORY_DEFAULT = 10
# The distribution's name in pyproject.toml, with the extra that brings torch.
TRAINER_INSTALL = "pip install 'tolaria-governor[trainer]'"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (needs torch: the task list comes from the task registry)."""
    from tolaria_trainer.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="tolaria-train",
        description="Train a morphogenetic model, governed by a Tolaria governor.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", default="digits", choices=sorted(TASKS), help="task to train (default digits)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of progress to reach (default 15)")
    p.add_argument(
        "--max-epochs-total",
        type=int,
        default=None,
        help="cap on epochs run, rollbacks included (default 3 x --epochs)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="data for cifar10 (python batches) and tinylm (a text file)"
    )
    p.add_argument(
        "--governor",
        default=os.environ.get("TOLARIA_GOVERNOR"),
        metavar="HOST:PORT",
        help="governor address, HOST:PORT or [IPV6]:PORT, checked (and resolved) before training "
        "[TOLARIA_GOVERNOR]; without it training is ungoverned",
    )
    p.add_argument("--token", default=os.environ.get("TOLARIA_TOKEN", ""), help="trainer token [TOLARIA_TOKEN]")
    p.add_argument(
        "--token-file",
        default=os.environ.get("TOLARIA_TOKEN_FILE", ""),
        help="file holding the trainer token (e.g. trainer.token from `governor tokens init`) [TOLARIA_TOKEN_FILE]",
    )
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=_env_path("TOLARIA_TLS_CA"),
        help="PEM CA of the governor's TLS certificate [TOLARIA_TLS_CA]; without it the channel is plaintext",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=_env_path("TOLARIA_TLS_CERT"),
        help="client certificate for mTLS [TOLARIA_TLS_CERT]",
    )
    p.add_argument(
        "--tls-key", type=Path, default=_env_path("TOLARIA_TLS_KEY"), help="client key for mTLS [TOLARIA_TLS_KEY]"
    )
    p.add_argument("--run-id", default="", help="run id (default <task>-<UTC time>-<6 hex>)")
    p.add_argument("--seed-schedule", default="", help="e.g. germinate:residual@2,blend@4,fossilize@7")
    p.add_argument("--snapshot-location", default="auto", choices=("auto", "device", "pinned", "host"))
    p.add_argument(
        "--fail-closed",
        nargs="?",
        type=float,
        const=60.0,
        default=None,
        metavar="DEADLINE_S",
        help="no training while the governor is unreachable: exit 4 after DEADLINE_S (default 60); "
        "exit 2 if it refuses this trainer",
    )
    p.add_argument(
        "--halt-wait-s", type=float, default=3600.0, help="wait this long for Resume after HALT (0: exit at once)"
    )
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="FAULT",
        help="nan@epoch=N, spike@epoch=N:xF:epochs=K, lobotomy@epoch=N, lr-blowup@step=N:xF, hang@epoch=N:s=S",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    p.add_argument(
        "--policy", action="append", default=[], metavar="KEY=VALUE", help="policy override asked of the governor"
    )
    p.add_argument("--agree-every-steps", type=int, default=50, help="steps between agreement points (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--summary-json",
        type=Path,
        default=None,
        help="also write the final summary here ({rank} in the path is replaced by the rank)",
    )
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    return p


def parse_policy(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs typed by the contract's Policy message; raises ValueError naming the key."""
    fields = common_pb2.Policy.DESCRIPTOR.fields_by_name
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--policy {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        kind = fields[key].type
        try:
            if kind == FieldDescriptor.TYPE_BOOL:
                out[key] = text.lower() in ("1", "true", "yes", "on")
            elif kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_INT32):
                out[key] = int(text)
            elif kind == FieldDescriptor.TYPE_DOUBLE:
                out[key] = float(text)
            else:
                out[key] = text
        except ValueError:
            raise ValueError(f"--policy {pair!r}: {key} needs a number") from None
    return out


def _configure_logging(fmt: str) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    logging.basicConfig(level=logging.WARNING)


def _progress_printer(tty: bool, epochs: int) -> Any:
    log = structlog.get_logger("tolaria.progress")

    def show(event: dict[str, Any]) -> None:
        if event["event"] == "epoch" and tty:
            done = min(event["epoch"], epochs)
            bar = "#" * round(30 * done / epochs) + "." * (30 - round(30 * done / epochs))
            print(
                f"\r[{bar}] epoch {event['epoch']:>3}/{epochs}  step {event['step']:>6}  tl {event['timeline']}  "
                f"val loss {event['val_loss']:.4f}  acc {event['val_accuracy']:.3f}  {event['mode']:<7}",
                end="" if done < epochs else "\n",
                flush=True,
            )
        elif tty:
            print()
            log.info(event.pop("event"), **event)
        else:
            log.info(event.pop("event"), **event)

    return show


def _warn_warmup(faults: list[str], policy: dict[str, Any]) -> None:
    from tolaria_trainer.faults import parse_fault

    warm = int(policy.get("min_history", MIN_HISTORY_DEFAULT))
    for spec in faults:
        fault = parse_fault(spec)
        if fault.unit == "epoch" and fault.kind in ("spike", "lobotomy", "hang") and fault.at <= warm:
            print(
                f"tolaria-train: warning: --inject {spec} falls inside the first {warm} validations (warm-up), "
                "where the governor judges only non-finite losses; it will likely not be caught",
                file=sys.stderr,
            )


def _token(args: argparse.Namespace) -> str:
    """--token, or the contents of --token-file (not both)."""
    if not args.token_file:
        return str(args.token)
    if args.token:
        raise ValueError("--token and --token-file exclude each other")
    try:
        return Path(args.token_file).read_text().strip()
    except OSError as exc:
        raise ValueError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run `tolaria-train`; returns the exit code."""
    try:
        importlib.import_module("torch")
    except ImportError as exc:
        print(
            f"tolaria-train: PyTorch cannot be imported ({exc}); it comes with the trainer extra: {TRAINER_INSTALL}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    args = build_parser().parse_args(argv)
    from tolaria_trainer.config import RunConfig
    from tolaria_trainer.loop import GovernedRun

    try:
        if args.governor:
            check_governor_address(args.governor)  # names --governor, before anything else is checked
        policy = parse_policy(args.policy)
        # The flags carry RunConfig's field names; RunConfig checks them all (__post_init__).
        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)}
        options.update(
            token=_token(args),
            policy=policy,
            fail_closed=args.fail_closed is not None,
            fail_closed_deadline_s=args.fail_closed or 60.0,
            inject=list(args.inject),
        )
        cfg = RunConfig(**options)
        _warn_warmup(cfg.inject, policy)
        _configure_logging(args.log_format)
        run = GovernedRun(cfg, _progress_printer(sys.stdout.isatty(), args.epochs))
    except (TrainerError, ValueError) as exc:
        print(f"tolaria-train: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    summary = run.run()
    report = summary.as_dict()
    if args.summary_json is not None:
        target = Path(str(args.summary_json).replace("{rank}", str(summary.rank)))
        target.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    acc = summary.final_validation_accuracy
    print(
        f"tolaria-train: {summary.status}: run {summary.run_id} rank {summary.rank}, "
        f"{summary.epochs_completed} epochs of progress ({summary.epochs_run} run), {summary.rollbacks} rollback(s), "
        f"final validation accuracy {'n/a' if acc is None else f'{acc:.4f}'}, {summary.duration_s:.1f} s"
        + (f" - {summary.message}" if summary.message else ""),
        file=sys.stderr,
    )
    print(json.dumps({"summary": report}, allow_nan=False), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
