"""A deterministic, seeded simulation of the real daemon core and the real trainer protocol.

One process, no threads, no sockets, no clock: a ``World`` holds a ``GovernorCore`` with an in-memory
journal that can crash (losing what was not durable) and be rebuilt from what was, 1 to 4 runs of 1 to
4 ranks each driven by a real ``TrainerProtocol``, a network of ordered streams whose messages are
delivered in any interleaving across streams, and a monotonic clock the schedule advances. Messages
cross the "wire" as the real protobufs through the real codec, so the decode and validation paths are
the production ones.

A schedule is a list of ``Action`` tuples drawn from a seed. Each action is interpreted against the
current world and is a no-op when it does not apply, so any sub-list of a schedule is a schedule too:
that is what shrinking relies on. ``World.check`` asserts the invariants of docs/protocol.md after every
action; ``World.settle`` heals everything and runs the trainers to the end, and ``World.check_final``
asserts the end-of-run invariants.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from governor_daemon.core import CoreOptions, GovernorCore, Registry
from governor_daemon.core import events as ev
from governor_daemon.core.apply import Applier
from governor_daemon.core.effects import Append, Send
from governor_daemon.errors import GovernorError
from governor_daemon.policy import CommandKind, PolicyConfig, RunState
from governor_daemon.policy.detectors import BLOW_UP_CEILING, blown_up
from governor_daemon.policy.steps import StepState
from governor_daemon.service import codec
from governor_daemon.service.status_codes import status_for
from tests.simulation.journal import SimEntry, SimJournal
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria.journal import EntryKind
from tolaria_trainer.client.protocol import ProtocolOptions, TrainerProtocol
from tolaria_trainer.governance import VitalsColumns

BATCH = 4
VALIDATE_EVERY = 12
AGREE_EVERY = 6
STEPS_PER_RUN = 72
COMMAND_TIMEOUT_S = 30.0
RANK_DEADLINE_S = 5.0
CONNECT_WAIT_S = 10.0
"""GovernedTraining's connect_wait_s: a new process waits this long for its Welcome before it trains without one."""
STALL_TIMEOUT_S = 60.0
"""Short enough that schedules stall ranks (an ``advance`` is 1 to 40 s), long enough that ``settle`` does not."""
EXTREMES = (1.7e308, -1.7e308, 5e-324, 1e15, 1.0000001e15, -0.0, 1e-300)
"""Finite losses at the edges of a float (one beyond the blow-up ceiling of 1e15 is a blow-up, a PANIC)."""
SKIP_MARGIN = 3
"""escalation_skip_margin: a recurring fault's data window is skipped through its alarm + this."""

Action = tuple[str, int, int]
"""(kind, target, parameter): the target picks a run, rank or stream modulo what exists."""

KINDS = (
    ("train", 30),
    ("pump", 30),
    ("to_daemon", 40),
    ("to_trainer", 40),
    ("commit", 14),
    ("tick", 8),
    ("advance", 4),
    ("connect", 8),
    ("drop", 2),
    ("crash_daemon", 1),
    ("restart_trainer", 1),
    ("kill_after_snapshot", 2),
    ("wall_jump", 1),
    ("malformed", 1),
    ("forget", 1),
    ("controller", 2),
    ("extreme", 1),
)


def draw_schedule(seed: int, length: int) -> list[Action]:
    """The schedule of ``seed``: ``length`` weighted random actions."""
    rng = random.Random(seed)
    names = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    return [(rng.choices(names, weights)[0], rng.randrange(1 << 16), rng.randrange(1 << 16)) for _ in range(length)]


class Violation(AssertionError):
    """An invariant failed."""


def require(condition: bool, message: str) -> None:
    """Raise Violation with ``message`` unless ``condition``."""
    if not condition:
        raise Violation(message)


@dataclass
class Conn:
    """One Attach stream: two ordered queues."""

    id: int
    rank: SimRank
    to_daemon: deque[trainer_service_pb2.AttachRequest] = field(default_factory=deque)
    to_trainer: deque[trainer_service_pb2.AttachResponse] = field(default_factory=deque)
    hello_done: bool = False
    open: bool = True


@dataclass
class SimRank:
    """One trainer rank: a real TrainerProtocol and the training state it governs."""

    run: SimRun
    rank: int
    incarnation: int
    proto: TrainerProtocol
    step: int = 0
    position: int = 0  # the data position: a trained step consumes one batch; a skip consumes more
    timeline: int = 0
    lkg_step: int = 0
    # (step, position, timeline, digest), oldest first; the initial snapshot is not in shared memory (no digest)
    published: list[tuple[int, int, int, str]] = field(default_factory=lambda: [(0, 0, 0, "")])
    left: tuple[int, int, int, str] | None = None  # what the previous process left in shared memory
    started: bool = False  # GovernedTraining.start: the adoption decision is made once, before the first step
    born_at: float = 0.0
    snapshot_seq: int = 0  # the seq of the last SnapshotTaken sent
    adopted_on: int | None = None  # the timeline this process adopted its predecessor's snapshot on
    halted: bool = False
    finished: bool = False
    malformed: bool = False
    buffer: list[tuple[int, float]] = field(default_factory=list)
    pins: list[int] = field(default_factory=list)
    pending: tuple[int, int, int, int] | None = None  # (seq, timeline, step, position) of the staged snapshot
    conn: Conn | None = None
    retry_at: float = 0.0
    max_acked: int = 0
    held: dict[int, trainer_service_pb2.Command] = field(default_factory=dict)
    halts_received: set[int] = field(default_factory=set)
    history_losses: int = 0  # HALT command ids delivered to this trainer


@dataclass
class SimRun:
    """Ranks that train in lockstep (as collectives make real ranks do)."""

    run_id: str
    world_size: int
    nan_steps: set[int]
    bad_positions: set[int] = field(default_factory=set)  # a bad batch: NaN whenever its position is trained
    extreme: float | None = None  # the next train loss rank 0 reports: an extreme finite value
    extreme_validation: float | None = None  # and the next validation loss
    ranks: list[SimRank] = field(default_factory=list)
    done_commands: int = 0
    faults_fired: int = 0
    incarnations: int = 0


