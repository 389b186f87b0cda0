"""The journal's entries as typed records: the documented contract of every journal entry's payload, and of a
WatchEvents event's (``payload_json`` is the entry's payload).

One frozen dataclass per entry kind (``RECORDS``); ``record_of(kind, payload)`` reads any entry, and a record's
``to_payload()`` is the payload the daemon writes, key for key, so the journal's bytes do not depend on this
package (``tolaria.journal.base`` says how fields map to keys). Importable without the daemon and without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tolaria.journal.base import JsonFloat, Part, Record
from tolaria.journal.commands import (
    CommandIssued,
    CommandResult,
    CommandTimeout,
    Finish,
    Notice,
    Snapshot,
    SnapshotAdopted,
    SnapshotRef,
)
from tolaria.journal.kinds import ENTRY_KINDS, EntryKind
from tolaria.journal.records import (
    Decision,
    Duplicate,
    Late,
    RankDeadline,
    Report,
    Stale,
    Stall,
    StallCleared,
    Superseded,
    TrainSummary,
    ValidationDetails,
    ValidationReport,
    Vitals,
)
from tolaria.journal.runs import (
    Attach,
    AuthFailure,
    Checkpoint,
    ControllerRequest,
    DaemonStart,
    DaemonStop,
    Detach,
    PolicyChange,
    RunCreated,
    RunEvicted,
    RunExpired,
    RunForgotten,
)

RECORDS: Mapping[EntryKind, type[Record]] = {
    cls.KIND: cls
    for cls in (
        Checkpoint,
        DaemonStart,
        DaemonStop,
        RunCreated,
        RunEvicted,
        RunForgotten,
        RunExpired,
        Attach,
        Detach,
        Vitals,
        Report,
        Late,
        Duplicate,
        Stale,
        Superseded,
        Decision,
        CommandIssued,
        CommandResult,
        CommandTimeout,
        Snapshot,
        SnapshotAdopted,
        Finish,
        RankDeadline,
        Stall,
        StallCleared,
        ControllerRequest,
        PolicyChange,
        AuthFailure,
    )
}
"""Entry kind -> its record class: every kind has one."""


def record_of(kind: str, payload: Mapping[str, Any]) -> Record:
    """The record of an entry of ``kind`` (ValueError for a kind the journal does not have; KeyError for a
    payload without a key its kind always has)."""
    return RECORDS[EntryKind(kind)].from_payload(payload)


__all__ = [
    "ENTRY_KINDS",
    "RECORDS",
    "Attach",
    "AuthFailure",
    "Checkpoint",
    "CommandIssued",
    "CommandResult",
    "CommandTimeout",
    "ControllerRequest",
    "DaemonStart",
    "DaemonStop",
    "Decision",
    "Detach",
    "Duplicate",
    "EntryKind",
    "Finish",
    "JsonFloat",
    "Late",
    "Notice",
    "Part",
    "PolicyChange",
    "RankDeadline",
    "Record",
    "Report",
    "RunCreated",
    "RunEvicted",
    "RunExpired",
    "RunForgotten",
    "Snapshot",
    "SnapshotAdopted",
    "SnapshotRef",
    "Stale",
    "Stall",
    "StallCleared",
    "Superseded",
    "TrainSummary",
    "ValidationDetails",
    "ValidationReport",
    "Vitals",
    "record_of",
]
