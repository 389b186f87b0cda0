"""A scripted ``Governance`` in plain types: the test decides every verdict and command, and reads back
everything the loop sent. No client, no protocol, no sockets (``helpers.ScriptedGovernor`` drives the
real client and protocol instead)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tolaria_trainer.governance import (
    AdoptionReport,
    Command,
    CommandReport,
    CommandType,
    Coverage,
    FinishReport,
    GovernorRefused,
    SnapshotReport,
    ValidationReport,
    Verdict,
    VerdictKind,
    VitalsSource,
)


@dataclass
class FakeGovernance:
    """Answers as the script says; ``auto_verdict`` judges every validation HEALTHY at once."""

    auto_verdict: bool = False
    refusal: GovernorRefused | None = None
    connected: bool = True
    run_timeline: int = 0
    governed: bool = True
    num_unjudged_records: int = 0
    num_dropped_records: int = 0
    num_shed_records: int = 0
    num_history_losses: int = 0
    train_verification_steps: int | None = 0  # 0: only non-finite records are judged; None: not welcomed yet
    last_snapshot: tuple[int, int, str] | None = None  # what the Welcome names (shared-memory adoption)
    ack_everything: bool = True  # every record acknowledged as soon as it is sent
    acked_seq: int = 0
    _next_seq: int = 1
    steps: list[tuple[int, int, float]] = field(default_factory=list)  # (timeline, step, loss)
    grad_norms: list[float] = field(default_factory=list)
    validations: dict[int, ValidationReport] = field(default_factory=dict)
    snapshots: list[SnapshotReport] = field(default_factory=list)
    results: list[CommandReport] = field(default_factory=list)
    adoptions: list[AdoptionReport] = field(default_factory=list)
    finish: FinishReport | None = None
    closed: bool = False
    _verdicts: dict[int, Verdict] = field(default_factory=dict)
    _commands: list[Command] = field(default_factory=list)
    _next_command: int = 1

    # ----------------------------------------------------------------- the script

    def verdict_on(self, seq: int, kind: VerdictKind = VerdictKind.HEALTHY, allowed: bool = True) -> None:
        """Judge validation ``seq``."""
        report = self.validations[seq]
        self._verdicts[seq] = Verdict(seq, kind, report.timeline, report.step, "scripted", allowed)

    def order(
        self,
        kind: CommandType,
        *,
        skip: int = 0,
        lr_scale: float = 1.0,
        punishment: float = -10.0,
        onset_step: int | None = None,
    ) -> Command:
        """Order a command on the run's current timeline."""
        command = Command(
            command_id=self._next_command,
            type=kind,
            reason=f"scripted {kind}",
            punishment_reward=punishment,
            timeline=self.run_timeline,
            step=0,
            recovery_skip_batches=skip,
            recovery_lr_scale=lr_scale,
            onset_step=onset_step,
        )
        self._next_command += 1
        self._commands.append(command)
        return command

    # ----------------------------------------------------------------- Governance

    @property
    def commands_waiting(self) -> bool:
        return bool(self._commands)

    def start(self, wait_s: float) -> bool:
        return self.connected

    def unreachable_for_s(self) -> float:
        return 0.0 if self.connected else 1e9

    def coverage(self) -> Coverage:
        never = self.num_unjudged_records + self.num_dropped_records + self.num_shed_records
        return Coverage("fake:0", self.acked_seq > 0, never, 0.0 if self.connected else 1e9, 0)

    def send_vitals(self, chunk: VitalsSource) -> int:
        columns = chunk.host()
        self.steps.extend((columns.timeline, s, v) for s, v in zip(columns.steps, columns.losses, strict=True))
        self.grad_norms.extend(columns.grad_norms)
        self._next_seq += len(chunk)
        if self.ack_everything:
            self.acked_seq = self._next_seq - 1
        return self._next_seq - 1

    def send_validation(self, report: ValidationReport) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self.validations[seq] = report
        if self.auto_verdict:
            self.verdict_on(seq)
        return seq

    def verdict(self, seq: int, wait_s: float) -> Verdict | None:
        return self._verdicts.get(seq)

    def forget_verdict(self, seq: int) -> None:
        self._verdicts.pop(seq, None)

    def take_commands(self) -> list[Command]:
        commands, self._commands = self._commands, []
        return commands

    def send_snapshot(self, report: SnapshotReport) -> None:
        self.snapshots.append(report)

    def send_command_result(self, report: CommandReport) -> None:
        self.results.append(report)
        self.run_timeline = max(self.run_timeline, report.command.timeline_after(report.succeeded))

    def send_adopted(self, report: AdoptionReport) -> None:
        self.adoptions.append(report)
        self.run_timeline = max(self.run_timeline, report.timeline + 1)

    def close(self, finish: FinishReport | None, flush_timeout_s: float) -> bool:
        self.finish, self.closed = finish, True
        return True

    def pending(self) -> int:
        return 0