class World:
    """The whole simulated system. ``apply`` one action, then ``check``."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed ^ 0x5EED)
        self.rng = rng
        self.now = 1000.0
        self.wall_offset = 0.0
        self.options = CoreOptions(
            # A short train-stream warm-up, so the step detectors' journaled state takes part in every run.
            defaults=PolicyConfig(
                command_timeout_s=COMMAND_TIMEOUT_S,
                rank_deadline_s=RANK_DEADLINE_S,
                step_warmup_steps=4,
                escalation_skip_margin=SKIP_MARGIN,
                # The stall watchdog in half the worlds (its own draw: the rest of a seed's world is as before).
                stall_timeout_s=STALL_TIMEOUT_S,
                end_stalled_ranks=random.Random(seed ^ 0xD06).random() < 0.5,
            )
        )
        # Half the worlds honour sync entries at once, as the daemon does; the other half leave their write in
        # flight until the schedule's next commit (its own draw: the rest of a seed's world is as before).
        self.journal = SimJournal(self._durable, honour_sync=random.Random(seed ^ 0x5C).random() < 0.5)
        self.core = GovernorCore(self.options)
        self.applier = Applier(self.core, self.journal, self._released)
        self.shadow = Registry()
        self.ladder: dict[str, dict[str, Any]] = {}
        self.halts_known_at_finish: dict[
            str, set[int]
        ] = {}  # incarnation digest -> HALTs it had received  # per run: the last fault-driven ROLLBACK, as the checker sees it
        self.conns: dict[int, Conn] = {}
        self.next_conn = 0
        self.durable_seq: dict[str, int] = {}  # incarnation -> highest seq journaled durably, in any life of its run
        self.journaled_seq: dict[str, int] = {}  # the same in the run's current life (its seqs come again in the next)
        self.started_at = self.now
        self.issued_at: dict[str, float] = {}  # run -> when its latest command was issued
        self.trace: list[str] = []
        self.adoptions = 0  # SnapshotAdopted reports the trainers sent
        # In a third of the worlds every run is killed once while settling, after each rank published a snapshot
        # in shared memory (its own draw): schedules are too short for many runs to publish before they end.
        self.kill_while_settling = random.Random(seed ^ 0xC4A5).random() < 0.3
        self.killed_while_settling: set[str] = set()
        # and in half of those, only while a command of the run is open (the restart meets it after adopting)
        self.kill_amid_command = random.Random(seed ^ 0xC0DE).random() < 0.5
        self.runs: list[SimRun] = []
        for i in range(rng.randint(1, 4)):
            world_size = rng.randint(1, 4) if i == 0 else rng.choice((1, 1, 2, 3))
            nan_steps = {rng.randrange(3, STEPS_PER_RUN)} if rng.random() < 0.7 else set()
            bad = {rng.randrange(3, STEPS_PER_RUN)} if rng.random() < 0.4 else set()
            run = SimRun(f"run-{i}", world_size, nan_steps, bad)
            self.runs.append(run)
            self._new_incarnations(run)
        self._daemon_start()

    # ----------------------------------------------------------------- the daemon side

    @property
    def entries(self) -> list[SimEntry]:
        """Every entry appended (those not durable are lost in a crash)."""
        return self.journal.entries

    @property
    def durable(self) -> int:
        """The last durable entry's seq."""
        return self.journal.durable

    def _daemon_start(self) -> None:
        self.started_at = self.now
        self._handle(ev.Start(self.now, len(self.core.registry.runs), self.durable))

    def _handle(self, event: ev.Event) -> None:
        """As the runtime does, through the same applier: the event and the append of its entries in one
        transaction (an entry the journal cannot encode undoes the event), then what follows the append."""
        self.applier.apply(event, self._appended)

    def _appended(self, appends: Sequence[Append], seqs: Sequence[int]) -> None:
        for append in appends:
            if append.kind == EntryKind.COMMAND_TIMEOUT:
                started = max(self.issued_at.get(append.run, self.started_at), self.started_at)
                require(
                    self.now - started >= COMMAND_TIMEOUT_S,
                    f"command timeout after {self.now - started:.1f} s < {COMMAND_TIMEOUT_S} s on the monotonic clock",
                )
            if append.kind == EntryKind.COMMAND:
                self.issued_at[append.run] = self.now

    def commit(self) -> None:
        """Everything appended becomes durable; messages waiting for it are released."""
        self.journal.commit()

    def _durable(self, entries: list[SimEntry]) -> None:
        for entry in entries:
            self._on_durable(entry)
        self.applier.durable(self.durable)
        require(self.core.checkpoint() == self.shadow.checkpoint(), "daemon state differs from its journal's")

    def _on_durable(self, entry: SimEntry) -> None:
        payload = entry.payload
        inc, seq = payload.get("incarnation_id"), payload.get("seq")
        if entry.kind in (EntryKind.RUN_FORGOTTEN, EntryKind.RUN_EXPIRED, EntryKind.RUN_EVICTED):
            # the run's history is gone: what it acknowledged is no longer the daemon's to keep (an Ack of an
            # entry durable before this one may still be on its way: durable_seq keeps it; found at seed 1694)
            for rank in self._ranks():
                if rank.run.run_id == entry.run:
                    self.journaled_seq.pop(_digest(rank), None)
                    rank.max_acked = 0
        if entry.kind == EntryKind.COMMAND_RESULT:
            self._check_detector_resume(entry)
            self._note_restored(entry)
        if entry.kind == EntryKind.COMMAND:
            self._check_ladder(entry)
        if entry.kind == EntryKind.SNAPSHOT_ADOPTED:
            self._check_adoption(entry)
        if entry.kind in (EntryKind.RUN_CREATED, EntryKind.RUN_FORGOTTEN, EntryKind.RUN_EXPIRED, EntryKind.RUN_EVICTED):
            self.ladder.pop(entry.run, None)
        if isinstance(inc, str) and isinstance(seq, int) and entry.kind != EntryKind.ATTACH:
            first = payload.get("first_seq", seq)
            require(
                first > self.journaled_seq.get(inc, 0),
                f"seq {first}..{seq} of {inc} journaled twice (entry {entry.seq} {entry.kind})",
            )
            self.journaled_seq[inc] = seq
            self.durable_seq[inc] = max(self.durable_seq.get(inc, 0), seq)
        self.shadow.apply_entry(entry)  # type: ignore[arg-type]

    def _check_detector_resume(self, entry: SimEntry) -> None:
        """A rank that restored a snapshot resumes its train-stream detectors from the state pinned for that
        snapshot (journaled by its ``snapshot`` entry), or afresh without one."""
        payload = entry.payload
        run = self.shadow.runs.get(entry.run)
        policy_after = payload.get("effects", {}).get("policy")
        if run is None or not payload["succeeded"] or policy_after is None:
            return
        rank = payload["rank"]
        command = run.policy.ledger.command(payload["command_id"])
        after = policy_after.get("steps", {}).get(str(rank))
        if command is None or command.kind is CommandKind.HALT or after is None:
            return
        if after["timeline"] != payload["new_timeline"] or after["last_step"] != payload["restored_step"]:
            return  # not a restore onto the run's timeline (a late result)
        pins = [p for p in run.policy.detector_pins.pins.get(rank, []) if p[1] == payload["restored_step"]]
        expected = (
            pins[-1][2].resumed(payload["new_timeline"], payload["restored_step"])
            if pins
            else StepState(timeline=payload["new_timeline"])
        )
        require(
            StepState.from_dict(after) == expected,
            f"{entry.run} rank {rank} restored step {payload['restored_step']}: detectors resumed from "
            f"{after}, not from the pinned {expected}",
        )

    def _check_adoption(self, entry: SimEntry) -> None:
        """An adoption of the rank's last published snapshot, on the run's timeline or the one a peer's adoption
        left, puts the run on the next timeline and resumes the rank's detectors from the snapshot's pinned state
        (as a restore by a command does); any other changes nothing (docs/protocol.md)."""
        payload = entry.payload
        run = self.shadow.runs.get(entry.run)
        if run is None:
            return
        rank = payload["rank"]
        snapshot = payload["snapshot"]
        published = run.ranks[rank].last_snapshot if rank in run.ranks else None
        own = published == (snapshot["timeline"], snapshot["step"], snapshot["digest"])
        require(
            own == ("run_timeline" in payload),
            f"{entry.run} rank {rank}: the adoption of {snapshot} (last published {published}) "
            f"{'changed' if 'run_timeline' in payload else 'did not change'} the run",
        )
        policy_after = payload["effects"].get("policy")
        if not own or policy_after is None:
            return
        before = run.policy.ledger.open
        restoring = before is not None and before.command.kind is not CommandKind.HALT
        if restoring and before is not None and before.command.timeline < payload["timeline"]:
            after = policy_after["open"]  # its dead process had executed it: the adoption answers it
            require(
                after is None or rank in after["ranks_done"],
                f"{entry.run} rank {rank}'s adoption on {payload['timeline']} left command "
                f"{before.command.command_id} (made on {before.command.timeline}) waiting for it",
            )
        new_timeline = payload["new_timeline"]
        require(
            policy_after["timeline"]
            == (new_timeline if payload["timeline"] == run.policy.timeline else run.policy.timeline),
            f"{entry.run}: an adoption on timeline {payload['timeline']} moved the run from {run.policy.timeline} "
            f"to {policy_after['timeline']}",
        )
        if policy_after["timeline"] != new_timeline:
            return  # the run left that timeline since: the rank's records are stale until it resyncs
        pins = [p for p in run.policy.detector_pins.pins.get(rank, []) if p[1] == snapshot["step"]]
        expected = pins[-1][2].resumed(new_timeline, snapshot["step"]) if pins else StepState(timeline=new_timeline)
        after = policy_after.get("steps", {}).get(str(rank))
        require(
            after is not None and StepState.from_dict(after) == expected,
            f"{entry.run} rank {rank} adopted step {snapshot['step']}: detectors resumed from {after}, "
            f"not from the pinned {expected}",
        )

    def _check_ladder(self, entry: SimEntry) -> None:
        """The recovery ladder, checked against its rule as docs/protocol.md states it: a fault-driven
        ROLLBACK is on rung 0 unless it recurs (its fault step at most recurrence_steps past the previous
        fault-driven ROLLBACK's, after that one was executed, on a later timeline), then one rung up; rung 3
        is a HALT that names the fault deterministic."""
        command = entry.payload["command"]
        if command["kind"] == "resume":  # a Resume starts the ladder afresh (a late result of the
            self.ladder.pop(entry.run, None)  # rollback before it teaches the ladder nothing)
            return
        if entry.payload["cause"] not in ("decision", "train_step"):
            return
        previous = self.ladder.get(entry.run)
        fault = command["onset_step"] if command["onset_step"] is not None else command["step"]
        recurs = (
            previous is not None
            and previous["restored_step"] is not None
            and command["timeline"] > previous["timeline"]
            and fault <= previous["fault"] + self.options.defaults.recurrence_steps
        )
        want = previous["rung"] + 1 if recurs and previous is not None else 0
        if command["kind"] == "halt":
            deterministic = "deterministic fault" in command["reason"]
            require(deterministic == (want >= 3), f"{entry.run}: HALT {command['reason']!r} at rung {want}")
            return
        require(
            command["recovery_rung"] == want,
            f"{entry.run}: command {command['command_id']} on rung {command['recovery_rung']}, expected {want}",
        )
        require(
            (command["skip_through_step"] is not None) == (want > 0),
            f"{entry.run}: rung {want} with skip_through_step {command['skip_through_step']}",
        )
        self.ladder[entry.run] = {
            "id": command["command_id"],
            "rung": want,
            "fault": fault,
            "timeline": command["timeline"],
            "restored_step": None,
        }

    def _note_restored(self, entry: SimEntry) -> None:
        """The ladder learns what a fault-driven ROLLBACK restored from its first successful result."""
        previous = self.ladder.get(entry.run)
        payload = entry.payload
        first = previous is not None and previous["id"] == payload["command_id"] and previous["restored_step"] is None
        if first and payload["succeeded"]:
            assert previous is not None
            previous["restored_step"] = payload["restored_step"]

    def _released(self, durable_seq: int, sends: list[Send]) -> None:
        for send in sends:
            conn = self.conns.get(send.stream)
            if conn is not None and conn.open:
                conn.to_trainer.append(codec.encode_message(send.message))

    def crash_daemon(self) -> None:
        """SIGKILL: lose what is not durable, drop every stream, rebuild from the journal, start."""
        held = self.core.registry.runs  # a run a controller forgot is not the crash's to keep
        acked = {(r.run.run_id, r.rank): (_digest(r), r.max_acked) for r in self._ranks() if r.run.run_id in held}
        self.journal.crash()
        for conn in list(self.conns.values()):
            self._close(conn, "UNAVAILABLE", notify_daemon=False)
        self.core = GovernorCore(self.options)
        self.applier = Applier(self.core, self.journal, self._released)  # nothing held survives the process
        self.core.restore(None, self.entries)  # type: ignore[arg-type]
        for (run_id, rank_id), (inc, seq) in acked.items():
            run = self.core.registry.runs.get(run_id)
            kept = run.ranks[rank_id].seqs.get(inc, 0) if run is not None and rank_id in run.ranks else 0
            require(kept >= seq, f"{run_id} rank {rank_id}: acked seq {seq} lost in a crash (journal has {kept})")
        self._daemon_start()

    def _daemon_receive(self, conn: Conn, request: trainer_service_pb2.AttachRequest) -> None:
        limits = self.options.limits
        try:
            if not conn.hello_done:
                conn.hello_done = True
                event: ev.Event = codec.decode_hello(request.hello, conn.id, "sim", "sim", self.now, limits)
                sent: ev.Event = event
            else:
                event = sent = codec.decode_request(request, conn.id, self.now, limits)
                if isinstance(event, ev.Vitals) and _overloaded(conn.id, event.first_seq):
                    event = ev.Vitals.joined([event], shed=True)  # an ingest worker that fell behind sheds it
            before, appended = self.core.checkpoint(), len(self.entries)
            try:
                self._handle(event)
            except GovernorError:
                require(self.core.checkpoint() == before, f"a refused {type(event).__name__} changed the state")
                raise
            if isinstance(sent, ev.Vitals):
                _check_judged(sent, self.entries[appended:])
        except GovernorError as exc:
            self._close(conn, status_for(exc).name, notify_daemon=True, details=str(exc))

    # ----------------------------------------------------------------- the trainer side

    def _ranks(self) -> list[SimRank]:
        return [r for run in self.runs for r in run.ranks]

    def _new_incarnations(self, run: SimRun) -> None:
        run.incarnations += 1
        for old in run.ranks:
            if old.conn is not None:
                self._close(old.conn, "CANCELLED", notify_daemon=True)
        left = {old.rank: old.published[-1] for old in run.ranks if old.published[-1][3]}
        run.ranks = []
        for rank in range(run.world_size):
            hello = trainer_service_pb2.Hello(
                run_id=run.run_id,
                rank=rank,
                world_size=run.world_size,
                incarnation_id=f"{run.run_id}-{rank}-{run.incarnations}",
                task="sim",
                num_classes=10,
            )
            proto = TrainerProtocol(hello, ProtocolOptions(heartbeat_s=2.0, capacity_records=1 << 20), self.now)
            run.ranks.append(SimRank(run, rank, run.incarnations, proto, left=left.get(rank), born_at=self.now))
        run.done_commands = 0

    def _close(self, conn: Conn, code: str | None, notify_daemon: bool, details: str = "") -> None:
        if not conn.open:
            return
        conn.open = False
        self.conns.pop(conn.id, None)
        rank = conn.rank
        if rank.conn is conn:
            rank.conn = None
            outcome = rank.proto.connection_lost(self.now, code, details)
            rank.retry_at = self.now + rank.proto.reconnect_delay(self.rng.random())
            if code not in (None, "UNAVAILABLE", "CANCELLED") and not rank.malformed:
                raise Violation(f"{rank.proto.hello.incarnation_id} refused: {code} {details} ({outcome.kind})")
        if notify_daemon:
            self._handle(ev.Detach(conn.id, self.now))

    def connect(self, rank: SimRank) -> None:
        """Open a stream for ``rank`` if it has none and may retry now."""
        if rank.conn is not None or rank.finished or rank.proto.refused is not None or self.now < rank.retry_at:
            return
        self.next_conn += 1
        conn = Conn(self.next_conn, rank)
        self.conns[conn.id] = conn
        rank.conn = conn
        conn.to_daemon.append(rank.proto.connecting(self.now))

    def pump(self, rank: SimRank) -> None:
        """Move what the protocol wants to transmit onto the stream."""
        if rank.conn is None:
            return
        while (message := rank.proto.next_message(self.now)) is not None:
            rank.conn.to_daemon.append(message)

    def trainer_receive(self, conn: Conn) -> None:
        """Deliver the next daemon message of ``conn`` to its trainer."""
        response = conn.to_trainer.popleft()
        rank = conn.rank
        kind = response.WhichOneof("message")
        if kind == "ack":
            require(
                response.ack.up_to_seq <= self.durable_seq.get(_digest(rank), 0),
                f"ack {response.ack.up_to_seq} of {rank.proto.hello.incarnation_id} before it is durable",
            )
            rank.max_acked = max(rank.max_acked, response.ack.up_to_seq)
        if kind == "command" and response.command.type == common_pb2.COMMAND_TYPE_HALT:
            rank.halts_received.add(response.command.command_id)
        rank.proto.receive(response, self.now)
        if kind == "stream_end" and response.stream_end.end_process:
            self._watchdog_ended(rank)
            return
        if rank.proto.stream_ending:
            self._close(conn, None, notify_daemon=True)

    def _watchdog_ended(self, rank: SimRank) -> None:
        """The stall watchdog's StreamEnd: only for a rank whose STALL entry, durable, said end_process, and
        only while the policy asks for it. The process exits; its launcher restarts every rank of the run."""
        run_id = rank.run.run_id
        stalls = [
            e
            for e in self.entries[: self.durable]
            if e.run == run_id and e.kind == EntryKind.STALL and e.payload["rank"] == rank.rank
        ]
        require(
            bool(stalls) and stalls[-1].payload.get("end_process") is True,
            f"{rank.proto.hello.incarnation_id} was told to end its process without a durable STALL saying so",
        )
        require(self.options.defaults.end_stalled_ranks, "the watchdog ended a rank with end_stalled_ranks off")
        assert rank.conn is not None
        self._close(rank.conn, None, notify_daemon=True)  # the process is gone: the stream ends (moot for the core)
        self._new_incarnations(rank.run)

    def _flush(self, rank: SimRank, pin: bool = False) -> None:
        """Send the buffered records; ``pin``: a snapshot may be staged at the rank's step (validations and
        agreement points), so the governor keeps its detectors' state as of it."""
        if pin:
            rank.pins.append(rank.step)
        if rank.buffer:
            steps = [s for s, _ in rank.buffer]
            losses = [x for _, x in rank.buffer]
            columns = VitalsColumns(
                rank.timeline, steps, losses, [1.0] * len(steps), [0.1] * len(steps), tuple(rank.pins)
            )
            rank.proto.send_vitals(columns)
            rank.buffer = []
            rank.pins = []

    def train(self, run: SimRun) -> None:
        """Every rank of ``run`` takes one step (lockstep); validation and agreement points follow."""
        live = [r for r in run.ranks if not r.finished]
        if live and not live[0].started:
            if any(r.proto.welcome is None for r in live) and self.now - live[0].born_at < CONNECT_WAIT_S:
                return  # start() waits for the Welcome (connect_wait_s), then trains fail-open without one
            self._start(live)
        if not live or any(r.halted for r in live):
            if live:
                self.agreement_point(run)
            return
        for rank in live:
            rank.step += 1
            rank.position += 1
            loss = 1.0 / rank.step
            if rank.step in run.nan_steps and rank.rank == 0:
                run.nan_steps.discard(rank.step)  # a fault strikes once
                run.faults_fired += 1
                loss = float("nan")
            if rank.position in run.bad_positions and rank.rank == 0:
                run.faults_fired += 1  # a bad batch strikes whenever its position is trained
                loss = float("nan")
            if run.extreme is not None and rank.rank == 0:
                loss, run.extreme = run.extreme, None  # an extreme finite value: never an error
                run.faults_fired += blown_up(loss)
            rank.buffer.append((rank.step, loss))
            if len(rank.buffer) >= BATCH:
                self._flush(rank)
        step = live[0].step
        if step % VALIDATE_EVERY == 0:
            for rank in live:
                self._flush(rank, pin=True)
                loss = 2.0 / rank.step
                if run.extreme_validation is not None and rank.rank == 0:
                    loss, run.extreme_validation = run.extreme_validation, None
                    run.faults_fired += blown_up(loss)
                record = trainer_service_pb2.ValidationRecord(
                    timeline=rank.timeline, step=rank.step, epoch=rank.step // VALIDATE_EVERY, loss=loss
                )
                seq = rank.proto.send_validation(record)
                if rank.pending is not None:
                    rank.proto.forget_verdict(rank.pending[0])
                rank.pending = (seq, rank.timeline, rank.step, rank.position)
        if step % AGREE_EVERY == 0:
            self.agreement_point(run)
        if step >= STEPS_PER_RUN and not any(r.halted for r in live):
            self.agreement_point(run)
            if all(r.step >= STEPS_PER_RUN and not r.halted for r in live):
                for rank in live:
                    self._flush(rank)
                    rank.proto.send_finish(
                        trainer_service_pb2.Finish(status=common_pb2.FINISH_STATUS_COMPLETED, duration_s=1.0)
                    )
                    rank.finished = True
                    self.halts_known_at_finish[_digest(rank)] = set(rank.halts_received)

    def _start(self, ranks: list[SimRank]) -> None:
        """What ``GovernedTraining.start`` does once the ranks of a new incarnation are up: move to the run's
        timeline, then adopt what the previous processes left in shared memory when each rank's Welcome names
        exactly it and every rank holds one of the same step (all or none), and go on on the next timeline."""
        base = max(max(r.timeline, r.proto.run_timeline) for r in ranks)
        held: list[tuple[int, int, int, str] | None] = []
        for rank in ranks:
            rank.started, rank.timeline = True, base
            welcome, left, rank.left = rank.proto.welcome, rank.left, None
            named = welcome.last_snapshot if welcome is not None and welcome.HasField("last_snapshot") else None
            matches = (
                named is not None
                and left is not None
                and (left[2], left[0], left[3])
                == (
                    named.timeline,
                    named.step,
                    named.digest,
                )
            )
            held.append(left if matches else None)
        steps = {h[0] if h is not None else -1 for h in held}
        if len(steps) != 1 or -1 in steps:
            for rank in ranks:  # the initial snapshot, published in shared memory as the real trainer does
                digest = _snapshot_digest(rank, 0)
                rank.published = [(0, 0, rank.timeline, digest)]
                rank.snapshot_seq = rank.proto.send_snapshot(
                    trainer_service_pb2.SnapshotTaken(timeline=rank.timeline, step=0, location="shm", digest=digest)
                )
            return
        for rank, (step, position, timeline, digest) in zip(ranks, held, strict=True):  # type: ignore[misc]
            rank.proto.send_adopted(
                trainer_service_pb2.SnapshotAdopted(
                    timeline=base,
                    snapshot=trainer_service_pb2.PublishedSnapshot(timeline=timeline, step=step, digest=digest),
                    duration_ms=1.0,
                )
            )
            self.adoptions += 1
            rank.step, rank.position, rank.lkg_step, rank.timeline = step, position, step, base + 1
            rank.adopted_on = base
            again = _snapshot_digest(rank, step)
            rank.published = [(step, position, rank.timeline, again)]  # the adopted state, published again
            rank.snapshot_seq = rank.proto.send_snapshot(
                trainer_service_pb2.SnapshotTaken(timeline=rank.timeline, step=step, location="shm", digest=again)
            )

    def agreement_point(self, run: SimRun) -> None:
        """What the training loop does at an agreement point, with the collectives done directly."""
        live = [r for r in run.ranks if not r.finished]
        for rank in live:
            rank.timeline = max(rank.timeline, rank.proto.run_timeline)  # Welcome or Resync adoption
            if rank.pending is not None:
                verdict = rank.proto.verdict(rank.pending[0])
                if verdict is not None:
                    if verdict.snapshot_allowed and (verdict.timeline, verdict.step) == rank.pending[1:3]:
                        rank.lkg_step = rank.pending[2]
                        digest = _snapshot_digest(rank, rank.lkg_step)
                        rank.published = [
                            *rank.published[-2:],
                            (rank.pending[2], rank.pending[3], rank.timeline, digest),
                        ]
                        rank.snapshot_seq = rank.proto.send_snapshot(
                            trainer_service_pb2.SnapshotTaken(
                                timeline=rank.timeline, step=rank.lkg_step, location="shm", digest=digest
                            )
                        )
                    rank.pending = None
        for rank in live:
            if rank.proto.num_history_losses != rank.history_losses:  # the run was forgotten: void its orders
                rank.history_losses = rank.proto.num_history_losses
                rank.held = {}
                run.done_commands = 0
            rank.held.update(
                (c.command_id, c)
                for c in rank.proto.take_commands()
                # a ROLLBACK or RESUME made before the adoption's timeline is answered by it (Commands.adopted_on)
                if rank.adopted_on is None or c.type == common_pb2.COMMAND_TYPE_HALT or c.timeline >= rank.adopted_on
            )
        highest = max((max(r.held, default=0) for r in live), default=0)
        if highest <= run.done_commands:
            return
        command = next(r.held[highest] for r in live if highest in r.held)  # broadcast from a rank holding it
        run.done_commands = highest
        for rank in live:
            rank.held = {}
            self._flush(rank, pin=True)
            if command.type == common_pb2.COMMAND_TYPE_HALT:
                rank.halted = True
                rank.proto.send_command_result(command, True, rank.step, 0.0)
                continue
            require(  # a restore moves a rank to the command's timeline + 1: never back behind where it is
                command.timeline + 1 >= rank.timeline,
                f"{rank.proto.hello.incarnation_id} on timeline {rank.timeline} executes {command.command_id} made on "
                f"{command.timeline}: back to {command.timeline + 1}",
            )
            rank.halted = False
            rank.step, rank.position = _choose(rank.published, command)
            rank.published = [p for p in rank.published if p[0] <= rank.step]
            if command.HasField("skip_through_step"):  # the recurring fault's data window is not trained
                rank.position += max(0, command.skip_through_step - rank.step)
            rank.position += command.recovery_skip_batches
            rank.pending = None
            rank.pins = []
            rank.proto.send_command_result(command, True, rank.step, 0.1)
            rank.timeline = command.timeline + 1

    # ----------------------------------------------------------------- one action

    def apply(self, action: Action) -> None:
        """Interpret ``action`` against the current world (a no-op when it does not apply)."""
        kind, target, param = action
        ranks = self._ranks()
        conns = sorted(self.conns.values(), key=lambda c: c.id)
        if kind == "train":
            self.train(self.runs[target % len(self.runs)])
        elif kind == "pump" and ranks:
            self.pump(ranks[target % len(ranks)])
        elif kind == "to_daemon":
            ready = [c for c in conns if c.to_daemon]
            if ready:
                conn = ready[target % len(ready)]
                self._daemon_receive(conn, conn.to_daemon.popleft())
        elif kind == "to_trainer":
            ready = [c for c in conns if c.to_trainer]
            if ready:
                self.trainer_receive(ready[target % len(ready)])
        elif kind == "commit":
            self.commit()
        elif kind == "tick":
            self.now += (param % 100) / 100.0
            self._handle(ev.Tick(self.now))
        elif kind == "advance":
            self.now += 1 + param % 40
        elif kind == "connect" and ranks:
            self.connect(ranks[target % len(ranks)])
        elif kind == "drop" and conns:
            self._close(conns[target % len(conns)], "UNAVAILABLE", notify_daemon=True)
        elif kind == "crash_daemon":
            self.crash_daemon()
        elif kind == "restart_trainer":
            self._new_incarnations(self.runs[target % len(self.runs)])
        elif kind == "kill_after_snapshot":  # a crash that leaves snapshots in shared memory for the restart
            run = self.runs[target % len(self.runs)]
            if any(r.published[-1][3] and not r.finished for r in run.ranks):
                self._new_incarnations(run)
        elif kind == "wall_jump":
            self.wall_offset += (param % 7201) - 3600  # the core never sees wall time: nothing may change
        elif kind == "malformed" and conns:
            self._malformed(conns[target % len(conns)], param)
        elif kind == "forget":
            self._forget(self.runs[target % len(self.runs)])
        elif kind == "controller":
            self._controller(self.runs[target % len(self.runs)], param)
        elif kind == "extreme":
            run = self.runs[target % len(self.runs)]
            run.extreme = run.extreme_validation = EXTREMES[param % len(EXTREMES)]

    def _controller(self, run: SimRun, param: int) -> None:
        """A controller's RequestRollback, Halt, Resume or UpdatePolicy; a refused one changes nothing."""
        calls: list[ev.Event] = [
            ev.RequestRollback(run.run_id, "sim", "op", self.now),
            ev.Halt(run.run_id, "sim", "op", self.now),
            ev.Resume(run.run_id, "sim", "op", self.now),
            ev.UpdatePolicy(run.run_id, {"death_penalty": float(param % 7)}, "op", self.now),
            ev.UpdatePolicy(run.run_id, {"death_penalty": 1e308}, "op", self.now),  # refused: beyond its bound
        ]
        before = self.core.checkpoint()
        try:
            self._handle(calls[param % len(calls)])
        except GovernorError:
            require(self.core.checkpoint() == before, "a refused controller call changed the state")

    def _forget(self, run: SimRun) -> None:
        """A controller forgets a run; refused while a trainer is attached (then nothing may change)."""
        before = self.core.checkpoint()
        try:
            self._handle(ev.ForgetRun(run.run_id, "sim", "op", self.now))
        except GovernorError:
            require(self.core.checkpoint() == before, "a refused ForgetRun changed the state")

    def _malformed(self, conn: Conn, param: int) -> None:
        """One trainer sends a message that must be refused without changing anything."""
        if not conn.hello_done:
            return
        conn.rank.malformed = True
        bad = [
            trainer_service_pb2.AttachRequest(
                vitals_batch=trainer_service_pb2.VitalsBatch(first_seq=1, step=[1, 2], loss=[0.1])
            ),
            trainer_service_pb2.AttachRequest(
                command_result=trainer_service_pb2.CommandResult(
                    seq=10**9, command_id=1, outcome=common_pb2.COMMAND_OUTCOME_SUCCEEDED, new_timeline=2**63
                )
            ),
            trainer_service_pb2.AttachRequest(
                validation_record=trainer_service_pb2.ValidationRecord(
                    seq=10**9, step=1, loss=1.0, seeds=[trainer_service_pb2.SeedStatus(slot="a", alpha=float("nan"))]
                )
            ),
            trainer_service_pb2.AttachRequest(
                finish=trainer_service_pb2.Finish(
                    seq=10**9, status=common_pb2.FINISH_STATUS_COMPLETED, duration_s=float("inf")
                )
            ),
            trainer_service_pb2.AttachRequest(
                vitals_batch=trainer_service_pb2.VitalsBatch(first_seq=2**63, step=[1], loss=[0.1])
            ),
            trainer_service_pb2.AttachRequest(  # an adoption that names no snapshot
                snapshot_adopted=trainer_service_pb2.SnapshotAdopted(seq=10**9, timeline=0)
            ),
        ]
        conn.to_daemon.appendleft(bad[param % len(bad)])

    # ----------------------------------------------------------------- the end

    def settle(self) -> None:
        """Heal the network, stop injecting, and run every trainer to its end (or its HALT)."""
        for _ in range(400):
            progressed = False
            for rank in self._ranks():
                if rank.conn is None and not rank.finished and rank.proto.refused is None:
                    rank.retry_at = min(rank.retry_at, self.now)
                    self.connect(rank)
                self.pump(rank)
            for conn in sorted(self.conns.values(), key=lambda c: c.id):
                while conn.open and conn.to_daemon:
                    self._daemon_receive(conn, conn.to_daemon.popleft())
                    progressed = True
                    self._kill_between_results(conn.rank.run)
            self.commit()
            for conn in sorted(self.conns.values(), key=lambda c: c.id):
                while conn.open and conn.to_trainer:
                    self.trainer_receive(conn)
                    progressed = True
            for run in self.runs:
                if any(not r.finished and not r.halted for r in run.ranks):
                    self.train(run)
                    progressed = True
                    published = all(  # and the governor acknowledged it: its Welcome will name it
                        r.published[-1][3] and 0 < r.snapshot_seq <= r.max_acked and not r.finished for r in run.ranks
                    )
                    if self.kill_while_settling and published and run.run_id not in self.killed_while_settling:
                        state = self.core.registry.runs.get(run.run_id)
                        restoring = state is not None and state.policy.ledger.open is not None
                        if self.kill_amid_command and not restoring:
                            continue  # these worlds kill a run only while a ROLLBACK or RESUME of it is open
                        self.killed_while_settling.add(run.run_id)
                        self._new_incarnations(run)
                elif any(r.halted for r in run.ranks):
                    self.agreement_point(run)
            self.now += 0.5
            self._handle(ev.Tick(self.now))
            if not progressed and all(not c.to_daemon and not c.to_trainer for c in self.conns.values()):
                break

    def _kill_between_results(self, run: SimRun) -> None:
        """In the worlds that kill amid a command: kill a run whose open ROLLBACK or RESUME some ranks have
        answered and others not yet (the restart adopts what the dead processes restored; the command stays
        open for the rest)."""
        if not (self.kill_while_settling and self.kill_amid_command) or run.run_id in self.killed_while_settling:
            return
        state = self.core.registry.runs.get(run.run_id)
        open_cmd = state.policy.ledger.open if state is not None else None
        if open_cmd is None or open_cmd.command.kind is CommandKind.HALT or not open_cmd.ranks_done:
            return
        if all(r.published[-1][3] and not r.finished for r in run.ranks):
            self.killed_while_settling.add(run.run_id)
            self.commit()  # the results it has are durable: the restarted ranks' Welcomes say so
            self._new_incarnations(run)

    def check_final(self) -> None:
        """End-of-schedule invariants (after ``settle``)."""
        self.commit()
        for run in self.runs:
            state = self.core.registry.runs.get(run.run_id)
            if state is None:
                continue
            policy = state.policy
            own = [e for e in self.entries if e.run == run.run_id]
            since = max((i for i, e in enumerate(own) if e.kind == EntryKind.RUN_CREATED), default=0)
            results = [e for e in own[since:] if e.kind == EntryKind.COMMAND_RESULT]
            charges = [n for e in results for n in e.payload["notices"] if "charged" in n]
            require(
                abs(policy.ledger.total_punishment - sum(n["charged"] for n in charges)) < 1e-9,
                f"{run.run_id}: GetPanicState total {policy.ledger.total_punishment} != the journaled charges {charges}",
            )
            executed = {e.payload["command_id"] for e in results}  # a result of any outcome: it was executed
            charged_ids = [int(n["reason"].split()[1]) for n in charges]
            require(
                len(charged_ids) == len(set(charged_ids)) and set(charged_ids) <= executed,
                f"{run.run_id}: commands charged {charged_ids}, executed {sorted(executed)}: each executed one "
                "is charged once, and nothing else",
            )
            for rank_id, rank_state in state.ranks.items():
                journaled = sum(
                    e.payload.get("num_shed", 0)
                    for e in own[since:]
                    if e.kind == EntryKind.VITALS and e.payload["rank"] == rank_id
                )
                require(
                    rank_state.num_shed == journaled,
                    f"{run.run_id} rank {rank_id}: {rank_state.num_shed} shed in memory, {journaled} journaled",
                )
                ever = sum(  # a trainer's count may span a forgotten run's earlier life
                    e.payload.get("num_shed", 0)
                    for e in own
                    if e.kind == EntryKind.VITALS and e.payload["rank"] == rank_id
                )
                told = [r.proto.num_shed_records for r in run.ranks if r.rank == rank_id]
                require(
                    all(n <= ever for n in told),
                    f"{run.run_id} rank {rank_id}: the trainer was told {told} records shed, {ever} journaled",
                )
            rollbacks = sum(  # since the run's latest creation: forgetting a run forgets what it judged
                1
                for e in own[since:]
                if e.kind == EntryKind.COMMAND and e.payload["cause"] in ("decision", "train_step")
            )
            require(
                rollbacks <= run.faults_fired,
                f"{run.run_id}: {rollbacks} fault-driven commands for {run.faults_fired} faults",
            )
            lifetime = own[since:]
            halts = [
                i
                for i, e in enumerate(lifetime)
                if e.kind == EntryKind.COMMAND and e.payload["command"]["kind"] != "rollback"
            ]
            if halts and lifetime[halts[-1]].payload["command"]["kind"] == "halt":
                halt_id = lifetime[halts[-1]].payload["command"]["command_id"]
                completed = [  # by a trainer that had the HALT: one that finished before it arrived did not know
                    e
                    for e in lifetime[halts[-1] :]
                    if e.kind == EntryKind.FINISH
                    and e.payload["status"] != "FINISH_STATUS_HALTED"
                    and halt_id in self.halts_known_at_finish.get(e.payload["incarnation_id"], set())
                ]
                require(not completed, f"{run.run_id} was HALTED, yet a trainer that knew it trained on to completion")
            live = [r for r in run.ranks if not r.finished and not r.malformed]
            if policy.state is RunState.HALTED:
                require(all(r.halted for r in live), f"{run.run_id} is HALTED but a trainer does not know it")
            for rank in live:
                if not rank.halted and rank.conn is not None:
                    require(
                        rank.timeline == policy.timeline,
                        f"{rank.proto.hello.incarnation_id} trains on timeline {rank.timeline}, the run is on "
                        f"{policy.timeline}: its records go stale silently",
                    )


