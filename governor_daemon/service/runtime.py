"""The core on the event loop: the journal, the open streams, and what the daemon adds to applying effects.

``Governor.handle(event)`` runs the event through ``core/apply.Applier``, the one applier of effects the
simulation shares: entries appended at once (the core's state includes them), a commit now when one is
``sync``, and messages released only once everything appended before them is durable. The runtime adds
metrics and log lines per entry, and delivers released messages to their streams. Nothing awaits between an
event and its entries, so no other event interleaves with a decision.

A journal write failure is fatal (like PostgreSQL's PANIC on a failed WAL fsync): nothing more is
acknowledged or sent, every stream ends, and ``fatal`` is set for the server to exit non-zero; a
restart recovers from what is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from governor_daemon.clock import Clock, SystemClock
from governor_daemon.core import CoreOptions, GovernorCore, Limits, Run
from governor_daemon.core import events as ev
from governor_daemon.core.apply import Applier
from governor_daemon.core.effects import Append, EndStream, Send
from governor_daemon.decision_log import DecisionLog, is_notable
from governor_daemon.errors import UnavailableError
from governor_daemon.journal import Committed, Journal, Recovery
from governor_daemon.journal.group_commit import GroupCommitter
from governor_daemon.journal.segments import DEFAULT_SEGMENT_BYTES
from governor_daemon.metrics import Metrics
from governor_daemon.policy import PolicyConfig
from governor_daemon.service.streams import StreamHandle
from governor_daemon.service.validation import check_run_id
from tolaria.journal import AuthFailure, EntryKind

log = structlog.get_logger("governor")


@dataclass
class GovernorOptions:
    """What the runtime needs from the serve configuration."""

    data_dir: Path
    defaults: PolicyConfig = field(default_factory=PolicyConfig)
    locked_fields: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    group_commit_s: float = 0.002
    hmac_key: bytes | None = None
    repair: bool = False


class Governor:
    """The core, its journal and its streams. Event-loop only."""

    def __init__(self, options: GovernorOptions, clock: Clock | None = None) -> None:
        self.options = options
        self.clock: Clock = clock or SystemClock()
        self.core = GovernorCore(CoreOptions(options.defaults, options.locked_fields, options.limits))
        self.streams: dict[int, StreamHandle] = {}
        self.journal: GroupCommitter | None = None
        self._applier: Applier | None = None
        self.recovery = Recovery()
        self.stopping = asyncio.Event()
        self.fatal = asyncio.Event()
        self.failure: BaseException | None = None
        self.metrics = Metrics()
        self.refusals = RefusalWindow()
        self.decisions = DecisionLog()
        """Log lines (and notifications) of durable entries; the server gives it a notifier."""
        self._next_stream = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> Recovery:
        """Open the journal, rebuild the core from it, journal the start. Raises JournalCorruptError."""
        journal = Journal(self.options.data_dir, self.options.segment_bytes, self.options.hmac_key)
        self.recovery = journal.open(repair=self.options.repair)
        self.core.restore(self.recovery.checkpoint, self.recovery.entries)
        self.decisions.restored(
            (run_id, rank) for run_id, run in self.core.registry.runs.items() for rank in run.policy.roster.stalled
        )
        journal.checkpoint_provider = self.core.checkpoint
        self.journal = GroupCommitter(journal, self.options.group_commit_s)
        self._applier = Applier(self.core, self.journal, self._released)
        self.journal.on_durable = self._applier.durable
        self.journal.on_failure = self._journal_failed
        await self.journal.start()
        start = ev.Start(
            self.clock.monotonic(),
            len(self.core.registry.runs),
            len(self.recovery.entries),
            tuple(self.recovery.moved_aside),
        )
        await self.call(start)
        return self.recovery

    def begin_stop(self, reason: str = "daemon shutting down") -> None:
        """Journal the stop and ask every stream to end (trainers reconnect later). Once."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.journal is not None and self.failure is None:
            self.handle(ev.Stop(reason, self.clock.monotonic()))
            self.committer.commit_now()

    async def close(self, reason: str = "daemon shutting down") -> None:
        """``begin_stop``, then flush and close the journal."""
        self.begin_stop(reason)
        if self.journal is not None:
            await self.journal.close()

    @property
    def committer(self) -> GroupCommitter:
        """The journal (after start)."""
        assert self.journal is not None, "Governor.start() was not called"
        return self.journal

    @property
    def applier(self) -> Applier:
        """The applier of the core's effects to the journal and the streams (after start)."""
        assert self._applier is not None, "Governor.start() was not called"
        return self._applier

    # ----------------------------------------------------------------- streams

    def open_stream(self, peer: str) -> StreamHandle:
        """A new stream with its own id (the core knows streams by id only)."""
        self._next_stream += 1
        stream = StreamHandle(self._next_stream, peer)
        self.streams[stream.id] = stream
        return stream

    def close_stream(self, stream: StreamHandle) -> None:
        """The stream ended (either side): the core forgets the attachment."""
        stream.close()
        if self.streams.pop(stream.id, None) is not None and self.failure is None:
            self.handle(ev.Detach(stream.id, self.clock.monotonic()))

    # ----------------------------------------------------------------- applying effects

    def handle(self, event: ev.Event) -> int:
        """Run one event through the core and apply its effects; returns the entry seq its messages wait for.

        Raises GovernorError for a refused event (nothing changed) and UnavailableError once the journal failed.
        """
        if self.failure is not None:
            raise UnavailableError(f"journal write failed: {self.failure}; the daemon is stopping")
        stream = getattr(event, "stream", None)
        if stream is not None and stream not in self.streams and not isinstance(event, ev.Detach):
            return self.committer.journal.last_seq  # a closed stream's late message: moot
        self.committer.rotate_if_due()  # a checkpoint is taken between events, never inside one
        effects, after = self.applier.apply(event, self._appended)  # an entry the journal refuses undoes the event
        if isinstance(event, ev.Validation) and any(a.kind == EntryKind.DECISION for a in effects.entries):
            self.metrics.decision_latency.observe(max(0.0, self.clock.monotonic() - event.now))
        elif isinstance(event, ev.Tick):
            self.decisions.flush(event.now)  # a suppressed-lines summary is due even when nothing is logged
        return after

    async def call(self, event: ev.Event) -> Any:
        """``handle`` for a controller or start-up: returns the reply once its entries are durable."""
        if self.failure is not None:
            raise UnavailableError(f"journal write failed: {self.failure}; the daemon is stopping")
        self.committer.rotate_if_due()
        effects, after = self.applier.apply(event, self._appended)
        try:
            await self.committer.wait_durable(after)
        except RuntimeError as exc:
            raise UnavailableError(str(exc)) from None
        return effects.reply

    async def settled(self) -> None:
        """Return once everything appended so far is durable (and its messages released)."""
        try:
            await self.committer.wait_durable(self.committer.journal.last_seq)
        except RuntimeError as exc:
            raise UnavailableError(str(exc)) from None

    def _appended(self, appends: Sequence[Append], seqs: Sequence[int]) -> None:
        """An event's entries are appended: metrics, and their log lines held until they are durable."""
        notable = []
        for append, seq in zip(appends, seqs, strict=True):
            _count(self.metrics, append)
            if is_notable(append.kind, append.payload):
                notable.append((seq, append.run, append.kind, append.payload))
        if notable:  # held before the applier's commit_now, which releases what became durable
            self.decisions.hold(notable)

    def _released(self, durable_seq: int, sends: list[Send]) -> None:
        """Entries up to ``durable_seq`` are durable: their log lines, and the messages that waited for them."""
        self.decisions.release(durable_seq, self.clock.monotonic())
        for send in sends:
            stream = self.streams.get(send.stream)
            if stream is None:
                continue
            stream.deliver(send.message)
            if isinstance(send.message, EndStream):
                self.streams.pop(send.stream, None)

    def _journal_failed(self, exc: BaseException) -> None:
        self.failure = exc
        log.error(
            "journal write failed: no more acknowledgements; ending every stream and stopping",
            error=str(exc),
            data_dir=str(self.options.data_dir),
        )
        self.decisions.journal_failed(str(exc), str(self.options.data_dir))
        for stream in list(self.streams.values()):
            stream.fail(UnavailableError(f"journal write failed: {exc}"))
        self.streams.clear()
        self.fatal.set()

    # ----------------------------------------------------------------- reads for controllers

    def run(self, run_id: str) -> Run:
        """The run, or NotFoundError (InvalidInputError for a malformed id)."""
        check_run_id("run_id", run_id)
        if self.failure is not None:
            raise UnavailableError(f"journal write failed: {self.failure}; the daemon is stopping")
        return self.core.run(run_id)

    def runs(self) -> list[Run]:
        """Every run in memory."""
        if self.failure is not None:
            raise UnavailableError(f"journal write failed: {self.failure}; the daemon is stopping")
        return list(self.core.registry.runs.values())

    async def watch(self, cursor: int, run_ids: Iterable[str], kinds: Iterable[str]) -> AsyncIterator[Committed]:
        """Committed journal entries after ``cursor``, filtered, then live ones until shutdown."""
        runs, wanted = set(run_ids), set(kinds)
        for run_id in runs:
            check_run_id("run_ids", run_id)
        async for entry in self.committer.follow(cursor, self.stopping):
            if (not runs or entry.run in runs) and (not wanted or entry.kind in wanted):
                yield entry

    def auth_failure(self, method: str, peer: str, why: str, code: Any) -> None:
        """Count a refused call (UNAUTHENTICATED or PERMISSION_DENIED); journal it at most once per
        client host and code per window (the metric keeps the exact total), so refused calls cannot
        fill the disk."""
        name = str(getattr(code, "name", code))
        self.metrics.auth_failures.labels(code=name).inc()
        if self.journal is None or self.stopping.is_set() or self.failure is not None:
            return
        window = self.refusals.admit(peer, name, self.now())
        if window is not None:
            refused = AuthFailure(**window, method=method, peer=peer, reason=why).to_payload()
            self.committer.append("", EntryKind.AUTH_FAILURE, refused)
            log.warning("call refused", **refused)

    def now(self) -> float:
        """Monotonic seconds (the core's only notion of time)."""
        return self.clock.monotonic()


