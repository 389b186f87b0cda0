"""`governor audit export`: a run's journal as a replay trace (governor_daemon/offline/trace.py), and an honest
account of what the trace holds.

What a journal keeps of a run, and so what an export can give back:

- validation records: every one the daemon judged, exactly (a `decision` entry's ``record`` for one rank,
  each rank's `report` entry for several);
- train-step records: exactly, one by one, where the `vitals` entry kept them (``records``: while the run
  had sent fewer than ``--journal-train-records`` records; governor_daemon/train_records.py), in the
  batches the daemon judged them in; where it kept only the batch summary (later records, journals
  written before per-step records existed) the export leaves them out and says how many;
- the run's policy at creation and every UpdatePolicy, as "policy" records.

It leaves out, and counts, what the daemon did not learn from: records of a timeline a command was leaving
(sent before the trainers executed the command; a validation among them is judged while the command is
open, a verdict that commits nothing, which replay cannot redo as it executes a command at once), stale,
late and duplicate records, and shed batches (their records are not journaled; only a non-finite one was
judged). What replay cannot redo is named too:
commands a controller asked for, and steps decided at a rank deadline without their missing ranks.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from governor_daemon import train_records
from governor_daemon.journal.entry import Entry
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.policy import PolicyConfig
from governor_daemon.policy.decisions import float_to_json
from tolaria.journal import (
    ENTRY_KINDS,
    CommandIssued,
    ControllerRequest,
    Decision,
    Duplicate,
    Late,
    PolicyChange,
    Record,
    Report,
    RunCreated,
    Stale,
    Superseded,
    ValidationDetails,
    Vitals,
    record_of,
)


class ExportError(Exception):
    """The run cannot be exported (no journal, no such run)."""


@dataclass
class StepRange:
    """Records counted over a range of steps."""

    records: int = 0
    batches: int = 0
    first_step: int | None = None
    last_step: int | None = None

    def add(self, records: int, first: int | None, last: int | None) -> None:
        """Count one batch."""
        self.records += records
        self.batches += 1
        if first is not None:
            self.first_step = first if self.first_step is None else min(self.first_step, first)
        if last is not None:
            self.last_step = last if self.last_step is None else max(self.last_step, last)

    def text(self) -> str:
        """'N records in B batches, steps a..b'."""
        steps = f", steps {self.first_step}..{self.last_step}" if self.first_step is not None else ""
        return f"{self.records} records in {self.batches} batch(es){steps}"


@dataclass
class ExportReport:
    """What an export wrote and what it could not."""

    run: str
    world_size: int
    policy: dict[str, Any]
    policy_changes: int = 0
    validation_records: int = 0
    train: StepRange = field(default_factory=StepRange)
    summarised: StepRange = field(default_factory=StepRange)
    """Train records journaled as batch summaries only: not in the trace."""
    shed_records: int = 0
    shed_decisions: int = 0
    """Non-finite records in shed batches, judged live (their batch's records are not journaled)."""
    left_timeline_records: int = 0
    left_timeline_decisions: int = 0
    """Of those, records judged live while their command was open: verdicts that committed nothing."""
    unjudged_records: int = 0
    controller_commands: int = 0
    deadline_decisions: int = 0
    live_commands: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every record the live detectors judged is in the trace."""
        return self.summarised.records == 0 and self.shed_records == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (`governor audit export --json`)."""
        out = asdict(self)
        out["complete"] = self.complete
        return out

    def lines(self) -> list[str]:
        """The account for people, one fact a line."""
        return [
            *self._kept_lines(),
            *self._left_out_lines(),
            *self._not_replayable_lines(),
            *self._live_command_lines(),
        ]

    def _kept_lines(self) -> list[str]:
        """The run, its policy, and the records the trace holds (with the train records it could not keep)."""
        policy = ", ".join(f"{k}={v}" for k, v in sorted(self.policy.items())) or "defaults"
        out = [f"run {self.run}, world size {self.world_size}, policy at creation: {policy}"]
        if self.policy_changes:
            out.append(
                f"  policy changed {self.policy_changes} time(s) during the run: in the trace, where they happened"
            )
        out.append(f"  validation records: {self.validation_records}, all the daemon judged on the timelines kept")
        if self.summarised.records == 0:
            out.append(f"  train records: {self.train.text()}, exactly as judged (complete)")
        else:
            out.append(f"  train records: {self.train.text()}, exactly as judged")
            out.append(
                f"  NOT in the trace: {self.summarised.text()}, journaled as batch summaries only "
                "(past --journal-train-records, or written before per-step records were kept): replay's "
                "train-stream detectors do not see them, and a validation whose live verdict consulted the "
                "train stream (a snapshot's collapse check) can read differently"
            )
        return out

    def _left_out_lines(self) -> list[str]:
        """Records the trace leaves out: shed, sent on a timeline a command was leaving, stale, late, duplicate."""
        out: list[str] = []
        if self.shed_records:
            out.append(
                f"  NOT in the trace: {self.shed_records} shed record(s), which the live detectors skipped too"
                + (
                    f"; {self.shed_decisions} non-finite one(s) among them were judged live"
                    if self.shed_decisions
                    else ""
                )
            )
        if self.left_timeline_records:
            judged = (
                f", {self.left_timeline_decisions} of them judged while the command was open (verdicts that "
                "committed nothing; replay executes a command at once)"
                if self.left_timeline_decisions
                else ""
            )
            out.append(
                f"  left out: {self.left_timeline_records} record(s) sent on a timeline a command was leaving, which "
                f"the daemon did not learn from{judged}"
            )
        if self.unjudged_records:
            out.append(f"  left out, never judged live: {self.unjudged_records} stale, late or duplicate record(s)")
        return out

    def _not_replayable_lines(self) -> list[str]:
        """What replay cannot redo: controller commands, steps decided at a rank deadline."""
        out: list[str] = []
        if self.controller_commands:
            out.append(
                f"  not replayable: {self.controller_commands} command(s) a controller asked for (replay issues none)"
            )
        if self.deadline_decisions:
            out.append(
                f"  not replayable: {self.deadline_decisions} step(s) decided at the rank deadline without their "
                "missing ranks (replay decides them when the trace ends)"
            )
        return out

    def _live_command_lines(self) -> list[str]:
        """The commands the daemon issued live, and why replay's later decisions can differ after them."""
        out: list[str] = []
        for c in self.live_commands:
            onset = f", onset {c['onset_step']}" if c.get("onset_step") is not None else ""
            out.append(
                f"  live: step {c['step']} tl {c['timeline']} {c['kind']} {c['rule']} -> {c['command']} "
                f"(command step {c['command_step']}{onset})"
            )
        if self.live_commands:
            out.append(
                "  after a restore the live detectors resumed from the restored snapshot's state; replay restores "
                "at the decision's step with fresh ones, so later train-step decisions can differ"
            )
        return out


def export_run(data_dir: Path, run: str, out: Path) -> ExportReport:
    """Write ``run``'s latest life in the journal under ``data_dir`` as a JSONL trace (gzipped for *.gz)
    to ``out``, atomically; returns what it holds. Raises ExportError, or OSError for I/O."""
    segments = list_segments(data_dir)
    if not segments:
        raise ExportError(f"no journal in {data_dir}")
    entries = [
        item.entry
        for path in segments
        for item in read_segment(path)
        if isinstance(item, LocatedEntry) and item.entry.run == run
    ]
    created = [i for i, e in enumerate(entries) if e.kind == "run_created"]
    if not created:
        raise ExportError(
            f"no run {run!r} in the journal in {data_dir} (`governor audit show --kind run_created` lists them)"
        )
    entries = entries[created[-1] :]
    rows, report = _trace(run, entries)
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows).encode()
    if out.name.endswith(".gz"):
        text = gzip.compress(text)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(text)
    os.replace(tmp, out)
    return report


