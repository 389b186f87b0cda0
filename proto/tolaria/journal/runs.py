"""Entries of the daemon and of a run's life: start and stop, checkpoints, refused calls; a run created, attached
and detached, asked for by a controller, and leaving memory (evicted, forgotten, expired)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tolaria.journal.base import Record, optional
from tolaria.journal.kinds import EntryKind


def forget_effects() -> dict[str, Any]:
    """The effects of an entry after which the daemon no longer holds the run."""
    return {"forget": True}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint(Record):
    """Every run's journaled state; the first entry of every segment (start-up reads from the last one)."""

    KIND = EntryKind.CHECKPOINT
    runs: dict[str, Any]
    """Run id -> the run's journaled state (meta, policy, ranks, pending steps, ``last_cursor``)."""
    lives: int
    """Runs created so far, across every run id (the next run's ``life`` is one more)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonStart(Record):
    """The daemon started (a daemon-wide entry, run "")."""

    KIND = EntryKind.DAEMON_START
    runs_restored: int
    """Runs restored from the journal."""
    entries_applied: int
    """Entries applied after the last checkpoint."""
    moved_aside: list[str]
    """Files of a torn or unfinished tail moved aside at start-up."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonStop(Record):
    """Orderly shutdown (a daemon-wide entry)."""

    KIND = EntryKind.DAEMON_STOP
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuthFailure(Record):
    """A refused call (UNAUTHENTICATED, PERMISSION_DENIED), journaled at most once per client host and code per
    window (the metric keeps the exact count)."""

    KIND = EntryKind.AUTH_FAILURE
    code: str
    """The status code's name."""
    window_s: float
    """The window during which further refusals of this host and code are only counted."""
    not_journaled_before: int
    """Refusals of this host and code counted but not journaled in the window before this one."""
    method: str
    """The gRPC method refused."""
    peer: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunCreated(Record):
    """The first Hello of a run (or of its next life, after it was forgotten or expired)."""

    KIND = EntryKind.RUN_CREATED
    task: str
    world_size: int
    timeline: int
    """The timeline the run starts on: the Hello's (the highest the trainer knows; 0 for a fresh process)."""
    overrides: dict[str, Any]
    """The Hello's policy overrides (a later Hello must repeat them)."""
    ignored_policy_fields: list[str]
    """Overrides of fields the operator locked (not applied)."""
    effective_policy: dict[str, Any]
    """The policy the run is judged by: the daemon's defaults with the overrides merged in."""
    trainer_version: str
    effects: dict[str, Any]
    """``meta``, ``policy`` and ``ranks``: the new run's state."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attach(Record):
    """A Hello accepted: its stream is bound to the rank's next generation."""

    KIND = EntryKind.ATTACH
    rank: int
    incarnation_id: str
    """A digest of the trainer process's secret incarnation id."""
    new_incarnation: bool
    """True when a new trainer process (not a reconnecting one) attached."""
    generation: int
    """The (run, rank)'s attachment count: every Command carries it, and a trainer drops one of another."""
    last_durable_seq: int
    """The Welcome's: the trainer resends everything after it."""
    peer: str
    caller: str
    """The authenticated identity that attached."""
    run_timeline: list[int] | None = optional()
    """[from, to] when the Hello, ahead of a run that has issued no command in its life, moved the run there."""
    superseded_steps: list[list[int]] | None = optional()
    """[timeline, step] of the pending steps that move discarded (with ``run_timeline``)."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Detach(Record):
    """A stream ended (the rank's attachment of ``generation``)."""

    KIND = EntryKind.DETACH
    rank: int
    generation: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunEvicted(Record):
    """A FINISHED run left the daemon's memory (``retain_finished_runs``); it stays in the journal."""

    KIND = EntryKind.RUN_EVICTED
    effects: dict[str, Any] = dataclasses.field(default_factory=forget_effects)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunForgotten(Record):
    """A controller's ForgetRun: the run left memory (it stays in the journal)."""

    KIND = EntryKind.RUN_FORGOTTEN
    reason: str
    caller: str
    state: str
    """The run's state when it was forgotten."""
    effects: dict[str, Any] = dataclasses.field(default_factory=forget_effects)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunExpired(Record):
    """No trainer attached for ``idle_run_expiry_s``: the run left memory (it stays in the journal)."""

    KIND = EntryKind.RUN_EXPIRED
    idle_s: float
    """How long no trainer was attached, in seconds (rounded to ms)."""
    state: str
    effects: dict[str, Any] = dataclasses.field(default_factory=forget_effects)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControllerRequest(Record):
    """A controller's RequestRollback, Halt or Resume, with the command it made (a ``command`` entry follows)."""

    KIND = EntryKind.CONTROLLER_REQUEST
    action: str
    """"rollback", "halt" or "resume"."""
    reason: str
    caller: str
    """The controller's authenticated identity."""
    command: dict[str, Any]
    """The command made (as the ``command`` entry carries it)."""
    effects: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyChange(Record):
    """A controller's UpdatePolicy: the fields changed, their values before, the effective policy after."""

    KIND = EntryKind.POLICY_CHANGE
    caller: str
    changes: dict[str, Any]
    before: dict[str, Any]
    """The changed fields' values before the change."""
    effective_policy: dict[str, Any]
    effects: dict[str, Any]