REFUSAL_WINDOW_S = 60.0
MAX_REFUSAL_KEYS = 1024


class RefusalWindow:
    """Which refused calls to journal: the first per (client host, code) in each window, carrying how many
    of that key's refusals the previous window did not journal. Beyond MAX_REFUSAL_KEYS hosts at once, all
    hosts share one key."""

    def __init__(self, window_s: float = REFUSAL_WINDOW_S) -> None:
        self.window_s = window_s
        self._open: dict[tuple[str, str], list[float]] = {}  # key -> [window start, refusals not journaled]

    def admit(self, peer: str, code: str, now: float) -> dict[str, Any] | None:
        """The ``AuthFailure`` entry's window fields if this refusal is journaled, else None (it is counted)."""
        host = peer.rsplit(":", 1)[0] if peer.count(":") else peer
        key = (host, code)
        if key not in self._open and len(self._open) >= MAX_REFUSAL_KEYS:
            self._open = {k: v for k, v in self._open.items() if now - v[0] < self.window_s}
            if len(self._open) >= MAX_REFUSAL_KEYS:
                key = ("*", code)
        window = self._open.get(key)
        if window is not None and now - window[0] < self.window_s:
            window[1] += 1
            return None
        not_journaled = int(window[1]) if window is not None else 0
        self._open[key] = [now, 0]
        return {"code": code, "window_s": self.window_s, "not_journaled_before": not_journaled}


