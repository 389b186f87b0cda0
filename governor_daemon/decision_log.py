"""What the daemon logs about its runs: one structured line per durable journal entry that matters.

``describe(entries)`` turns one event's journal entries into ``Line``s: a command issued (ROLLBACK, HALT,
RESUME, with the rule or the controller that caused it), a command's result or timeout, a trainer attached
or detached, a rank STALLED or progressing again, a missed rank deadline, a finish, a policy change, a run
created or leaving memory. Verdicts that order nothing (one per validation step) and train-step batches
are left to the journal and the metrics.

``DecisionLog`` holds an event's lines until the journal entries they describe are durable (the runtime
calls ``hold`` after appending and ``release`` when the journal publishes), so the log never says
something the journal could still lose, then writes them through a ``LineLimiter``: a token bucket per
(run, rank, entry kind) and one per entry kind for the whole daemon, so a hostile or broken trainer (a
reconnect loop, forged command results) cannot flood the log, nor spend the budget of another kind (its
thousands of ranks reconnecting do not hold back another run's HALT); what a bucket refuses is counted and
summarised in one "log lines suppressed" line per key at most every ``SUMMARY_INTERVAL_S``. Admitted lines
that a person must hear about (ROLLBACK, HALT, STALLED: a STALL entry, or a missed rank deadline for a rank
that was not STALLED yet, nor before a restart: ``restored``) also go to the notifier, if one is set; a
journal failure always does.

Every line has ``run``, ``seq`` (the journal entry's seq: ``governor audit show`` finds it), ``kind``
(the entry kind), ``rank`` where one rank is concerned and ``reason`` where the journal gives one.
``describe`` and ``LineLimiter`` are pure (values and a clock reading in, values out); event-loop only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from governor_daemon.notify import journal_failure_event, line_event
from tolaria.journal import EntryKind

log = structlog.get_logger("governor.decisions")

LINE_BURST = 20
"""Lines one (run, rank, kind) key may write at once."""
LINE_REFILL_PER_S = 0.2
"""After the burst, one line per key every 5 s."""
DAEMON_BURST = 500
DAEMON_REFILL_PER_S = 50.0
"""The daemon-wide bucket of each entry kind: what many runs together may write of one kind."""
MAX_KEYS = 4096
"""Keys tracked at once; beyond, keys share one per entry kind (run "*")."""
PRUNE_INTERVAL_S = 1.0
"""With MAX_KEYS keys, how often a new key may scan them for ones to forget (a scan of 4096 takes ~1 ms)."""
SUMMARY_INTERVAL_S = 10.0
MAX_SUMMARY_LINES = 10
"""Per summary: at most this many keys named, the rest summed into one line with run "*"."""

NOTABLE_KINDS = frozenset(
    {
        EntryKind.RUN_CREATED,
        EntryKind.RUN_EVICTED,
        EntryKind.RUN_EXPIRED,
        EntryKind.RUN_FORGOTTEN,
        EntryKind.ATTACH,
        EntryKind.DETACH,
        EntryKind.COMMAND,
        EntryKind.COMMAND_RESULT,
        EntryKind.COMMAND_TIMEOUT,
        EntryKind.SNAPSHOT_ADOPTED,
        EntryKind.STALL,
        EntryKind.STALL_CLEARED,
        EntryKind.RANK_DEADLINE,
        EntryKind.FINISH,
        EntryKind.POLICY_CHANGE,
    }
)
"""Entry kinds with a line (plus the decisions and vitals that give a command its rule)."""
_NOTABLE = frozenset(str(k) for k in NOTABLE_KINDS)
_JUDGED = frozenset({str(EntryKind.DECISION), str(EntryKind.VITALS)})


@dataclass(frozen=True)
class Line:
    """One log line: ``message`` at ``level`` with ``fields``; ``notify`` names its notification, if any."""

    seq: int
    run: str
    kind: str
    rank: int | None
    level: str
    message: str
    fields: dict[str, Any]
    notify: str | None = None


def is_notable(kind: str, payload: dict[str, Any]) -> bool:
    """Whether an entry may give a line (cheap: called for every entry appended)."""
    if kind in _NOTABLE:
        return True
    if kind in _JUDGED:
        decision = payload.get("decision")
        return decision is not None and decision.get("command") is not None
    return False


def describe(entries: Sequence[tuple[int, str, str, dict[str, Any]]]) -> list[Line]:
    """The lines of one event's entries, given as (seq, run, kind, payload) in journal order."""
    lines: list[Line] = []
    cause: dict[str, Any] = {}  # what the decision or controller request before a command said
    for seq, run, kind, payload in entries:
        if kind in (EntryKind.DECISION, EntryKind.VITALS):
            decision = payload.get("decision") or {}
            if decision.get("command") is not None:
                cause = {"verdict": decision["verdict"], "rule": decision["rule"], "decided_step": decision["step"]}
            continue
        line = _line(seq, run, kind, payload, cause)
        if line is not None:
            lines.append(line)
        if kind == EntryKind.COMMAND:
            cause = {}
    return lines