def _check_judged(event: ev.Vitals, entries: list[SimEntry]) -> None:
    """Nothing non-finite is acknowledged unjudged: a VITALS entry that accepts a batch's non-finite
    record carries a decision, whether the batch was judged or shed (docs/protocol.md, "Shedding")."""
    values = np.asarray(event.losses, dtype=np.float64)
    if len(event.grads):
        values = np.maximum(np.abs(values), np.abs(np.asarray(event.grads, dtype=np.float64)))
    bad = [event.first_seq + int(i) for i in np.flatnonzero(~(np.abs(values) <= BLOW_UP_CEILING))]
    for entry in entries:
        if entry.kind != EntryKind.VITALS or "first_seq" not in entry.payload:
            continue
        accepted = range(entry.payload["first_seq"], entry.payload["seq"] + 1)
        require(
            not any(seq in accepted for seq in bad) or "decision" in entry.payload,
            f"a non-finite record (seqs {bad}) was acknowledged unjudged (shed: {entry.payload.get('num_shed', 0) > 0})",
        )


def _choose(published: list[tuple[int, int, int, str]], command: trainer_service_pb2.Command) -> tuple[int, int]:
    """The (step, position) a trainer restores for ``command``: the newest published snapshot older than its
    onset and its restore_before_step (when set), else the oldest (the base)."""
    bound = min(
        command.onset_step if command.HasField("onset_step") else STEPS_PER_RUN * 10,
        command.restore_before_step if command.HasField("restore_before_step") else STEPS_PER_RUN * 10,
    )
    older = [p for p in published if p[0] < bound]
    chosen = older[-1] if older else published[0]
    return chosen[0], chosen[1]


def _snapshot_digest(rank: SimRank, step: int) -> str:
    """The digest of a snapshot as a rank's shared memory would hold it: one per (incarnation, timeline, step)."""
    return f"sha256:{rank.proto.hello.incarnation_id}/{rank.timeline}/{step}"


def _digest(rank: SimRank) -> str:
    """The incarnation as the daemon keeps it."""
    return codec.incarnation_digest(rank.proto.hello.incarnation_id)


__all__ = ["Action", "Violation", "World", "draw_schedule"]


def _overloaded(stream: int, first_seq: int) -> bool:
    """Whether the simulated daemon is behind when this batch arrives, so it is shed (docs/protocol.md,
    "Shedding"): about one batch in eight, decided by the batch alone so that shrinking keeps it."""
    return (first_seq * 2654435761 + stream) % 8 == 0
