"""The pure policy core: configuration, detector profiles, the per-run engine, aggregation, stalls.

Nothing here imports grpc or does I/O; times are passed in by the caller.
"""

from governor_daemon.policy.aggregation import AddOutcome, StepAggregator, StepGroup
from governor_daemon.policy.commands import Notice, OpenCommand
from governor_daemon.policy.config import (
    FIELD_NAMES,
    PROFILES,
    PolicyConfig,
    parse_assignments,
    parse_value,
)
from governor_daemon.policy.decisions import (
    Action,
    Command,
    CommandKind,
    Decision,
    Rule,
    RunState,
    Verdict,
)
from governor_daemon.policy.detectors import DetectorState, Judgement, seed_profile
from governor_daemon.policy.engine import RunPolicy
from governor_daemon.policy.stall import StallTracker

__all__ = [
    "FIELD_NAMES",
    "PROFILES",
    "Action",
    "AddOutcome",
    "Command",
    "CommandKind",
    "Decision",
    "DetectorState",
    "Judgement",
    "Notice",
    "OpenCommand",
    "PolicyConfig",
    "Rule",
    "RunPolicy",
    "RunState",
    "StallTracker",
    "StepAggregator",
    "StepGroup",
    "Verdict",
    "parse_assignments",
    "parse_value",
    "seed_profile",
]
