"""A typed Python client of the governor's ControlService, for controllers: RL agents, schedulers, scripts.

It imports only grpcio, protobuf, the generated stubs and the standard library (no torch, none of the daemon's
dependencies), so a controller installs light. Calls return frozen dataclasses, not protobuf messages; a refused
or failed call raises a ``ControllerError`` subclass named after the cause; and ``events`` follows the journal
across daemon restarts, resuming after the last event it yielded (none twice, none lost)::

    with ControllerClient("127.0.0.1:50051", token=token) as client:
        with client.events(runs=["run-1"], kinds=["command"]) as stream:
            for event in stream:
                if isinstance(event, CommandIssued):
                    print(event.command.type, event.command.punishment_reward)

Unary calls are never retried (a ROLLBACK sent twice is two rollbacks); only the event stream reconnects.
"""

from __future__ import annotations

import enum
import json
import math
import random
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Self, TypeVar

import grpc

from tolaria.channel import TlsConfig, open_channel
from tolaria.governor.v1 import common_pb2, control_service_pb2, control_service_pb2_grpc

__all__ = [
    "Action",
    "Command",
    "CommandIssued",
    "CommandReceipt",
    "CommandResult",
    "CommandType",
    "ControllerClient",
    "ControllerError",
    "Decision",
    "Event",
    "EventStream",
    "NotFound",
    "Notice",
    "OpenCommand",
    "OtherEvent",
    "PermissionDenied",
    "Policy",
    "ProtocolError",
    "RankStatus",
    "Refused",
    "RunFinished",
    "RunState",
    "RunStatus",
    "TlsConfig",
    "Unauthenticated",
    "Unreachable",
    "VerdictKind",
]


# ----------------------------------------------------------------------------------------------- enums


class RunState(enum.StrEnum):
    """A run's lifecycle state (``RunState`` of the contract, without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    HEALTHY = "HEALTHY"
    ANOMALY = "ANOMALY"
    ROLLING_BACK = "ROLLING_BACK"
    HALTED = "HALTED"
    STALLED = "STALLED"
    FINISHED = "FINISHED"


class VerdictKind(enum.StrEnum):
    """The governor's judgement of a record (``VerdictKind`` of the contract, without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    HEALTHY = "HEALTHY"
    ANOMALY = "ANOMALY"
    PANIC = "PANIC"


class CommandType(enum.StrEnum):
    """What a command orders the trainer (``CommandType`` of the contract, without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    ROLLBACK = "ROLLBACK"
    HALT = "HALT"
    RESUME = "RESUME"


class Action(enum.StrEnum):
    """What a decision's rules ask for (carried out only when the decision has a ``command``)."""

    NONE = "NONE"
    ROLLBACK = "ROLLBACK"
    HALT = "HALT"


# The contract's enum value names are these prefixes plus the member's value.
_PROTO_PREFIX: dict[type[enum.StrEnum], str] = {
    RunState: "RUN_STATE_",
    VerdictKind: "VERDICT_KIND_",
    CommandType: "COMMAND_TYPE_",
}


E = TypeVar("E", bound=enum.StrEnum)


def _from_proto_enum(kind: type[E], wrapper: Any, number: int) -> E:
    """A contract enum number as ``kind``; UNSPECIFIED for a number this client does not know (a newer daemon)."""
    try:
        return kind(wrapper.Name(number).removeprefix(_PROTO_PREFIX[kind]))
    except ValueError:
        return kind("UNSPECIFIED")


# ----------------------------------------------------------------------------------------------- errors


class ControllerError(Exception):
    """A call failed. ``code`` is the gRPC status (None when the daemon's answer itself was unusable),
    ``details`` the daemon's message, ``method`` the ControlService method."""

    def __init__(self, code: grpc.StatusCode | None, details: str, method: str, address: str) -> None:
        self.code, self.details, self.method, self.address = code, details, method, address
        super().__init__(self._describe())

    def _describe(self) -> str:
        status = self.code.name if self.code is not None else "error"
        return f"{self.method} at {self.address}: {status}: {self.details}"


