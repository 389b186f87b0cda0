"""``Governance``: one rank's line to the governor, the only way a governed loop talks to it."""

from __future__ import annotations

from typing import Protocol

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


class Governance(Protocol):
    """One rank's line to the governor. Every ``send_*`` queues and returns at once; nothing here
    waits on the network except ``verdict`` (up to the bound given) and ``close``."""

    @property
    def governed(self) -> bool:
        """False for the null object: verdicts never come, so staged snapshots are never kept."""
        ...

    @property
    def connected(self) -> bool:
        """A stream is open and welcomed."""
        ...

    @property
    def refusal(self) -> GovernorRefused | None:
        """The permanent refusal, once the governor refused this trainer."""
        ...

    @property
    def run_timeline(self) -> int:
        """The highest timeline the governor named for the run (adopted at an agreement point)."""
        ...

    @property
    def num_unjudged_records(self) -> int:
        """Records the governor journaled as stale and never judged."""
        ...

    @property
    def num_dropped_records(self) -> int:
        """Train-step records dropped under back-pressure (reported to the governor)."""
        ...

    @property
    def num_shed_records(self) -> int:
        """Train-step records the governor acknowledged without judging them, because it was behind
        (docs/protocol.md, "Shedding")."""
        ...

    @property
    def acked_seq(self) -> int:
        """The highest seq the governor acknowledged: durable, and judged unless shed (counted in
        ``num_shed_records``). A command caused by a record is
        always delivered before that record's Ack (docs/protocol.md, "Train-stream verification")."""
        ...

    @property
    def train_verification_steps(self) -> int | None:
        """How many steps after step S the governor's train-stream detectors must have judged, without a
        command, to vouch for S (None: the run's profile does not judge the train stream)."""
        ...

    @property
    def last_snapshot(self) -> tuple[int, int, str] | None:
        """This rank's last published snapshot in shared memory (timeline, step, digest), as the governor
        journaled it before this process started; None without one."""
        ...

    @property
    def num_history_losses(self) -> int:
        """Times the governor turned out no longer to hold the run (forgotten, expired): its command ids
        start at 1 again, and the commands of the run's previous life are void."""
        ...

    @property
    def commands_waiting(self) -> bool:
        """A command arrived that ``take_commands`` has not taken yet (cheap: called every step)."""
        ...

    def start(self, wait_s: float) -> bool:
        """Start connecting; wait up to ``wait_s`` for the first Welcome. Returns whether connected."""
        ...

    def unreachable_for_s(self) -> float:
        """Seconds since the last welcomed stream was lost (0 while connected)."""
        ...

    def coverage(self) -> Coverage:
        """How governed the run was so far (``Coverage``)."""
        ...

    def send_vitals(self, chunk: VitalsSource) -> int:
        """Queue train-step records of one timeline; returns the seq of the last one."""
        ...

    def send_validation(self, report: ValidationReport) -> int:
        """Queue a validation report; returns the seq its Verdict will name."""
        ...

    def verdict(self, seq: int, wait_s: float) -> Verdict | None:
        """The Verdict on validation ``seq``, waiting up to ``wait_s`` (0: just look)."""
        ...

    def forget_verdict(self, seq: int) -> None:
        """Stop keeping the Verdict on ``seq`` (received or still to come)."""
        ...

    def take_commands(self) -> list[Command]:
        """Commands received since the last call, each once, lowest id first."""
        ...

    def send_snapshot(self, report: SnapshotReport) -> None:
        """Queue a report of a snapshot that became the LKG."""
        ...

    def send_command_result(self, report: CommandReport) -> None:
        """Queue the result of executing a command (it moves ``run_timeline`` to the command's new one)."""
        ...

    def send_adopted(self, report: AdoptionReport) -> None:
        """Queue the report of an adopted snapshot (it moves ``run_timeline`` to ``report.timeline`` + 1); sent
        before any record of that timeline."""
        ...

    def close(self, finish: FinishReport | None, flush_timeout_s: float) -> bool:
        """Queue ``finish`` (None: the governor is not told, e.g. it is unreachable), wait up to
        ``flush_timeout_s`` for everything to be acknowledged, and stop. Returns True if flushed."""
        ...

    def pending(self) -> int:
        """Messages not acknowledged yet."""
        ...
