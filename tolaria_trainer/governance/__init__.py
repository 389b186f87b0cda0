"""What a governed loop asks of the governor, in plain Python types, and the ungoverned null object.

``GovernedTraining`` (``governed.py``) talks to the governor only through the ``Governance`` protocol
(``port.py``): queue vitals, validation reports, snapshot reports, command results and the finish; read
verdicts, commands and the run's timeline. The types it speaks are in ``types.py``, a refusal in
``errors.py``. ``client/connection.py`` implements the port over the Attach stream
(``client/messages.py`` is the only place protobufs are built); ``Ungoverned`` (``null.py``) implements it
as nothing at all, so the loop never asks whether a governor exists; tests drive a loop with a scripted
fake. Nothing here imports ``client/``.
"""

from __future__ import annotations

from tolaria.vocabulary import CommandType, VerdictKind
from tolaria_trainer.governance.errors import GovernorClientError, GovernorRefused
from tolaria_trainer.governance.null import Ungoverned
from tolaria_trainer.governance.port import Governance
from tolaria_trainer.governance.types import (
    AdoptionReport,
    Command,
    CommandReport,
    Coverage,
    FinishReport,
    FinishStatus,
    SeedReport,
    SnapshotReport,
    ValidationReport,
    Verdict,
    VitalsColumns,
    VitalsSource,
    finite_or_none,
)

__all__ = [
    "AdoptionReport",
    "Command",
    "CommandReport",
    "CommandType",
    "Coverage",
    "FinishReport",
    "FinishStatus",
    "Governance",
    "GovernorClientError",
    "GovernorRefused",
    "SeedReport",
    "SnapshotReport",
    "Ungoverned",
    "ValidationReport",
    "Verdict",
    "VerdictKind",
    "VitalsColumns",
    "VitalsSource",
    "finite_or_none",
]