class NotFound(ControllerError):
    """NOT_FOUND: no such run (never created, or forgotten, evicted or expired)."""


class Refused(ControllerError):
    """The daemon refused the request itself: invalid input (INVALID_ARGUMENT), the run's state does not allow it
    (FAILED_PRECONDITION, e.g. resuming a run that is not HALTED), or a limit (RESOURCE_EXHAUSTED)."""


class Unauthenticated(ControllerError):
    """UNAUTHENTICATED: no token, or one the daemon does not know."""


class PermissionDenied(ControllerError):
    """PERMISSION_DENIED: the token's role may not make this call (commands need ``controller``)."""


class Unreachable(ControllerError):
    """UNAVAILABLE or DEADLINE_EXCEEDED: no daemon answered at the address within the deadline."""

    def _describe(self) -> str:
        status = self.code.name if self.code is not None else "error"
        return f"governor at {self.address} unreachable ({self.method}, {status}): {self.details}"


class ProtocolError(ControllerError):
    """A WatchEvents event this client cannot read (a payload without a field its kind always carries)."""


_ERRORS: dict[grpc.StatusCode, type[ControllerError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: Refused,
    grpc.StatusCode.FAILED_PRECONDITION: Refused,
    grpc.StatusCode.ALREADY_EXISTS: Refused,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Refused,
    grpc.StatusCode.OUT_OF_RANGE: Refused,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unreachable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unreachable,
}


def _error(exc: grpc.RpcError, method: str, address: str) -> ControllerError:
    code = exc.code()
    return _ERRORS.get(code, ControllerError)(code, exc.details() or "", method, address)


# ----------------------------------------------------------------------------------------------- run state


class _ProtoJson:
    """``to_dict`` for the dataclasses that mirror a contract message field by field."""

    def to_dict(self) -> dict[str, Any]:
        """The message in protobuf's JSON mapping with the contract's field names: enums by their full names,
        fields at their default left out (``optional`` ones whenever set), non-finite floats as "NaN",
        "Infinity", "-Infinity"; but 64-bit integers as JSON numbers, not strings (what ``governor ... --json``
        prints)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            optional = f.default is None
            if not optional and (not value or (isinstance(value, enum.StrEnum) and value.value == "UNSPECIFIED")):
                continue
            out[f.name] = _json_value(value)
        return out


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.StrEnum):
        return _PROTO_PREFIX[type(value)] + value.value
    if isinstance(value, _ProtoJson):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


@dataclass(frozen=True, kw_only=True)
class RankStatus(_ProtoJson):
    """One rank of a run."""

    rank: int
    attached: bool
    """An Attach stream of this rank is open."""
    stalled: bool
    latest_step: int
    incarnation_id: str
    generation: int
    last_durable_seq: int
    num_records: int
    num_record_gaps: int
    """Records missing between accepted seqs (dropped by the trainer or lost)."""
    seconds_since_progress_s: float
    num_shed_records: int = 0
    """Train-step records acknowledged unjudged because the daemon was behind."""


@dataclass(frozen=True, kw_only=True)
class OpenCommand(_ProtoJson):
    """The command awaiting its result."""

    command_id: int
    type: CommandType
    reason: str
    age_s: float
    """Seconds since it was issued."""


@dataclass(frozen=True, kw_only=True)
class RunStatus(_ProtoJson):
    """Everything the daemon tells a controller about one run (``RunStatus`` of the contract).

    Fields the contract marks ``optional`` are None when unset (e.g. ``history_mean`` before any accepted loss).
    """

    run_id: str
    state: RunState
    timeline: int
    world_size: int
    task: str
    consecutive_anomalies: int
    history_size: int
    """Accepted losses in the history window."""
    history_mean: float | None = None
    history_std: float | None = None
    """Population standard deviation of the history."""
    random_guess_loss: float | None = None
    num_rollbacks: int
    num_halts: int
    total_punishment_reward: float
    """Sum of the punishment rewards of all the run's commands so far."""
    latest_validation_step: int
    last_verdict: VerdictKind
    last_reason: str
    open_command: OpenCommand | None = None
    ranks: tuple[RankStatus, ...]
    profile: str
    last_cursor: int
    """Cursor of the run's latest journal entry: ``events(cursor=last_cursor, runs=[run_id])`` sees only what
    comes next."""
    lowest_accepted_loss: float | None = None
    last_punishment_reward: float
    """Punishment of the latest command (what an RL controller polling the state reads)."""


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _rank_status(r: control_service_pb2.RankStatus) -> RankStatus:
    return RankStatus(
        rank=r.rank,
        attached=r.attached,
        stalled=r.stalled,
        latest_step=r.latest_step,
        incarnation_id=r.incarnation_id,
        generation=r.generation,
        last_durable_seq=r.last_durable_seq,
        num_records=r.num_records,
        num_record_gaps=r.num_record_gaps,
        seconds_since_progress_s=r.seconds_since_progress_s,
        num_shed_records=r.num_shed_records,
    )


def _run_status(s: control_service_pb2.RunStatus) -> RunStatus:
    open_command = None
    if s.HasField("open_command"):
        oc = s.open_command
        open_command = OpenCommand(
            command_id=oc.command_id,
            type=_from_proto_enum(CommandType, common_pb2.CommandType, oc.type),
            reason=oc.reason,
            age_s=oc.age_s,
        )
    return RunStatus(
        run_id=s.run_id,
        state=_from_proto_enum(RunState, common_pb2.RunState, s.state),
        timeline=s.timeline,
        world_size=s.world_size,
        task=s.task,
        consecutive_anomalies=s.consecutive_anomalies,
        history_size=s.history_size,
        history_mean=_optional(s, "history_mean"),
        history_std=_optional(s, "history_std"),
        random_guess_loss=_optional(s, "random_guess_loss"),
        num_rollbacks=s.num_rollbacks,
        num_halts=s.num_halts,
        total_punishment_reward=s.total_punishment_reward,
        latest_validation_step=s.latest_validation_step,
        last_verdict=_from_proto_enum(VerdictKind, common_pb2.VerdictKind, s.last_verdict),
        last_reason=s.last_reason,
        open_command=open_command,
        ranks=tuple(_rank_status(r) for r in s.ranks),
        profile=s.profile,
        last_cursor=s.last_cursor,
        lowest_accepted_loss=_optional(s, "lowest_accepted_loss"),
        last_punishment_reward=s.last_punishment_reward,
    )


@dataclass(frozen=True, kw_only=True)
class Policy(_ProtoJson):
    """Policy knobs (``Policy`` of the contract; its comments give each default). None: not set. ``get_policy``
    and ``update_policy`` return the effective policy, every field set."""

    profile: str | None = None
    history_window: int | None = None
    min_history: int | None = None
    sensitivity: float | None = None
    multiplier: float | None = None
    absolute_threshold: float | None = None
    min_panics_before_rollback: int | None = None
    random_guess_loss: float | None = None
    lobotomy_mean_ratio: float | None = None
    lobotomy_tolerance_ratio: float | None = None
    death_penalty: float | None = None
    """A ROLLBACK or HALT answering a fault or a controller has punishment_reward -death_penalty."""
    max_rollbacks: int | None = None
    rollback_window: int | None = None
    command_timeout_s: float | None = None
    recovery_skip_batches: int | None = None
    recovery_lr_scale: float | None = None
    shadow_mode: bool | None = None
    stall_timeout_s: float | None = None
    rank_deadline_s: float | None = None
    step_warmup_steps: int | None = None
    step_ema_steps: int | None = None
    step_loss_ratio: float | None = None
    step_loss_sigma: float | None = None
    step_loss_patience: int | None = None
    step_grad_ratio: float | None = None
    step_collapse_patience: int | None = None
    step_lr_ratio: float | None = None
    step_zero_patience: int | None = None
    step_rise_ratio: float | None = None
    step_rise_patience: int | None = None
    recurrence_steps: int | None = None
    escalation: bool | None = None
    escalation_skip_margin: int | None = None
    escalation_lr_scale: float | None = None
    end_stalled_ranks: bool | None = None


POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Policy))


