"""Journal entries for people: `governor audit show` and `governor watch` print one line per entry: cursor, UTC
time, run, rank, kind and the entry's key facts, read through the entry's ``tolaria.journal`` record (an entry
that does not read, of another version, shows its raw fields). Consecutive `vitals` entries of a run
(train-step batches, most of a journal) are summarised in one line unless asked for one by one. --json prints
the entries themselves."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from governor_daemon.cli.output import json_number, validation_summary
from governor_daemon.text import show
from tolaria.journal import (
    Attach,
    Checkpoint,
    CommandIssued,
    CommandResult,
    CommandTimeout,
    ControllerRequest,
    DaemonStart,
    DaemonStop,
    Decision,
    Detach,
    Duplicate,
    Finish,
    Late,
    PolicyChange,
    RankDeadline,
    Record,
    Report,
    RunCreated,
    RunEvicted,
    RunExpired,
    RunForgotten,
    Snapshot,
    SnapshotAdopted,
    Stale,
    Stall,
    StallCleared,
    Superseded,
    Vitals,
    record_of,
)


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


def _g(value: Any) -> str:
    """A journaled number in 4 significant digits (non-finite ones are journaled as strings)."""
    number = json_number(value)
    return "-" if number is None else f"{number:.4g}"


def decision_text(decision: dict[str, Any], record: dict[str, Any] | None = None) -> str:
    """A decision: where, verdict, what it ordered (or that nothing was sent), and why."""
    reward = "" if decision.get("punishment_reward") is None else f" reward {decision['punishment_reward']:g}"
    where = f"epoch {decision['epoch']} " if decision.get("epoch") is not None else ""
    action = str(decision.get("action", "none"))
    command = decision.get("command")
    if command:
        ordered = f"{action} (command {command.get('command_id')})"
    elif action != "none":
        why = decision.get("suppressed")
        ordered = f"{action} not sent{f' ({why})' if why else ''}"
    else:
        ordered = "none"
    summary = validation_summary(record or {})
    return (
        f"{where}step {decision['step']} tl {decision['timeline']}: {str(decision['verdict']).upper()} "
        f"-> {ordered}{reward}: {decision['reason']}{f' [{summary}]' if summary else ''}"
    )


def command_text(command: dict[str, Any], cause: str | None = None) -> str:
    """An issued command: kind, id, cause, where, its recovery recipe and reason."""
    parts = [f"{str(command.get('kind', '?')).upper()} command {command.get('command_id')}"]
    if cause:
        parts.append(f"({cause})")
    parts.append(f"on timeline {command.get('timeline')} at step {command.get('step')}")
    recipe = []
    if command.get("onset_step") is not None:
        recipe.append(f"onset step {command['onset_step']}")
    if command.get("recovery_rung"):
        recipe.append(f"rung {command['recovery_rung']}")
    if command.get("restore_before_step") is not None:
        recipe.append(f"restore before step {command['restore_before_step']}")
    if command.get("skip_through_step") is not None:
        recipe.append(f"skip data through step {command['skip_through_step']}")
    if command.get("recovery_skip_batches"):
        recipe.append(f"skip {command['recovery_skip_batches']} batches")
    scale = command.get("recovery_lr_scale")
    if isinstance(scale, int | float) and scale != 1:
        recipe.append(f"lr x{scale:g}")
    text = " ".join(parts) + (f" ({', '.join(recipe)})" if recipe else "")
    return f"{text}: {command.get('reason')}"


def _vitals_text(v: Vitals) -> str:
    train = v.train
    steps = f"steps {train.first_step}..{train.last_step}" if train else f"to step {v.max_step}"
    parts = [f"{v.num_records} records, {steps} tl {v.timeline}"]
    if train:
        parts.append(f"loss mean {_g(train.loss_mean)} max {_g(train.loss_max)}")
        if train.grad_norm_max is not None:
            parts.append(f"grad norm max {_g(train.grad_norm_max)}")
    for count, label in ((v.num_shed, "shed"), (v.num_gaps, "gaps"), (v.num_dropped, "dropped")):
        if count:
            parts.append(f"{label} {count}")
    if v.records:
        parts.append("per-step records kept")
    return ", ".join(parts)


def describe(kind: str, payload: dict[str, Any]) -> str:
    """The key facts of a journal entry, in one line (before escaping: ``show`` escapes the whole line)."""
    try:
        record = record_of(kind, payload)
        text = _trainer_text(record) or _command_entry_text(record, payload) or _run_text(record)
        return text or _fallback(payload)
    except (KeyError, TypeError, ValueError, AttributeError):  # an entry of another version: show it raw
        return _fallback(payload)


def _trainer_text(r: Record) -> str | None:
    """A record's entry, its decision, or a timer's verdict on a rank."""
    match r:
        case Vitals():
            return f"{_vitals_text(r)}; {decision_text(r.decision)}" if r.decision else _vitals_text(r)
        case Decision():
            return decision_text(r.decision, r.record.to_payload() if r.record is not None else None)
        case Report() if r.record.loss is not None:  # one rank's validation record of a multi-rank run
            v = r.record
            summary = validation_summary(v.to_payload())
            return (
                f"validation epoch {v.epoch} step {v.step} tl {v.timeline} loss {v.loss} (seq {r.seq})"
                f"{f', {summary}' if summary else ''}; waiting for the other ranks"
            )
        case Late() | Duplicate():
            where = f"step {r.record.step} tl {r.record.timeline} (seq {r.seq})"
            return f"{r.KIND} validation report of {where}: not judged"
        case Stale():
            resync = "; Resync sent" if r.resync else ""
            return (
                f"{r.what} seq {r.first_seq}..{r.seq} of timeline {r.timeline} "
                f"(the run is on {r.current_timeline}): not judged{resync}"
            )
        case Superseded():
            where = f"step {r.step} of timeline {r.timeline} (the run is on {r.current_timeline})"
            return f"{where}: discarded, never judged"
        case RankDeadline():
            return (
                f"step {r.step} tl {r.timeline} decided without rank(s) "
                f"{', '.join(str(m) for m in r.missing_ranks or [])} after {r.rank_deadline_s} s"
            )
        case Stall():
            return (
                f"STALLED at step {r.latest_step} tl {r.latest_timeline}: no progress for "
                f"{_g(r.seconds_without_progress)} s (threshold {_g(r.threshold_s)} s)"
                + ("; its trainer was told to end its process (watchdog)" if r.end_process else "")
            )
        case StallCleared():
            return f"progressing again at step {r.step} tl {r.timeline}"
    return None


def _command_entry_text(r: Record, payload: dict[str, Any]) -> str | None:
    """A command, its result or timeout, a controller's request, a snapshot, a rank's finish."""
    match r:
        case CommandIssued():
            return command_text(r.command, r.cause)
        case CommandResult():
            return result_text(payload)
        case CommandTimeout():
            n = r.notice
            return f"{n.kind}: {n.reason}" + (f"; then {command_text(n.command)}" if n.command else "")
        case ControllerRequest():
            return f"{r.caller}: {r.action} (command {r.command['command_id']}): {r.reason}"
        case Finish():
            message = f": {r.message}" if r.message else ""
            return (
                f"{str(r.status).removeprefix('FINISH_STATUS_')} after {r.epochs_completed} epochs, "
                f"{r.num_rollbacks} rollback(s){message}"
            )
        case Snapshot():
            return (
                f"published the snapshot of step {r.step} tl {r.timeline} (seq {r.seq}), "
                f"{r.snapshot_bytes} bytes in {_g(r.duration_ms)} ms; detector state {r.detector_state}"
            )
        case SnapshotAdopted():
            return _adopted_text(r)
    return None


def _adopted_text(r: SnapshotAdopted) -> str:
    reasons = "; ".join(n.reason for n in r.notices or () if n.reason)
    adopted = f"a restarted trainer adopted the snapshot of step {r.snapshot.step} tl {r.snapshot.timeline}"
    if r.run_timeline is None:  # not the rank's last published snapshot: nothing changed
        return f"{adopted} from shared memory: {reasons}"
    return (
        f"{adopted} from shared memory in {_g(r.duration_ms)} ms; it goes on on tl {r.new_timeline} "
        f"(the run is on tl {r.run_timeline})" + (f"; {reasons}" if reasons else "")
    )


def _run_text(r: Record) -> str | None:
    """A run's life (attached, created, its policy changed, gone from memory) and the daemon's."""
    match r:
        case Attach():
            new = " (new incarnation)" if r.new_incarnation else ""
            return (
                f"attached: incarnation {r.incarnation_id}{new}, generation {r.generation}, "
                f"durable up to seq {r.last_durable_seq}, caller {r.caller}, peer {r.peer}"
            )
        case Detach():
            return f"detached (generation {r.generation})"
        case RunCreated():
            policy = r.effective_policy or {}
            overrides = ", ".join(f"{k}={v}" for k, v in sorted((r.overrides or {}).items()))
            return (
                f"created: task {r.task}, world size {r.world_size}, profile {policy.get('profile', '?')}"
                f"{f', overrides {overrides}' if overrides else ''}"
            )
        case PolicyChange():
            before = r.before or {}
            changes = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in sorted((r.changes or {}).items()))
            return f"{r.caller}: {changes}"
        case RunEvicted():
            return "left the daemon's memory (finished runs retained); its entries stay in the journal"
        case RunExpired():
            return f"left the daemon's memory (idle {r.idle_s} s); its entries stay in the journal"
        case RunForgotten():
            return f"left the daemon's memory by {r.caller}: {r.reason}; its entries stay in the journal"
        case DaemonStart():
            moved = r.moved_aside or []
            return f"daemon started: {r.runs_restored} run(s) restored, {r.entries_applied} entries applied" + (
                f", moved aside {', '.join(str(m) for m in moved)}" if moved else ""
            )
        case DaemonStop():
            return f"daemon stopped: {r.reason}"
        case Checkpoint():
            return f"checkpoint of {len(r.runs or {})} run(s)"
    return None


def _fallback(payload: dict[str, Any], limit: int = 240) -> str:
    """The scalar fields of an entry (nested ones named only), cut at ``limit`` characters."""
    parts = []
    for key, value in payload.items():
        if key == "effects":
            continue
        parts.append(f"{key}={value}" if isinstance(value, str | int | float | bool) or value is None else f"{key}=…")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _rank(payload: dict[str, Any]) -> str:
    rank = payload.get("rank")
    if isinstance(rank, int):
        return f"r{rank}"
    ranks = (payload.get("decision") or {}).get("ranks")
    if isinstance(ranks, list) and ranks:
        return f"r{ranks[0]}" if len(ranks) == 1 else f"r{min(ranks)}-{max(ranks)}"
    return "-"


def entry_line(cursor: int, ts: str, run: str, kind: str, payload: dict[str, Any]) -> str:
    """One entry as a line: cursor, time (UTC, to the millisecond), run, rank, kind, key facts."""
    return f"{cursor:>8} {ts[:23]} {run or '-':<24} {_rank(payload):<5} {kind:<16} {describe(kind, payload)}"


# A summary line covers at most this much journal time, so that `watch` on a run that only trains still
# prints a line now and then.
VITALS_SUMMARY_S = 30.0


def _seconds(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass
class _VitalsRun:
    """Consecutive `vitals` entries of one run, not printed yet."""

    first_cursor: int
    first_ts: str
    last_cursor: int = 0
    last_ts: str = ""
    batches: int = 0
    records: int = 0
    shed: int = 0
    gaps: int = 0
    dropped: int = 0
    first_step: int | None = None
    last_step: int | None = None
    ranks: set[int] = field(default_factory=set)
    timelines: set[int] = field(default_factory=set)
    first_mean: float | None = None
    last_mean: float | None = None
    loss_max: float | None = None

    def add(self, cursor: int, ts: str, p: dict[str, Any]) -> None:
        self.last_cursor, self.last_ts = cursor, ts
        self.batches += 1
        self.records += int(p.get("num_records") or 0)
        self.shed += int(p.get("num_shed") or 0)
        self.gaps += int(p.get("num_gaps") or 0)
        self.dropped += int(p.get("num_dropped") or 0)
        if isinstance(p.get("rank"), int):
            self.ranks.add(p["rank"])
        if isinstance(p.get("timeline"), int):
            self.timelines.add(p["timeline"])
        train = p.get("train") or {}
        low = train.get("first_step", p.get("max_step"))
        high = train.get("last_step", p.get("max_step"))
        if isinstance(low, int) and isinstance(high, int):
            self.first_step = low if self.first_step is None else min(self.first_step, low)
            self.last_step = high if self.last_step is None else max(self.last_step, high)
        mean, top = json_number(train.get("loss_mean")), json_number(train.get("loss_max"))
        if mean is not None and math.isfinite(mean):
            self.first_mean = mean if self.first_mean is None else self.first_mean
            self.last_mean = mean
        if top is not None and math.isfinite(top):
            self.loss_max = top if self.loss_max is None else max(self.loss_max, top)

    def line(self, run: str) -> str:
        ranks = sorted(self.ranks)
        rank = "-" if not ranks else f"r{ranks[0]}" if len(ranks) == 1 else f"r{ranks[0]}-{ranks[-1]}"
        text = (
            f"vitals: {self.batches} batch{'es' if self.batches != 1 else ''}, "
            f"{self.records} record{'s' if self.records != 1 else ''}"
        )
        if self.first_step is not None:
            text += f", steps {self.first_step}..{self.last_step}"
        tls = sorted(self.timelines)
        if tls:
            text += f", tl {tls[0]}" if len(tls) == 1 else f", tl {tls[0]}..{tls[-1]}"
        for count, label in ((self.shed, "shed"), (self.gaps, "gaps"), (self.dropped, "dropped")):
            if count:
                text += f", {label} {count}"
        if self.first_mean is not None:
            text += f"; loss mean {self.first_mean:.4g} -> {self.last_mean:.4g}, max {self.loss_max:.4g}"
        return f"{self.last_cursor:>8} {self.last_ts[:23]} {run or '-':<24} {rank:<5} {'vitals':<16} {text}"


class EntryPrinter:
    """Prints entries for people, one line each, summarising each run's consecutive `vitals` entries
    (a vitals entry that carries a decision is shown on its own) unless ``each_vitals``.

    A summary is printed before the next entry of another kind, once it covers ``VITALS_SUMMARY_S`` of
    journal time, and at ``flush`` (call it when the stream or file ends). Its cursor is the last one it
    covers, so `watch --from` it resumes after the summarised entries."""

    def __init__(self, each_vitals: bool = False, emit: Callable[[str], None] = show) -> None:
        self.each_vitals = each_vitals
        self.emit = emit
        self._pending: dict[str, _VitalsRun] = {}

    def add(self, cursor: int, ts: str, run: str, kind: str, payload: Mapping[str, Any]) -> None:
        """Print (or hold for a summary) one entry."""
        payload = dict(payload)
        if kind == "vitals" and not self.each_vitals and payload.get("decision") is None:
            group = self._pending.get(run)
            if group is None:
                group = self._pending[run] = _VitalsRun(cursor, ts)
            group.add(cursor, ts, payload)
            if _seconds(ts) - _seconds(group.first_ts) >= VITALS_SUMMARY_S:
                self.emit(self._pending.pop(run).line(run))
            return
        self.flush()
        self.emit(entry_line(cursor, ts, run, kind, payload))

    def flush(self) -> None:
        """Print the held summaries, oldest first."""
        pending = sorted(self._pending.items(), key=lambda item: item[1].first_cursor)
        self._pending.clear()
        for run, group in pending:
            self.emit(group.line(run))
