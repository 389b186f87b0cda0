"""The journal's entries as typed events (``WatchEvents``): decisions, commands, their results, finishes;
any other kind as an ``OtherEvent`` with its payload."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tolaria import journal
from tolaria.controller.errors import ProtocolError
from tolaria.governor.v1 import control_service_pb2
from tolaria.journal import EntryKind
from tolaria.vocabulary import Action, CommandType, RunState, VerdictKind


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
    def _list(cls, notices: Sequence[journal.Notice] | None) -> tuple[Notice, ...]:
        return tuple(
            cls(
                kind=str(n.kind),
                reason=str(n.reason),
                command=_command_or_none(n.command),
                charged=_optional_float(n.charged),
            )
            for n in notices or ()
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

    @property
    def record(self) -> journal.Record:
        """The payload as its kind's typed record (``tolaria.journal``: every field described there)."""
        return journal.record_of(self.kind, self.payload)


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
    """The event of an entry's payload, read through its record (``tolaria.journal``)."""
    if kind == EntryKind.DECISION:
        return _decision(base, journal.Decision.from_payload(p).decision)
    if kind == EntryKind.VITALS:
        decision = journal.Vitals.from_payload(p).decision  # only a non-finite record's batch carries one
        return OtherEvent(**base) if decision is None else _decision(base, decision)
    if kind == EntryKind.COMMAND:
        issued = journal.CommandIssued.from_payload(p)
        return CommandIssued(**base, cause=str(issued.cause), command=Command._from_journal(issued.command))
    if kind == EntryKind.COMMAND_RESULT:
        return _command_result(base, journal.CommandResult.from_payload(p))
    if kind == EntryKind.FINISH:
        return _finish(base, journal.Finish.from_payload(p))
    return OtherEvent(**base)


def _command_result(base: dict[str, Any], r: journal.CommandResult) -> CommandResult:
    return CommandResult(
        **base,
        rank=int(r.rank),
        incarnation_id=str(r.incarnation_id),
        command_id=int(r.command_id),
        command_kind=str(r.command_kind or ""),
        succeeded=bool(r.succeeded),
        new_timeline=int(r.new_timeline),
        restored_step=int(r.restored_step),
        duration_ms=float(r.duration_ms),
        error=str(r.error),
        num_culled_seeds=int(r.num_culled_seeds),
        lr_after_restore=_optional_float(r.lr_after_restore),
        notices=Notice._list(r.notices),
    )


def _finish(base: dict[str, Any], f: journal.Finish) -> RunFinished:
    return RunFinished(
        **base,
        rank=int(f.rank),
        status=str(f.status).removeprefix("FINISH_STATUS_"),
        epochs_completed=int(f.epochs_completed),
        num_rollbacks=int(f.num_rollbacks),
        message=str(f.message),
        duration_s=float(f.duration_s),
        final_validation_loss=_optional_float(f.final_validation_loss),
        final_validation_accuracy=_optional_float(f.final_validation_accuracy),
        notices=Notice._list(f.notices),
    )


def event_from_proto(response: control_service_pb2.WatchEventsResponse, address: str) -> Event:
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
