"""Every kind of journal entry, in one place: the journal, WatchEvents filters and the CLI use these (the shape
of each kind's payload: ``tolaria.journal``).

An entry that changes a run's state carries ``effects`` (the daemon applies them at start-up:
``governor_daemon/core/registry.py``); the others are facts for people and controllers.
"""

from __future__ import annotations

import enum


class EntryKind(enum.StrEnum):
    """The ``kind`` of a journal entry (and of a WatchEvents event)."""

    CHECKPOINT = "checkpoint"
    """Every run's journaled state, first entry of every segment."""
    DAEMON_START = "daemon_start"
    DAEMON_STOP = "daemon_stop"
    RUN_CREATED = "run_created"
    RUN_EVICTED = "run_evicted"
    """A finished run left the daemon's memory (retain_finished_runs); it stays in the journal."""
    RUN_FORGOTTEN = "run_forgotten"
    """A controller's ForgetRun."""
    RUN_EXPIRED = "run_expired"
    """No trainer attached for idle_run_expiry_s: the run left memory (it stays in the journal)."""
    ATTACH = "attach"
    DETACH = "detach"
    VITALS = "vitals"
    """Accepted train-step records; a non-finite one carries its decision."""
    REPORT = "report"
    """One rank's validation record of a multi-rank step, waiting for the others."""
    LATE = "late"
    DUPLICATE = "duplicate"
    STALE = "stale"
    """Records of a timeline the run has left: journaled, acknowledged, never judged."""
    SUPERSEDED = "superseded"
    """A pending multi-rank step of a timeline the run left before it was complete: never judged."""
    DECISION = "decision"
    COMMAND = "command"
    """Every command the daemon issues, whatever caused it (decision, vitals, controller, timeout)."""
    COMMAND_RESULT = "command_result"
    COMMAND_TIMEOUT = "command_timeout"
    SNAPSHOT = "snapshot"
    SNAPSHOT_ADOPTED = "snapshot_adopted"
    """A restarted trainer adopted its rank's snapshot from shared memory: the run goes on on a new timeline."""
    FINISH = "finish"
    RANK_DEADLINE = "rank_deadline"
    STALL = "stall"
    STALL_CLEARED = "stall_cleared"
    CONTROLLER_REQUEST = "controller_request"
    POLICY_CHANGE = "policy_change"
    AUTH_FAILURE = "auth_failure"


ENTRY_KINDS = frozenset(str(k) for k in EntryKind)