def _policy(p: common_pb2.Policy) -> Policy:
    return Policy(**{name: _optional(p, name) for name in POLICY_FIELDS})


@dataclass(frozen=True)
class CommandReceipt:
    """The daemon's answer to rollback, halt and resume: the command it issued and the run's state after."""

    command_id: int
    run_state: RunState


# ----------------------------------------------------------------------------------------------- events


def _optional_float(value: Any) -> float | None:
    """A journaled float or None. (The journal writes non-finite floats as "nan", "inf", "-inf", which
    ``float`` reads as well as numbers.)"""
    return None if value is None else float(value)


@dataclass(frozen=True, kw_only=True)
class Command:
    """A command as journaled: an order for every rank of a run."""

    command_id: int
    type: CommandType
    reason: str
    punishment_reward: float
    """-death_penalty for a ROLLBACK or HALT answering a fault or a controller; 0 for RESUME and for a HALT the
    daemon issues for its own mechanics (a command timeout, a failed command)."""
    recovery_skip_batches: int
    recovery_lr_scale: float
    timeline: int
    """The timeline the command was made on (a ROLLBACK or RESUME moves the run to the next one)."""
    step: int
    """The step of the last-known-good snapshot to restore."""

    @classmethod
    def _from_journal(cls, data: Mapping[str, Any]) -> Command:
        return cls(
            command_id=int(data["command_id"]),
            type=CommandType(str(data["kind"]).upper()),
            reason=str(data["reason"]),
            punishment_reward=float(data["punishment_reward"]),
            recovery_skip_batches=int(data["recovery_skip_batches"]),
            recovery_lr_scale=float(data["recovery_lr_scale"]),
            timeline=int(data["timeline"]),
            step=int(data["step"]),
        )


