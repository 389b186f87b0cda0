"""What every `governor` command prints the same way: errors (JSON with --json), validation summaries, and
a reader that went away (`| head`). (Messages of the contract print through ``tolaria.controller``'s typed
classes' ``to_dict``.)

With ``--json``, stdout carries only data and every error or warning is one JSON object on its own line
on stderr: ``{"error": MESSAGE, "code": CODE, "exit_code": N}`` (CODE is the gRPC status name when the
daemon refused, else the exit code's name, e.g. ``USAGE``) or ``{"warning": MESSAGE}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from governor_daemon.text import printable, show
from tolaria.exit_codes import ExitCode


def error(args: argparse.Namespace, message_text: str, exit_code: ExitCode, code: str | None = None) -> int:
    """Report a failure of `governor <command>` on stderr; returns ``exit_code``."""
    if getattr(args, "json", False):
        obj = {"error": message_text, "code": code or exit_code.name, "exit_code": int(exit_code)}
        print(json.dumps(obj), file=sys.stderr, flush=True)
    else:
        print(f"governor {_command(args)}: {printable(message_text)}", file=sys.stderr, flush=True)
    return exit_code


def warning(args: argparse.Namespace, message_text: str) -> None:
    """A warning on stderr (a JSON object with --json)."""
    if getattr(args, "json", False):
        print(json.dumps({"warning": message_text}), file=sys.stderr, flush=True)
    else:
        print(f"warning: {printable(message_text)}", file=sys.stderr, flush=True)


def unreachable_text(address: str, status: Any, tls: bool) -> str:
    """The one-line error for a daemon that did not answer (exit 4): where, what gRPC said, and what to check.

    ``status`` is the gRPC status code (UNAVAILABLE or DEADLINE_EXCEEDED), ``tls`` whether TLS was used.
    """
    name = getattr(status, "name", str(status))
    what = "did not answer within --timeout-s" if name == "DEADLINE_EXCEEDED" else "cannot be reached"
    tls_hint = (
        "this client uses TLS (--tls-ca): the daemon must serve TLS, with a certificate for this host name"
        if tls
        else "this client speaks plaintext: for a daemon with TLS give --tls-ca (mTLS: --tls-cert and --tls-key too)"
    )
    return (
        f"the governor at {address} {what} ({name}): is `governor serve` running there and listening on that "
        f"address (--address, GOVERNOR_ADDRESS)? {tls_hint}"
    )


def _command(args: argparse.Namespace) -> str:
    words = (getattr(args, name, None) for name in ("command", "audit_command", "policy_command"))
    return " ".join(w for w in words if w)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # the journal writes non-finite floats as strings
        try:
            return float(value)
        except ValueError:
            return None
    return None


def validation_summary(details: dict[str, Any], max_classes: int = 10) -> str:
    """Accuracy and per-class accuracy of a journaled validation record ('' when it carried neither)."""
    parts: list[str] = []
    accuracy = _number(details.get("accuracy"))
    if accuracy is not None:
        parts.append(f"acc {accuracy:.4g}")
    per_class = [_number(x) for x in details.get("per_class_accuracy") or []]
    values = [math.nan if x is None else x for x in per_class]
    if values:
        if len(values) <= max_classes:
            parts.append("per-class " + " ".join(f"{i}:{v:.3g}" for i, v in enumerate(values)))
        else:
            finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
            if finite:
                low, at = min(finite)
                mean = sum(v for v, _ in finite) / len(finite)
                parts.append(f"per-class over {len(values)} classes: min {low:.3g} (class {at}), mean {mean:.3g}")
            else:
                parts.append(f"per-class over {len(values)} classes: none finite")
    return ", ".join(parts)


def exits_quietly_on_closed_pipe(run: Callable[[], int]) -> int:
    """Run a command; if stdout's reader goes away (`governor audit show | head -1`), stop at once with 0.

    Python would otherwise print a BrokenPipeError traceback, and another one when it flushes stdout at
    exit; stdout is pointed at /dev/null so that the exit is quiet.
    """
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.OK
    return code


# ----------------------------------------------------------------- journal entries for people
# `governor audit show` and `governor watch` print one line per entry: cursor, UTC time, run, rank, kind and
# the entry's key facts. Consecutive `vitals` entries of a run (train-step batches, most of a journal) are
# summarised in one line unless asked for one by one. --json prints the entries themselves.


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
    number = _number(value)
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


def _vitals_text(payload: dict[str, Any]) -> str:
    train = payload.get("train") or {}
    steps = f"steps {train['first_step']}..{train['last_step']}" if train else f"to step {payload.get('max_step')}"
    parts = [f"{payload.get('num_records')} records, {steps} tl {payload.get('timeline')}"]
    if train:
        parts.append(f"loss mean {_g(train.get('loss_mean'))} max {_g(train.get('loss_max'))}")
        if train.get("grad_norm_max") is not None:
            parts.append(f"grad norm max {_g(train['grad_norm_max'])}")
    for key, label in (("num_shed", "shed"), ("num_gaps", "gaps"), ("num_dropped", "dropped")):
        if payload.get(key):
            parts.append(f"{label} {payload[key]}")
    if payload.get("records"):
        parts.append("per-step records kept")
    return ", ".join(parts)


def describe(kind: str, payload: dict[str, Any]) -> str:
    """The key facts of a journal entry, in one line (before escaping: ``show`` escapes the whole line)."""
    try:
        return _describe(kind, payload)
    except (KeyError, TypeError, ValueError, AttributeError):  # an entry of another version: show it raw
        return _fallback(payload)


def _describe(kind: str, p: dict[str, Any]) -> str:  # one branch per kind
    decision = p.get("decision")
    if kind == "vitals":
        facts = _vitals_text(p)
        return f"{facts}; {decision_text(decision)}" if decision else facts
    if decision is not None:
        return decision_text(decision, p.get("record"))
    if kind == "command":
        return command_text(p["command"], p.get("cause"))
    if kind == "command_result":
        return result_text(p)
    if kind == "command_timeout":
        command = p.get("command")
        return f"{p.get('kind')}: {p.get('reason')}" + (f"; then {command_text(command)}" if command else "")
    if kind == "report" and "loss" in p:  # one rank's validation record of a multi-rank run
        summary = validation_summary(p)
        return (
            f"validation epoch {p['epoch']} step {p['step']} tl {p['timeline']} loss {p['loss']} (seq {p['seq']})"
            f"{f', {summary}' if summary else ''}; waiting for the other ranks"
        )
    if kind in ("late", "duplicate"):
        where = f"step {p.get('step')} tl {p.get('timeline')} (seq {p.get('seq')})"
        return f"{kind} validation report of {where}: not judged"
    if kind == "stale":
        resync = "; Resync sent" if p.get("resync") else ""
        return (
            f"{p.get('what')} seq {p.get('first_seq')}..{p.get('seq')} of timeline {p.get('timeline')} "
            f"(the run is on {p.get('current_timeline')}): not judged{resync}"
        )
    if kind == "superseded":
        return (
            f"step {p.get('step')} of timeline {p.get('timeline')} (the run is on {p.get('current_timeline')}): "
            "discarded, never judged"
        )
    if kind == "rank_deadline":
        return (
            f"step {p.get('step')} tl {p.get('timeline')} decided without rank(s) "
            f"{', '.join(str(r) for r in p.get('missing_ranks') or [])} after {p.get('rank_deadline_s')} s"
        )
    if kind == "controller_request":
        command_id = p["command"]["command_id"]
        return f"{p['caller']}: {p['action']} (command {command_id}): {p['reason']}"
    if kind == "finish":
        message = f": {p['message']}" if p.get("message") else ""
        return (
            f"{str(p['status']).removeprefix('FINISH_STATUS_')} after {p['epochs_completed']} epochs, "
            f"{p['num_rollbacks']} rollback(s){message}"
        )
    if kind == "attach":
        new = " (new incarnation)" if p.get("new_incarnation") else ""
        return (
            f"attached: incarnation {p.get('incarnation_id')}{new}, generation {p.get('generation')}, "
            f"durable up to seq {p.get('last_durable_seq')}, caller {p.get('caller')}, peer {p.get('peer')}"
        )
    if kind == "detach":
        return f"detached (generation {p.get('generation')})"
    if kind == "snapshot":
        return (
            f"published the snapshot of step {p.get('step')} tl {p.get('timeline')} (seq {p.get('seq')}), "
            f"{p.get('snapshot_bytes')} bytes in {_g(p.get('duration_ms'))} ms; "
            f"detector state {p.get('detector_state')}"
        )
    if kind == "snapshot_adopted":
        snapshot = p.get("snapshot") or {}
        reasons = "; ".join(n["reason"] for n in p.get("notices", ()) if n.get("reason"))
        adopted = (
            f"a restarted trainer adopted the snapshot of step {snapshot.get('step')} tl {snapshot.get('timeline')}"
        )
        if "run_timeline" not in p:  # not the rank's last published snapshot: nothing changed
            return f"{adopted} from shared memory: {reasons}"
        return (
            f"{adopted} from shared memory in {_g(p.get('duration_ms'))} ms; it goes on on tl {p.get('new_timeline')} "
            f"(the run is on tl {p.get('run_timeline')})" + (f"; {reasons}" if reasons else "")
        )
    if kind == "stall":
        return (
            f"STALLED at step {p.get('latest_step')} tl {p.get('latest_timeline')}: no progress for "
            f"{_g(p.get('seconds_without_progress'))} s (threshold {_g(p.get('threshold_s'))} s)"
            + ("; its trainer was told to end its process (watchdog)" if p.get("end_process") else "")
        )
    if kind == "stall_cleared":
        return f"progressing again at step {p.get('step')} tl {p.get('timeline')}"
    if kind == "run_created":
        policy = p.get("effective_policy") or {}
        overrides = ", ".join(f"{k}={v}" for k, v in sorted((p.get("overrides") or {}).items()))
        return (
            f"created: task {p.get('task')}, world size {p.get('world_size')}, profile {policy.get('profile', '?')}"
            f"{f', overrides {overrides}' if overrides else ''}"
        )
    if kind == "policy_change":
        before = p.get("before") or {}
        changes = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in sorted((p.get("changes") or {}).items()))
        return f"{p.get('caller')}: {changes}"
    if kind in ("run_evicted", "run_forgotten", "run_expired"):
        why = {"run_evicted": "finished runs retained", "run_expired": f"idle {p.get('idle_s')} s"}.get(kind)
        who = f" by {p.get('caller')}: {p.get('reason')}" if kind == "run_forgotten" else f" ({why})"
        return f"left the daemon's memory{who}; its entries stay in the journal"
    if kind == "daemon_start":
        moved = p.get("moved_aside") or []
        return (
            f"daemon started: {p.get('runs_restored')} run(s) restored, {p.get('entries_applied')} entries applied"
            + (f", moved aside {', '.join(str(m) for m in moved)}" if moved else "")
        )
    if kind == "daemon_stop":
        return f"daemon stopped: {p.get('reason')}"
    if kind == "checkpoint":
        return f"checkpoint of {len(p.get('runs') or {})} run(s)"
    return _fallback(p)


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
        mean, top = _number(train.get("loss_mean")), _number(train.get("loss_max"))
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
