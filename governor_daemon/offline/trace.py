"""Reading recorded training traces (JSON Lines or CSV, optionally gzipped) for `governor replay`.

One record per line (JSONL) or row (CSV with a header of the same names): ``run_id`` (default
"run"), ``kind`` ("validation" or "train", default "validation"), ``epoch``, ``step``, ``loss`` (a number
or "nan", "inf", "-inf"), optional ``rank``, ``world_size``, ``grad_norm``, ``lr`` (train records: the
learning rate of that step), ``num_classes``, ``random_guess_loss``, ``batch`` (train records: records
with the same ``batch`` were one VitalsBatch, judged together; without it replay makes batches of 64).
A ``kind`` "policy" record (``run_id``, ``policy``: an object of policy fields) sets the run's policy
from that point of the trace, as the run's creation or an UpdatePolicy did (`governor audit export`
writes them; `governor replay --policy` still overrides them). Unknown keys are collected for one
warning. Any malformed record raises TraceFormatError naming its line, before anything is decided.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor_daemon.errors import PolicyConfigError, TraceFormatError
from governor_daemon.policy import PolicyConfig
from governor_daemon.policy.decisions import float_from_json

KNOWN_KEYS = frozenset(
    {
        "run_id",
        "kind",
        "epoch",
        "step",
        "loss",
        "rank",
        "world_size",
        "grad_norm",
        "lr",
        "num_classes",
        "random_guess_loss",
        "batch",
        "policy",
    }
)
FORMATS = ("jsonl", "csv")


@dataclass(frozen=True)
class TraceRecord:
    """One validated trace record; ``line`` is its 1-based line number in the file."""

    line: int
    run_id: str
    kind: str
    epoch: int
    step: int
    loss: float
    rank: int = 0
    world_size: int = 1
    grad_norm: float | None = None
    lr: float | None = None
    num_classes: int | None = None
    random_guess_loss: float | None = None
    batch: int | None = None
    policy: Mapping[str, Any] | None = None
    """Only on a "policy" record (whose epoch, step and loss mean nothing)."""


@dataclass(frozen=True)
class Trace:
    """All records of a file, in file order, and the unknown keys seen."""

    records: tuple[TraceRecord, ...]
    unknown_keys: tuple[str, ...]


def guess_format(path: Path) -> str:
    """ "csv" for *.csv and *.csv.gz, else "jsonl"."""
    name = path.name.lower().removesuffix(".gz")
    return "csv" if name.endswith(".csv") else "jsonl"


def read_trace(path: Path, fmt: str | None = None) -> Trace:
    """Read and validate a whole trace. Raises TraceFormatError (line named) or OSError."""
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; use one of {', '.join(FORMATS)}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceFormatError(1, f"file is not UTF-8 text ({exc.reason})") from None
    rows = _jsonl_rows(text) if fmt == "jsonl" else _csv_rows(text)
    records: list[TraceRecord] = []
    unknown: set[str] = set()
    for line, row in rows:
        unknown.update(k for k in row if k not in KNOWN_KEYS)
        records.append(parse_record(line, row))
    return Trace(tuple(records), tuple(sorted(unknown)))


def _jsonl_rows(text: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(number, f"not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TraceFormatError(number, f"expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _csv_rows(text: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return
    for row in reader:
        if None in row:
            raise TraceFormatError(reader.line_num, "more values than header columns")
        # Empty cells are absent values, as W&B and TensorBoard exports write them.
        yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}


def parse_record(line: int, row: Mapping[str, Any]) -> TraceRecord:
    """Validate one record's fields; raises TraceFormatError naming the field."""
    kind = str(row.get("kind", "validation")).strip()
    if kind == "policy":
        return _policy_record(line, row)
    if kind not in ("validation", "train"):
        raise TraceFormatError(line, f"kind must be 'validation', 'train' or 'policy', got {kind!r}")
    for required in ("loss", "epoch", "step"):
        if required not in row:
            raise TraceFormatError(line, f"missing required field {required!r}")
    run_id = str(row.get("run_id", "run")).strip() or "run"
    rank = _integer(line, row, "rank", 0)
    world_size = _integer(line, row, "world_size", 1)
    if world_size < 1:
        raise TraceFormatError(line, f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise TraceFormatError(line, f"rank must be in [0, world_size={world_size}), got {rank}")
    num_classes = _integer(line, row, "num_classes", None)
    if num_classes is not None and num_classes < 2:
        raise TraceFormatError(line, f"num_classes must be >= 2, got {num_classes}")
    rgl = _number(line, row, "random_guess_loss", None)
    if rgl is not None and not (math.isfinite(rgl) and rgl > 0):
        raise TraceFormatError(line, f"random_guess_loss must be a positive number, got {rgl}")
    loss = _number(line, row, "loss", None)
    assert loss is not None  # required above
    lr = _number(line, row, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise TraceFormatError(line, f"lr must be a number >= 0, got {lr}")
    return TraceRecord(
        line=line,
        run_id=run_id,
        kind=kind,
        epoch=_integer(line, row, "epoch", 0),
        step=_integer(line, row, "step", 0),
        loss=loss,
        rank=rank,
        world_size=world_size,
        grad_norm=_number(line, row, "grad_norm", None),
        lr=lr,
        num_classes=num_classes,
        random_guess_loss=rgl,
        batch=_integer(line, row, "batch", None),
    )


def _policy_record(line: int, row: Mapping[str, Any]) -> TraceRecord:
    policy = row.get("policy")
    if isinstance(policy, str):  # a CSV cell
        try:
            policy = json.loads(policy)
        except json.JSONDecodeError:
            raise TraceFormatError(line, "policy must be a JSON object of policy fields") from None
    if not isinstance(policy, dict):
        raise TraceFormatError(line, f"policy must be an object of policy fields, got {type(policy).__name__}")
    try:
        PolicyConfig().merged(policy)
    except (PolicyConfigError, TypeError, ValueError) as exc:
        raise TraceFormatError(line, f"policy: {exc}") from None
    run_id = str(row.get("run_id", "run")).strip() or "run"
    return TraceRecord(line=line, run_id=run_id, kind="policy", epoch=0, step=0, loss=math.nan, policy=policy)


def _number(line: int, row: Mapping[str, Any], key: str, default: float | None) -> float | None:
    if key not in row or row[key] is None:
        return default
    value = row[key]
    try:
        return float_from_json(value) if not isinstance(value, str) else _parse_float_text(value)
    except (ValueError, TypeError):
        raise TraceFormatError(line, f"{key} must be a number (or nan/inf/-inf), got {value!r}") from None


def _parse_float_text(text: str) -> float:
    try:
        return float_from_json(text)
    except ValueError:
        return float(text)


def _integer(line: int, row: Mapping[str, Any], key: str, default: int | None) -> Any:
    if key not in row or row[key] is None:
        return default
    value = _number(line, row, key, None)
    if value is None or not math.isfinite(value) or value != int(value):
        raise TraceFormatError(line, f"{key} must be a whole number, got {row[key]!r}")
    return int(value)
