"""`tolaria-train`: train a task under the governor (or without one).

This module imports nothing that needs torch until ``main`` has checked that torch imports, so that an
install without the trainer extra gets a message naming it instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from tolaria import client_options, package_version, policy_args
from tolaria.exit_codes import ExitCode, epilog
from tolaria_trainer import logs
from tolaria_trainer.errors import TrainerError

if TYPE_CHECKING:  # the loop needs torch, which this module imports only after checking it is there
    from tolaria_trainer.loop import RunSummary

ENV_VARS = client_options.environment_variables()
"""Environment variables `tolaria-train` reads (the connection's, spelled as `governor`'s client commands do)."""
DEPRECATED_ENV_VARS = tuple(old for o in client_options.OPTIONS for old in o.old_envs)
"""Earlier spellings, still read with a deprecation warning (``tolaria.client_options``)."""
MIN_HISTORY_DEFAULT = 10
DEPRECATED_DATA_DIR = "_deprecated_dataset_dir"  # argparse dest of --data-dir, now --dataset-dir
# The distribution's name in pyproject.toml, with the extra that brings torch.
TRAINER_INSTALL = "pip install 'tolaria-governor[trainer]'"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (needs torch: the task list comes from the task registry)."""
    from tolaria_trainer.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="tolaria-train",
        description="Train a morphogenetic model, governed by a Tolaria governor.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_training_arguments(p, sorted(TASKS))
    client_options.add_arguments(
        p,
        default_address=None,
        address_help="checked (and resolved) before training; without it training is ungoverned",
        legacy=True,
    )
    _add_run_arguments(p)
    _add_fault_and_output_arguments(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return p


def _add_training_arguments(p: argparse.ArgumentParser, tasks: list[str]) -> None:
    """What to train and how: the task, its length, batch, learning rate, device and dataset."""
    p.add_argument("--task", default="digits", choices=tasks, help="task to train (default digits)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of progress to reach (default 15)")
    p.add_argument(
        "--max-epochs-total",
        type=int,
        default=None,
        help="cap on epochs run, rollbacks included (default 3 x --epochs)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dataset-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="dataset for cifar10 (python batches) and tinylm (a text file)",
    )
    p.add_argument("--data-dir", dest=DEPRECATED_DATA_DIR, type=Path, default=None, help=argparse.SUPPRESS)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The run under the governor: its id, the seeds' schedule, where snapshots live, fail-closed and HALT waits."""
    p.add_argument("--run-id", default="", help="run id (default <task>-<UTC time>-<6 hex>)")
    p.add_argument("--seed-schedule", default="", help="e.g. germinate:residual@2,blend@4,fossilize@7")
    p.add_argument("--snapshot-location", default="auto", choices=("auto", "device", "pinned", "host"))
    p.add_argument(
        "--no-snapshot-shm",
        dest="snapshot_shm",
        action="store_false",
        help="keep snapshots in this process's memory, not /dev/shm (default with --run-id: in /dev/shm, so that "
        "a restarted process adopts the last-known-good)",
    )
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


def _add_fault_and_output_arguments(p: argparse.ArgumentParser) -> None:
    """Faults to inject, compilation, policy overrides, agreement points, the seed, and what is written out."""
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
    p.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="stderr as JSON lines (auto: when stdout is not a TTY) or readable lines (default auto)",
    )


def parse_policy(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs typed by the contract's Policy message (``tolaria.policy_args``, the daemon's parser
    too); raises ValueError naming the pair. A bool takes true/1/yes/on, false/0/no/off and nothing else: a
    misspelt one is an error, not false."""
    try:
        return policy_args.parse_pairs(pairs)
    except policy_args.PolicyArgError as exc:
        raise ValueError(f"--policy {exc}") from None


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
            logs.say(
                f"warning: --inject {spec} falls inside the first {warm} validations (warm-up), "
                "where the governor judges only non-finite losses; it will likely not be caught"
            )


def _dataset_dir(args: argparse.Namespace) -> tuple[Path | None, list[str]]:
    """--dataset-dir, or its deprecated spelling --data-dir (not both); and the deprecation, if used."""
    old = getattr(args, DEPRECATED_DATA_DIR)
    if old is None:
        return args.dataset_dir, []
    if args.dataset_dir is not None:
        raise ValueError("--dataset-dir and --data-dir (its deprecated spelling) both given: keep --dataset-dir")
    return old, ["--data-dir is now --dataset-dir"]


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

    logs.configure(args.log_format)
    try:
        # The address first (it names --address, or the variable it came from), then everything else.
        conn = client_options.resolve(args, default_address=None, legacy=True)
        dataset_dir, renamed = _dataset_dir(args)
        deprecations = [*renamed, *conn.deprecations]
        if deprecations:
            logs.say(f"deprecated spelling: {'; '.join(deprecations)} (the old spellings still work for now)")
        policy = parse_policy(args.policy)
        # Most flags carry RunConfig's field names; RunConfig checks them all (__post_init__).
        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)}
        options.update(
            governor=conn.address,
            token=conn.token,
            tls_ca=None if conn.tls_ca is None else Path(conn.tls_ca),
            tls_cert=None if conn.tls_cert is None else Path(conn.tls_cert),
            tls_key=None if conn.tls_key is None else Path(conn.tls_key),
            data_dir=dataset_dir,
            policy=policy,
            fail_closed=args.fail_closed is not None,
            fail_closed_deadline_s=args.fail_closed or 60.0,
            inject=list(args.inject),
        )
        cfg = RunConfig(**options)
        _warn_warmup(cfg.inject, policy)
        run = GovernedRun(cfg, _progress_printer(sys.stdout.isatty(), args.epochs))
    except (TrainerError, ValueError) as exc:
        logs.say(str(exc), "error", exit_code=int(ExitCode.USAGE))
        return ExitCode.USAGE
    try:
        summary = run.run()
    except Exception:  # a bug: still one JSON line on stderr in JSON mode, with the traceback as a field
        logs.say("internal error (a bug: please report it with this log)", "error", exc_info=True)
        return ExitCode.INTERNAL_ERROR
    _report(summary, args.summary_json)
    return summary.exit_code


def _report(summary: RunSummary, summary_json: Path | None) -> None:
    """The run's summary: to ``--summary-json`` if given, one line on stderr for people, one JSON line on stdout."""
    report = summary.as_dict()
    if summary_json is not None:
        target = Path(str(summary_json).replace("{rank}", str(summary.rank)))
        target.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    acc = summary.final_validation_accuracy
    logs.say(
        f"{summary.status}: run {summary.run_id} rank {summary.rank}, "
        f"{summary.epochs_completed} epochs of progress ({summary.epochs_run} run), {summary.rollbacks} rollback(s), "
        f"final validation accuracy {'n/a' if acc is None else f'{acc:.4f}'}, {summary.duration_s:.1f} s"
        + (f" - {summary.message}" if summary.message else ""),
        "info" if summary.exit_code == ExitCode.OK else "warning",
    )
    # The same object as --summary-json's file, on one line: `tolaria-train ... | jq .status` reads it.
    logs.write_line(sys.stdout, json.dumps(report, allow_nan=False))


if __name__ == "__main__":
    sys.exit(main())