class _Said(NamedTuple):
    """What a line says: its level, message, notification (if any) and fields (those that are None dropped)."""

    level: str
    message: str
    notify: str | None
    fields: dict[str, Any]


def _say(level: str, message: str, notify: str | None = None, **fields: Any) -> _Said:
    return _Said(level, message, notify, fields)


def _line(seq: int, run: str, kind: str, p: dict[str, Any], cause: dict[str, Any]) -> Line | None:
    """The line of one entry, or None for a kind without one; ``cause`` is what preceded a command."""
    formatter = _FORMATTERS.get(kind)
    if formatter is None:
        return None
    level, message, notify, fields = formatter(p, cause)
    rank: int | None = p.get("rank")
    return Line(seq, run, kind, rank, level, message, {k: v for k, v in fields.items() if v is not None}, notify)


def _notice_reasons(notices: Iterable[dict[str, Any]]) -> str:
    return "; ".join(n["reason"] for n in notices if n.get("reason"))


def _command(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    command = p["command"]
    name = str(command["kind"])
    extra = dict(cause) if p["cause"] in ("decision", "train_step") else {}
    return _say(
        "info" if name == "resume" else "warning",
        "command issued",
        name if name in ("rollback", "halt") else None,
        command=name.upper(),
        command_id=command["command_id"],
        cause=p["cause"],
        reason=command["reason"],
        timeline=command["timeline"],
        step=command["step"],
        punishment_reward=command["punishment_reward"],
        recovery_rung=command.get("recovery_rung"),
        **extra,
    )


def _command_result(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    reasons = _notice_reasons(p.get("notices", ()))
    ok = p["succeeded"] and not any(n.get("kind") == "unknown_command" for n in p.get("notices", ()))
    return _say(
        "info" if ok else "warning",
        "command result",
        command=str(p["command_kind"]).upper() if p.get("command_kind") else None,
        command_id=p["command_id"],
        succeeded=p["succeeded"],
        new_timeline=p["new_timeline"],
        restored_step=p["restored_step"],
        duration_ms=p["duration_ms"],
        error=p["error"] or None,
        record_seq=p["seq"],
        reason=reasons or None,
    )


def _command_timeout(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("warning", "command timed out", reason=p.get("reason"))


def _snapshot_adopted(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    snapshot = p["snapshot"]
    notices = p.get("notices", ())
    unknown = any(n.get("kind") == "unknown_snapshot" for n in notices)
    return _say(
        "warning" if unknown else "info",
        "snapshot adopted",
        step=snapshot["step"],
        snapshot_timeline=snapshot["timeline"],
        digest=snapshot["digest"],
        new_timeline=p["new_timeline"],
        run_timeline=p.get("run_timeline"),
        duration_ms=p["duration_ms"],
        record_seq=p["seq"],
        reason=_notice_reasons(notices) or None,
    )


def _attach(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say(
        "info",
        "trainer attached",
        generation=p["generation"],
        new_incarnation=p["new_incarnation"],
        last_durable_seq=p["last_durable_seq"],
        peer=p.get("peer"),
        caller=p.get("caller"),
    )


def _detach(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("info", "trainer detached", generation=p["generation"])


def _stall(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    reason = f"no progress for {p['seconds_without_progress']} s (threshold {p['threshold_s']} s)"
    if p.get("end_process"):
        reason += "; the watchdog told its trainer to end its process (end_stalled_ranks)"
    return _say(
        "warning",
        "rank stalled",
        "stalled",
        reason=reason,
        latest_timeline=p["latest_timeline"],
        latest_step=p["latest_step"],
    )


def _stall_cleared(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("info", "rank progressing again", timeline=p["timeline"], step=p["step"])


def _rank_deadline(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    missing = list(p["missing_ranks"])
    reason = f"ranks {missing} sent no record for step {p['step']} within {p['rank_deadline_s']} s"
    return _say(
        "warning",
        "rank deadline missed",
        "stalled",  # the missing ranks are STALLED now; DecisionLog notifies only the ones that were not
        reason=reason,
        missing_ranks=missing,
        timeline=p["timeline"],
        step=p["step"],
    )


def _finish(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say(
        "info",
        "rank finished",
        status=p["status"],
        epochs_completed=p["epochs_completed"],
        num_rollbacks=p["num_rollbacks"],
        reason=p.get("message") or None,
    )


def _run_created(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("info", "run created", task=p["task"], world_size=p["world_size"], timeline=p["timeline"])


def _policy_change(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("info", "policy changed", caller=p.get("caller"), changes=p.get("changes"))


def _run_forgotten(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("info", "run forgotten", caller=p.get("caller"), reason=p.get("reason"), state=p.get("state"))


def _run_expired(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("info", "run expired", reason=f"no trainer attached for {p['idle_s']} s", state=p.get("state"))


def _run_evicted(p: dict[str, Any], cause: dict[str, Any]) -> _Said:
    return _say("info", "run evicted", reason="finished runs beyond retain_finished_runs leave memory")


_FORMATTERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], _Said]] = {
    EntryKind.COMMAND: _command,
    EntryKind.COMMAND_RESULT: _command_result,
    EntryKind.COMMAND_TIMEOUT: _command_timeout,
    EntryKind.SNAPSHOT_ADOPTED: _snapshot_adopted,
    EntryKind.ATTACH: _attach,
    EntryKind.DETACH: _detach,
    EntryKind.STALL: _stall,
    EntryKind.STALL_CLEARED: _stall_cleared,
    EntryKind.RANK_DEADLINE: _rank_deadline,
    EntryKind.FINISH: _finish,
    EntryKind.RUN_CREATED: _run_created,
    EntryKind.POLICY_CHANGE: _policy_change,
    EntryKind.RUN_FORGOTTEN: _run_forgotten,
    EntryKind.RUN_EXPIRED: _run_expired,
    EntryKind.RUN_EVICTED: _run_evicted,
}
"""One formatter per kind of NOTABLE_KINDS: its line says what the entry says (the decisions and vitals give none)."""


@dataclass
class _Bucket:
    tokens: float
    at: float
    suppressed: int = 0


@dataclass
class LineLimiter:
    """Token buckets per (run, rank, kind) and per kind for the whole daemon. ``admit`` says whether a line
    is written; ``summaries`` returns, at most every ``summary_interval_s``, what was suppressed since the
    last one."""

    burst: float = LINE_BURST
    refill_per_s: float = LINE_REFILL_PER_S
    daemon_burst: float = DAEMON_BURST
    daemon_refill_per_s: float = DAEMON_REFILL_PER_S
    max_keys: int = MAX_KEYS
    summary_interval_s: float = SUMMARY_INTERVAL_S
    _keys: dict[tuple[str, int | None, str], _Bucket] = field(default_factory=dict)
    _daemon: dict[str, _Bucket] = field(default_factory=dict)
    _summarised_at: float | None = None
    _pruned_at: float | None = None

    def admit(self, run: str, rank: int | None, kind: str, now: float) -> bool:
        """Take a token from the key's bucket and the daemon's bucket of ``kind``; False (and counted) if
        either is empty."""
        key = (run, rank, kind)
        bucket = self._keys.get(key)
        if bucket is None:
            if len(self._keys) >= self.max_keys:
                if self._pruned_at is None or now - self._pruned_at >= PRUNE_INTERVAL_S:
                    self._pruned_at = now
                    self._prune(now)
                if len(self._keys) >= self.max_keys:
                    key = ("*", None, kind)
            bucket = self._keys.setdefault(key, _Bucket(self.burst, now))
        daemon = self._daemon.setdefault(kind, _Bucket(self.daemon_burst, now))  # entry kinds: a few dozen
        if self._summarised_at is None:
            self._summarised_at = now
        _refill(bucket, now, self.burst, self.refill_per_s)
        _refill(daemon, now, self.daemon_burst, self.daemon_refill_per_s)
        if bucket.tokens < 1 or daemon.tokens < 1:
            bucket.suppressed += 1
            return False
        bucket.tokens -= 1
        daemon.tokens -= 1
        return True

    def summaries(self, now: float) -> list[dict[str, Any]]:
        """What was suppressed since the last summary, once ``summary_interval_s`` has passed: the keys
        with the most suppressed lines first, at most MAX_SUMMARY_LINES of them, then one for the rest."""
        if self._summarised_at is None or now - self._summarised_at < self.summary_interval_s:
            return []
        window = now - self._summarised_at
        self._summarised_at = now
        counted = sorted(((b.suppressed, k) for k, b in self._keys.items() if b.suppressed), reverse=True)
        for _, key in counted:
            self._keys[key].suppressed = 0
        out = [
            {"run": run, "rank": rank, "kind": kind, "num_suppressed": n, "window_s": round(window, 1)}
            for n, (run, rank, kind) in counted[:MAX_SUMMARY_LINES]
        ]
        rest = counted[MAX_SUMMARY_LINES:]
        if rest:
            out.append(
                {
                    "run": "*",
                    "num_keys": len(rest),
                    "num_suppressed": sum(n for n, _ in rest),
                    "window_s": round(window, 1),
                }
            )
        self._prune(now)
        return out

    def _prune(self, now: float) -> None:
        """Forget keys whose bucket is full again and that owe no summary (they behave as new keys)."""
        for key, bucket in list(self._keys.items()):
            _refill(bucket, now, self.burst, self.refill_per_s)
            if bucket.tokens >= self.burst and not bucket.suppressed:
                del self._keys[key]


def _refill(bucket: _Bucket, now: float, burst: float, per_s: float) -> None:
    if now > bucket.at:
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * per_s)
        bucket.at = now


Notify = Callable[[dict[str, Any]], None]
"""Takes a notification event (``notify.event_for``); must not block (``Notifier.submit``)."""


class DecisionLog:
    """Lines held until durable, then written through the limiter (and notified). Event-loop only."""

    def __init__(self, limiter: LineLimiter | None = None, notify: Notify | None = None) -> None:
        self.limiter = limiter or LineLimiter()
        self.notify = notify
        self._held: deque[Line] = deque()
        self._stalled: set[tuple[str, int]] = set()
        """(run, rank) STALLED, as the entries written so far say: a missed deadline notifies new ones only."""

    def restored(self, stalled: Iterable[tuple[str, int]]) -> None:
        """At start, the (run, rank) pairs the journal left STALLED: a restarted daemon does not notify them
        again at their next missed deadline."""
        self._stalled = set(stalled)

    def hold(self, entries: Iterable[tuple[int, str, str, dict[str, Any]]]) -> None:
        """An event's appended entries (seq, run, kind, payload): keep their lines until durable."""
        try:
            self._held.extend(describe(list(entries)))
        except Exception:  # a bug here must not fail the event: the journal holds the entries anyway
            log.exception("decision log: entries not described")

    def release(self, durable_seq: int, now: float) -> None:
        """Entries up to ``durable_seq`` are durable: write their lines, in seq order."""
        held = self._held
        while held and held[0].seq <= durable_seq:
            line = held.popleft()
            try:
                self._write(line, now)
            except Exception:  # called while the journal publishes: a bug here must not stop it
                log.exception("decision log: line not written", run=line.run, seq=line.seq, kind=line.kind)
        self.flush(now)

    def flush(self, now: float) -> None:
        """Write the suppressed-lines summary when one is due (the runtime calls this on every tick too)."""
        for summary in self.limiter.summaries(now):
            log.warning("log lines suppressed", **summary)

    def journal_failed(self, error: str, data_dir: str) -> None:
        """The journal failed: notify (never rate-limited; it happens once)."""
        if self.notify is not None:
            self.notify(journal_failure_event(error, data_dir))

    def _write(self, line: Line, now: float) -> None:
        notify = self._track_stalls(line)
        if not self.limiter.admit(line.run, line.rank, line.kind, now):
            return
        fields: dict[str, Any] = {"run": line.run, "seq": line.seq, "kind": line.kind}
        if line.rank is not None:
            fields["rank"] = line.rank
        fields.update(line.fields)
        getattr(log, line.level)(line.message, **fields)
        if notify and self.notify is not None:
            self.notify(line_event(line))

    def _track_stalls(self, line: Line) -> bool:
        """Keep ``_stalled`` in step with the entries; whether the line is to be notified."""
        run, kind = line.run, line.kind
        if kind == EntryKind.STALL and line.rank is not None:
            self._stalled.add((run, line.rank))
        elif kind == EntryKind.STALL_CLEARED and line.rank is not None:
            self._stalled.discard((run, line.rank))
        elif kind == EntryKind.RANK_DEADLINE:
            new = {(run, r) for r in line.fields.get("missing_ranks", ())} - self._stalled
            self._stalled |= new
            return bool(new)
        elif kind in (EntryKind.RUN_EVICTED, EntryKind.RUN_EXPIRED, EntryKind.RUN_FORGOTTEN, EntryKind.RUN_CREATED):
            self._stalled = {key for key in self._stalled if key[0] != run}
        return line.notify is not None
