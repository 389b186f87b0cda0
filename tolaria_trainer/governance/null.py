"""``Ungoverned``: the null ``Governance``, so a loop never asks whether a governor exists."""

from __future__ import annotations

from tolaria_trainer.governance.errors import GovernorRefused
from tolaria_trainer.governance.types import (
    AdoptionReport,
    Command,
    CommandReport,
    Coverage,
    FinishReport,
    SnapshotReport,
    ValidationReport,
    Verdict,
    VitalsSource,
)


class Ungoverned:
    """The null ``Governance``: training without a governor. Nothing is sent, no verdict or command ever
    comes, and a refusal never happens."""

    governed = False
    connected = False
    refusal: GovernorRefused | None = None
    run_timeline = 0
    num_unjudged_records = 0
    num_dropped_records = 0
    num_shed_records = 0
    acked_seq = 0
    train_verification_steps: int | None = None
    last_snapshot: tuple[int, int, str] | None = None
    commands_waiting = False
    num_history_losses = 0

    def __init__(self) -> None:
        self._seq = 0

    def start(self, wait_s: float) -> bool:
        """Nothing to connect to."""
        return False

    def unreachable_for_s(self) -> float:
        """Never reachable, never waited for."""
        return 0.0

    def coverage(self) -> Coverage:
        """No governor: nothing to claim."""
        return Coverage(governor="", judged_any=False, never_judged=0, seconds_without=0.0, streams_lost=0)

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Dropped: nobody judges them."""
        return 0

    def send_validation(self, report: ValidationReport) -> int:
        """A seq no verdict will ever name."""
        self._seq += 1
        return self._seq

    def verdict(self, seq: int, wait_s: float) -> Verdict | None:
        """Never."""
        return None

    def forget_verdict(self, seq: int) -> None:
        """Nothing kept."""

    def take_commands(self) -> list[Command]:
        """None ever."""
        return []

    def send_snapshot(self, report: SnapshotReport) -> None:
        """Nobody to tell."""

    def send_command_result(self, report: CommandReport) -> None:
        """No command is ever executed."""

    def send_adopted(self, report: AdoptionReport) -> None:
        """No snapshot is ever named, so none is adopted."""

    def close(self, finish: FinishReport | None, flush_timeout_s: float) -> bool:
        """Nothing pending."""
        return True

    def pending(self) -> int:
        """Nothing pending."""
        return 0