def _trace(run: str, entries: list[Entry]) -> tuple[list[dict[str, Any]], ExportReport]:
    """The trace rows of one life of the run (``entries`` start with its ``run_created``), and the report."""
    created = RunCreated.from_payload(entries[0].payload)
    meta = created.effects.get("meta") or {}
    world_size = int(created.world_size or meta.get("world_size") or 1)
    defaults = PolicyConfig().as_dict()
    effective = created.effective_policy or {}
    policy = {k: v for k, v in effective.items() if k in defaults and defaults[k] != v}
    common: dict[str, Any] = {"run_id": run, "world_size": world_size}
    if meta.get("num_classes") is not None:
        common["num_classes"] = meta["num_classes"]
    trace = _Trace(run, common, meta.get("hello_rgl"), ExportReport(run, world_size, policy))
    trace.rows.append({"run_id": run, "kind": "policy", "policy": policy})
    for e in entries[1:]:
        if e.kind in ENTRY_KINDS:
            trace.add(e.seq, record_of(e.kind, e.payload))
    return trace.rows, trace.report


@dataclass
class _Trace:
    """The rows of a run's trace, entry by entry, and what the report counts of them. ``left``: records of
    timelines up to this one were sent after a command left them; ``epoch``: the latest validation's."""

    run: str
    common: dict[str, Any]
    hello_rgl: Any
    report: ExportReport
    rows: list[dict[str, Any]] = field(default_factory=list)
    left: int = -1
    epoch: int = 0

    def add(self, seq: int, record: Record) -> None:
        """One entry of the run, after its ``run_created``."""
        decision = record.decision if isinstance(record, Vitals | Decision) else None
        if decision and decision.get("command"):
            self._live_command(seq, decision)
        match record:
            case Vitals():
                self._vitals(seq, record, decision)
            case Decision():
                self._decision(record, record.decision)
            case Report() if record.record.loss is not None:
                if (record.record.timeline or 0) <= self.left:
                    self.report.left_timeline_records += 1
                else:
                    self._validation(record.rank, record.record)
            case Late() | Duplicate() | Superseded():
                self.report.unjudged_records += 1
            case Stale():
                self.report.unjudged_records += record.num_records or 1
            case CommandIssued():
                self.left = max(self.left, int(record.command.get("timeline", 0)))
            case ControllerRequest():
                self.report.controller_commands += 1
            case PolicyChange():
                self.rows.append({"run_id": self.run, "kind": "policy", "policy": record.changes or {}})
                self.report.policy_changes += 1

    def _live_command(self, seq: int, decision: dict[str, Any]) -> None:
        command = decision["command"]
        self.report.live_commands.append(
            {
                "seq": seq,
                "kind": decision.get("kind"),
                "step": decision.get("step"),
                "timeline": decision.get("timeline"),
                "rule": decision.get("rule"),
                "command": command.get("kind"),
                "command_step": command.get("step"),
                "onset_step": decision.get("onset_step"),
            }
        )

    def _validation(self, rank: int, record: ValidationDetails) -> None:
        self.epoch = int(record.epoch or 0)
        row = {**self.common, "kind": "validation", "rank": rank, "epoch": self.epoch}
        row.update(step=record.step, loss=record.loss)
        rgl = record.random_guess_loss if record.random_guess_loss is not None else self.hello_rgl
        if rgl is not None:
            row["random_guess_loss"] = rgl
        self.rows.append(row)
        self.report.validation_records += 1

    def _decision(self, entry: Decision, decision: dict[str, Any]) -> None:
        report = self.report
        if entry.after_deadline or decision.get("missing_ranks"):
            report.deadline_decisions += 1
        on_left = int(decision.get("timeline", 0)) <= self.left
        if entry.record is not None and entry.record.loss is not None:  # one rank: the record is here
            if on_left:
                report.left_timeline_records += 1
                report.left_timeline_decisions += 1
            else:
                self._validation(entry.rank or 0, entry.record)
        elif on_left:  # several ranks: their reports were counted as they came
            report.left_timeline_decisions += 1

    def _vitals(self, seq: int, vitals: Vitals, decision: dict[str, Any] | None) -> None:
        report = self.report
        if vitals.timeline <= self.left and decision:
            report.left_timeline_decisions += 1
        if vitals.num_shed:
            report.shed_records += vitals.num_shed
            report.shed_decisions += 1 if decision else 0
        elif vitals.timeline <= self.left:
            report.left_timeline_records += vitals.num_records or 0
        elif vitals.records is None:
            train = vitals.train
            report.summarised.add(
                vitals.num_records or 0, train.first_step if train else None, train.last_step if train else None
            )
        else:
            self._train_rows(seq, vitals, vitals.records, decision)

    def _train_rows(self, seq: int, vitals: Vitals, encoded: dict[str, Any], decision: dict[str, Any] | None) -> None:
        """A batch's records one by one, up to a command's step when its decision sent one."""
        try:
            records = train_records.decode(encoded)
        except ValueError as exc:
            raise ExportError(f"journal entry {seq}: {exc}") from None
        kept = len(records.steps)
        if decision and decision.get("command"):  # the rest of the batch was on a timeline being left
            kept = next((i + 1 for i, s in enumerate(records.steps) if s == decision["step"]), kept)
            self.report.left_timeline_records += len(records.steps) - kept
        for i in range(kept):
            row = {**self.common, "kind": "train", "rank": vitals.rank, "epoch": self.epoch, "batch": seq}
            row.update(step=records.steps[i], loss=float_to_json(records.losses[i]))
            if records.grad_norms is not None:
                row["grad_norm"] = float_to_json(records.grad_norms[i])
            if records.lrs is not None:
                row["lr"] = float_to_json(records.lrs[i])
            if self.hello_rgl is not None:
                row["random_guess_loss"] = self.hello_rgl
            self.rows.append(row)
        self.report.train.add(kept, records.steps[0] if kept else None, records.steps[kept - 1] if kept else None)