def _count(metrics: Metrics, append: Append) -> None:
    """Metrics follow from the entries: one rule for what each kind counts."""
    kind, payload, run = append.kind, append.payload, append.run
    if kind == EntryKind.VITALS:
        metrics.records.labels(kind="train").inc(payload["num_records"])
        metrics.count_run("records", run, payload["num_records"], kind="train")
        if payload.get("num_shed"):
            metrics.shed.inc(payload["num_shed"])
        if payload["num_gaps"]:
            metrics.gaps.inc(payload["num_gaps"])
        decision = payload.get("decision")
        if decision is not None and decision["verdict"] == "panic":
            metrics.panics.labels(rule=decision["rule"]).inc()
            metrics.count_run("panics", run, rule=decision["rule"])
    elif kind in (EntryKind.REPORT, EntryKind.LATE, EntryKind.DUPLICATE) or (
        kind == EntryKind.DECISION and "record" in payload
    ):
        metrics.records.labels(kind="validation").inc()
        metrics.count_run("records", run, kind="validation")
        if kind == EntryKind.LATE:
            metrics.late.inc()
    if kind == EntryKind.DECISION:
        decision = payload["decision"]
        metrics.verdicts.labels(kind=decision["verdict"]).inc()
        metrics.count_run("verdicts", run, kind=decision["verdict"])
        if decision["verdict"] == "panic":
            metrics.panics.labels(rule=decision["rule"]).inc()
            metrics.count_run("panics", run, rule=decision["rule"])
    elif kind == EntryKind.STALE:
        metrics.stale.inc()
    elif kind == EntryKind.COMMAND:
        metrics.commands.labels(type=payload["command"]["kind"], outcome="sent").inc()
        metrics.count_run("commands", run, type=payload["command"]["kind"], outcome="sent")
    elif kind in (EntryKind.COMMAND_RESULT, EntryKind.COMMAND_TIMEOUT):
        outcome = "timeout" if kind == EntryKind.COMMAND_TIMEOUT else "succeeded" if payload["succeeded"] else "failed"
        metrics.commands.labels(type="any", outcome=outcome).inc()
        metrics.count_run("commands", run, type="any", outcome=outcome)
    elif kind in (EntryKind.RUN_EVICTED, EntryKind.RUN_EXPIRED, EntryKind.RUN_FORGOTTEN):
        metrics.forget_run(run)