def _command_or_none(data: Any) -> Command | None:
    return None if data is None else Command._from_journal(data)


@dataclass(frozen=True, kw_only=True)
class Notice:
    """What a command result or a finish did to the open command: ``kind`` "punishment_charged" (a trainer
    executed the command: ``charged`` is its punishment reward, charged once), "command_progress" (some ranks
    still to report), "command_completed", "command_failed", "command_abandoned" (every rank finished first:
    never executed, never charged) or "unknown_command"; ``command`` is the follow-up the daemon issued (the
    HALT after a failure), if any."""

    kind: str
    reason: str
    command: Command | None
    charged: float | None = None

    @classmethod
    def _list(cls, items: Any) -> tuple[Notice, ...]:
        return tuple(
            cls(
                kind=str(n["kind"]),
                reason=str(n["reason"]),
                command=_command_or_none(n.get("command")),
                charged=_optional_float(n.get("charged")),
            )
            for n in items or ()
        )


@dataclass(frozen=True, kw_only=True)
class Event:
    """One journal entry as WatchEvents sends it. ``cursor`` orders entries (``events(cursor=...)`` resumes after
    it), ``ts`` is UTC RFC 3339, ``run_id`` is "" for daemon-wide entries, ``kind`` is the entry kind
    (docs/protocol.md, "Journal entry kinds"), ``hash`` its chain hash, and ``payload`` the whole payload as
    journaled (what the typed fields of a subclass are read from; nothing is left out)."""

    cursor: int
    ts: str
    run_id: str
    kind: str
    hash: str
    payload: Mapping[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class Decision(Event):
    """A judgement: of a validation step (a ``decision`` entry), or of a non-finite train-step record (a ``vitals``
    entry that carries one; ``source`` "train"). ``command`` is set only when a command was actually sent (not
    suppressed, not in shadow mode); a ``CommandIssued`` event follows it."""

    source: str
    """"validation" or "train"."""
    verdict: VerdictKind
    rule: str
    """The rule behind the verdict, as journaled: "non_finite", "lobotomy", "divergence", "warmup", "normal", ..."""
    action: Action
    reason: str
    timeline: int
    step: int
    epoch: int | None
    ranks: tuple[int, ...]
    losses: tuple[float, ...]
    punishment_reward: float | None
    command: Command | None
    consecutive_anomalies: int
    run_state: RunState
    """The run's state after the decision."""
    snapshot_allowed: bool
    suppressed: str | None
    """Why the action was not carried out, if it was not."""
    shadow: bool
    missing_ranks: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class CommandIssued(Event):
    """A ``command`` entry: every command the daemon issues, whatever caused it. ``command.punishment_reward``
    is what executing it will charge; the run is charged when a trainer executes it (``CommandResult.charged``)."""

    cause: str
    """"decision", "train_step", "controller", "command_failed" or "command_timeout"."""
    command: Command


@dataclass(frozen=True, kw_only=True)
class CommandResult(Event):
    """A ``command_result`` entry: one rank's report of how it executed a command."""

    rank: int
    incarnation_id: str
    command_id: int
    command_kind: str
    """"rollback", "halt" or "resume" ("" in journals written before it was recorded). A HALT restores
    nothing: its ``restored_step`` and ``duration_ms`` say nothing."""
    succeeded: bool
    new_timeline: int
    restored_step: int
    duration_ms: float
    error: str
    num_culled_seeds: int
    lr_after_restore: float | None
    """The learning rate the rank continues with after a restore, when it reported one."""
    notices: tuple[Notice, ...]

    @property
    def charged(self) -> float | None:
        """The punishment this result charged the run (the command's first result: a trainer executed it),
        None when it charged nothing. Summing them since the run's latest ``run_created`` gives the run's
        total punishment (``panic_state(run).total_punishment_reward``)."""
        charges = [n.charged for n in self.notices if n.charged is not None]
        return sum(charges) if charges else None


@dataclass(frozen=True, kw_only=True)
class RunFinished(Event):
    """A ``finish`` entry: one rank ended its run. The run is FINISHED once every rank has (one entry for a
    single-rank run); ``panic_state`` tells."""

    rank: int
    status: str
    """"COMPLETED", "FAILED" or "HALTED"."""
    epochs_completed: int
    num_rollbacks: int
    message: str
    duration_s: float
    final_validation_loss: float | None
    final_validation_accuracy: float | None
    notices: tuple[Notice, ...]
    """A command that can never be executed because every rank finished is closed here ("command_abandoned")."""


@dataclass(frozen=True, kw_only=True)
class OtherEvent(Event):
    """An entry of any other kind (``payload`` has it all)."""


def _decision(base: dict[str, Any], d: Mapping[str, Any]) -> Decision:
    epoch = d.get("epoch")
    reward = d.get("punishment_reward")
    suppressed = d.get("suppressed")
    return Decision(
        **base,
        source=str(d["kind"]),
        verdict=VerdictKind(str(d["verdict"]).upper()),
        rule=str(d["rule"]),
        action=Action(str(d["action"]).upper()),
        reason=str(d["reason"]),
        timeline=int(d["timeline"]),
        step=int(d["step"]),
        epoch=None if epoch is None else int(epoch),
        ranks=tuple(int(r) for r in d["ranks"]),
        losses=tuple(float(x) for x in d["losses"]),
        punishment_reward=_optional_float(reward),
        command=_command_or_none(d.get("command")),
        consecutive_anomalies=int(d["consecutive_anomalies"]),
        run_state=RunState(str(d["run_state"]).upper()),
        snapshot_allowed=bool(d["snapshot_allowed"]),
        suppressed=None if suppressed is None else str(suppressed),
        shadow=bool(d.get("shadow", False)),
        missing_ranks=tuple(int(r) for r in d.get("missing_ranks", ())),
    )


def _typed_event(base: dict[str, Any], kind: str, p: Mapping[str, Any]) -> Event:
    if kind == "decision" or (kind == "vitals" and isinstance(p.get("decision"), Mapping)):
        return _decision(base, p["decision"])
    if kind == "command":
        return CommandIssued(**base, cause=str(p["cause"]), command=Command._from_journal(p["command"]))
    if kind == "command_result":
        return CommandResult(
            **base,
            rank=int(p["rank"]),
            incarnation_id=str(p["incarnation_id"]),
            command_id=int(p["command_id"]),
            command_kind=str(p.get("command_kind", "")),
            succeeded=bool(p["succeeded"]),
            new_timeline=int(p["new_timeline"]),
            restored_step=int(p["restored_step"]),
            duration_ms=float(p["duration_ms"]),
            error=str(p["error"]),
            num_culled_seeds=int(p["num_culled_seeds"]),
            lr_after_restore=_optional_float(p.get("lr_after_restore")),
            notices=Notice._list(p.get("notices")),
        )
    if kind == "finish":
        return RunFinished(
            **base,
            rank=int(p["rank"]),
            status=str(p["status"]).removeprefix("FINISH_STATUS_"),
            epochs_completed=int(p["epochs_completed"]),
            num_rollbacks=int(p["num_rollbacks"]),
            message=str(p["message"]),
            duration_s=float(p["duration_s"]),
            final_validation_loss=_optional_float(p.get("final_validation_loss")),
            final_validation_accuracy=_optional_float(p.get("final_validation_accuracy")),
            notices=Notice._list(p.get("notices")),
        )
    return OtherEvent(**base)


def _event(response: control_service_pb2.WatchEventsResponse, address: str) -> Event:
    try:
        payload = json.loads(response.payload_json)
        if not isinstance(payload, dict):
            raise TypeError("the payload is not a JSON object")
        base = {
            "cursor": response.cursor,
            "ts": response.ts,
            "run_id": response.run_id,
            "kind": response.kind,
            "hash": response.hash,
            "payload": payload,
        }
        return _typed_event(base, response.kind, payload)
    except (ValueError, TypeError, KeyError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise ProtocolError(
            None, f"cannot read event {response.cursor} ({response.kind!r}): {why}", "WatchEvents", address
        ) from exc


# ----------------------------------------------------------------------------------------------- the client


# The channel's own reconnect backoff is kept short (gRPC's default grows to two minutes): after a daemon
# restart the event stream's retries must find the channel trying again.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


class ControllerClient:
    """A connection to one governor daemon. A context manager: leaving it closes the channel and every event
    stream it opened. Thread-safe, as gRPC channels are.

    ``token`` is sent as ``authorization: Bearer TOKEN`` (reads need the ``viewer`` or ``controller`` role,
    commands and policy changes ``controller``); ``timeout_s`` is the deadline of each unary call.
    """

    def __init__(
        self, address: str, token: str | None = None, tls: TlsConfig | None = None, timeout_s: float = 10.0
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = open_channel(address, tls, _CHANNEL_OPTIONS)
        self._stub = control_service_pb2_grpc.ControlServiceStub(self._channel)
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every event stream of this client (their iterators stop), then close the channel."""
        for stream in list(self._streams):
            stream.close()
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc, method, self.address) from None

    # ------------------------------------------------------------------------------------------- reads

    def runs(self, states: Iterable[RunState | str] = ()) -> list[RunStatus]:
        """Every run the daemon knows (active and retained finished ones), or those in ``states`` (names of
        ``RunState`` in any case, e.g. "halted")."""
        numbers = [common_pb2.RunState.Value("RUN_STATE_" + RunState(str(s).upper()).value) for s in states]
        response = self._call("ListRuns", control_service_pb2.ListRunsRequest(states=numbers))
        return [_run_status(r) for r in response.runs]

    def panic_state(self, run_id: str) -> RunStatus:
        """The state of one run (NotFound for an unknown run)."""
        return _run_status(self._call("GetPanicState", control_service_pb2.GetPanicStateRequest(run_id=run_id)).run)

    def get_policy(self, run_id: str) -> Policy:
        """The run's effective policy, every field set."""
        return _policy(self._call("GetPolicy", control_service_pb2.GetPolicyRequest(run_id=run_id)).policy)

    def events(
        self,
        cursor: int = 0,
        runs: Sequence[str] = (),
        kinds: Sequence[str] = (),
        *,
        reconnect_for_s: float = 60.0,
        deadline_s: float | None = None,
    ) -> EventStream:
        """Journal entries with a cursor above ``cursor`` (0: the whole journal), then live ones as they are
        written, as typed events; only those of ``runs`` and of ``kinds`` (entry kinds, e.g. "command") when
        given. See ``EventStream`` for reconnection, ``reconnect_for_s`` and ``deadline_s``.

        The protocol has no end-of-catch-up marker, so the stream always follows. To read only the history, stop
        at a cursor known beforehand (e.g. ``panic_state(run).last_cursor`` for one run's entries), or give a
        ``deadline_s``.
        """
        stream = EventStream(self, cursor, tuple(runs), tuple(kinds), reconnect_for_s, deadline_s)
        self._streams.add(stream)
        return stream

    # ------------------------------------------------------------------------------------------- commands

    def rollback(self, run_id: str, reason: str) -> CommandReceipt:
        """Order a ROLLBACK of the run now (Refused while another command is open or the run is FINISHED)."""
        return self._command("RequestRollback", control_service_pb2.RequestRollbackRequest, run_id, reason)

    def halt(self, run_id: str, reason: str) -> CommandReceipt:
        """Stop the run at its next agreement point; it waits for ``resume``."""
        return self._command("Halt", control_service_pb2.HaltRequest, run_id, reason)

    def resume(self, run_id: str, reason: str) -> CommandReceipt:
        """Let a HALTED run continue from its last-known-good snapshot (Refused unless it is HALTED)."""
        return self._command("Resume", control_service_pb2.ResumeRequest, run_id, reason)

    def _command(self, method: str, request_type: Any, run_id: str, reason: str) -> CommandReceipt:
        response = self._call(method, request_type(run_id=run_id, reason=reason))
        return CommandReceipt(response.command_id, _from_proto_enum(RunState, common_pb2.RunState, response.run_state))

    def update_policy(self, run_id: str, **changes: Any) -> Policy:
        """Change the given ``Policy`` fields of the run, effective from its next record; returns the effective
        policy. TypeError for a name that is not a policy field; Refused for a value the daemon rejects."""
        unknown = sorted(set(changes) - set(POLICY_FIELDS))
        if unknown:
            raise TypeError(f"unknown policy fields {unknown}; policy fields: {', '.join(POLICY_FIELDS)}")
        message = common_pb2.Policy(**{k: v for k, v in changes.items() if v is not None})
        request = control_service_pb2.UpdatePolicyRequest(run_id=run_id, changes=message)
        return _policy(self._call("UpdatePolicy", request).policy)

    def forget(self, run_id: str, reason: str) -> int:
        """Remove a FINISHED run, or one with no trainer attached, from the daemon's memory (Refused otherwise);
        returns the cursor of the journal entry that forgot it (the journal keeps the run's history)."""
        return int(self._call("ForgetRun", control_service_pb2.ForgetRunRequest(run_id=run_id, reason=reason)).cursor)


# Reconnection backoff of an event stream: from the first delay, doubling up to the cap, each drawn uniformly
# from half to all of it (watchers of one daemon do not come back in step).
RECONNECT_FIRST_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 2.0


class EventStream(Iterator[Event]):
    """Typed events of one ``ControllerClient.events`` call; iterate it, and close it (or use it as a context
    manager) when done.

    When the stream is lost (UNAVAILABLE, or the daemon ending it as it shuts down) the iterator reconnects with
    a jittered, capped exponential backoff and resumes after ``cursor``, the cursor of the last event it yielded:
    across a daemon restart no event is yielded twice and none is lost. It gives up with ``Unreachable`` once it
    has tried for ``reconnect_for_s`` seconds without getting a stream (``math.inf``: keep trying until closed);
    with ``reconnect_for_s`` 0 it never reconnects: the iteration ends where the daemon ends the stream, and
    UNAVAILABLE raises ``Unreachable``. Any other failure raises its ``ControllerError`` at once, and an event
    this client cannot read ``ProtocolError``; either closes the stream (``cursor`` stays before that event).

    ``deadline_s`` (seconds from the ``events`` call) ends the iteration quietly when it passes, and then
    ``deadline_reached`` is True. ``close()``, from any thread, ends it at once.
    """

    def __init__(
        self,
        client: ControllerClient,
        cursor: int,
        runs: tuple[str, ...],
        kinds: tuple[str, ...],
        reconnect_for_s: float,
        deadline_s: float | None,
    ) -> None:
        self._client = client
        self._cursor = cursor
        self._runs, self._kinds = runs, kinds
        self._reconnect_for_s = reconnect_for_s
        self._deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call: grpc.CallIterator[control_service_pb2.WatchEventsResponse] | None = None
        self._responses: Iterator[control_service_pb2.WatchEventsResponse] | None = None
        self._lost_since: float | None = None
        self._retries = 0
        self.deadline_reached = False

    @property
    def cursor(self) -> int:
        """Cursor of the last event yielded (the one given to ``events`` before the first): ``events(cursor=...)``
        resumes after it."""
        return self._cursor

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop: a blocked ``next`` returns at once, and iteration ends. Safe from any thread, and idempotent."""
        with self._lock:
            self._closed.set()
            call, self._call = self._call, None
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel unannotated

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        try:
            event = self._next()
        except ControllerError:
            self.close()
            raise
        if event is None:
            self.close()
            raise StopIteration
        return event

    def _next(self) -> Event | None:
        """The next event; None when the iteration ends (closed, the deadline, a stream the daemon ended while
        reconnecting is off)."""
        while not self._closed.is_set():
            if self._past_deadline():
                self.deadline_reached = True
                return None
            responses = self._responses if self._responses is not None else self._open()
            if responses is None:
                return None
            try:
                response = next(responses)
            except StopIteration:  # the daemon ended the stream: it is shutting down
                self._drop_call()
                if self._reconnect_for_s <= 0:
                    return None
                self._lost()
                continue
            except grpc.RpcError as exc:
                self._drop_call()
                if self._closed.is_set():
                    return None
                code = exc.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and self._past_deadline():
                    self.deadline_reached = True
                    return None
                if code is grpc.StatusCode.UNAVAILABLE and self._reconnect_for_s > 0:
                    self._lost(exc)
                    continue
                raise _error(exc, "WatchEvents", self._client.address) from None
            event = _event(response, self._client.address)
            self._cursor = event.cursor
            self._lost_since, self._retries = None, 0
            return event
        return None

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _open(self) -> Iterator[control_service_pb2.WatchEventsResponse] | None:
        """Start a WatchEvents call after the cursor; None when closed meanwhile."""
        request = control_service_pb2.WatchEventsRequest(cursor=self._cursor, run_ids=self._runs, kinds=self._kinds)
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        with self._lock:
            if self._closed.is_set():
                return None
            call = self._client._stub.WatchEvents(request, metadata=self._client._metadata, timeout=timeout)
            self._call = call
        # The daemon answers a watch with its headers at once: a call still active after them has a stream (the
        # reconnection window starts again), even if no event comes for hours.
        call.initial_metadata()
        if call.is_active():
            self._lost_since = None
        self._responses = iter(call)
        return self._responses

    def _drop_call(self) -> None:
        with self._lock:
            self._call = None
        self._responses = None

    def _lost(self, exc: grpc.RpcError | None = None) -> None:
        """Wait before the next attempt; raise Unreachable once the reconnection window has passed."""
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
        if now - self._lost_since >= self._reconnect_for_s:
            details = f"no event stream for {now - self._lost_since:.1f} s (reconnect_for_s {self._reconnect_for_s:g})"
            if exc is not None:
                details += f"; last error: {exc.details() or exc.code().name}"
            raise Unreachable(grpc.StatusCode.UNAVAILABLE, details, "WatchEvents", self._client.address)
        delay = min(RECONNECT_MAX_DELAY_S, RECONNECT_FIRST_DELAY_S * 2 ** min(self._retries, 16))
        self._retries += 1
        delay *= random.uniform(0.5, 1.0)
        if self._deadline is not None:
            delay = min(delay, max(0.0, self._deadline - now))
        self._closed.wait(delay)
