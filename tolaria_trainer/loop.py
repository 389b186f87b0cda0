"""The governed training loop: schedule, faults, epochs, vitals, LKG staging, verdicts, commands.

Agreement points are after each validation and every ``agree_every_steps`` steps. There the buffered
vitals go out (on the timeline they were produced on), the ranks adopt the run's timeline if the
daemon named a higher one (docs/protocol.md), and they agree (max) on the highest command id any of
them holds: the lowest rank holding it broadcasts the command, so every rank executes the same
command at the same step even if its own stream never delivered it. A snapshot staged after
validation is published only for a Verdict with ``snapshot_allowed`` naming exactly the staged
(timeline, step), agreed by every rank; staging a newer one keeps the older one awaiting its verdict
(up to two), so a slow daemon delays the LKG instead of preventing it. Training ends only when an
agreement point after the last validation (which waits briefly for its verdict and, after a PANIC,
for the command) leaves every epoch done: a rollback there trains the lost epochs again.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from tolaria.exit_codes import ExitCode
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria_trainer import __version__
from tolaria_trainer.client import ClientOptions, GovernorClient, timeline_after
from tolaria_trainer.device import parse_device
from tolaria_trainer.distributed import Distributed
from tolaria_trainer.errors import SnapshotError
from tolaria_trainer.faults import FaultInjector, parse_fault
from tolaria_trainer.model import SeedStage, create_model, parse_schedule
from tolaria_trainer.model.schedule import ScheduleEvent
from tolaria_trainer.rollback import CommandLedger, RestoreOutcome, execute_restore
from tolaria_trainer.snapshot import MAX_STAGED, LastKnownGood, SnapshotInfo
from tolaria_trainer.tasks import get_task
from tolaria_trainer.training import (
    TrainingState,
    ValidationMetrics,
    VitalsBuffer,
    VitalsChunk,
    adam,
    enable_compile,
    train_epoch_blended,
    train_epoch_normal,
    train_epoch_womb_mode,
    validate_and_get_metrics,
)

log = structlog.get_logger("tolaria.loop")


def default_run_id(task: str) -> str:
    """``<task>-<UTC time>-<6 hex>``: two jobs never collide by accident."""
    return f"{task}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


@dataclass
class RunConfig:
    """Everything `tolaria-train` was asked to do."""

    task: str = "digits"
    epochs: int = 15
    max_epochs_total: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    device: str = "cpu"
    data_dir: Path | None = None
    governor: str | None = None
    token: str = ""
    run_id: str = ""
    seed_schedule: str = ""
    snapshot_location: str = "auto"
    fail_closed: bool = False
    fail_closed_deadline_s: float = 60.0
    halt_wait_s: float = 3600.0
    inject: list[str] = field(default_factory=list)
    compile: bool = False
    agree_every_steps: int = 50
    verdict_wait_s: float = 5.0  # at the end: for the last validation's verdict, and a PANIC's command
    vitals_flush_s: float = 0.1  # train-step records wait at most about this long before they are sent
    seed: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    train_metric_batches: int = 4
    heartbeat_s: float = 2.0
    final_flush_s: float = 30.0
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass
class RunSummary:
    """The final report."""

    run_id: str
    rank: int
    status: str
    exit_code: int
    epochs_completed: int = 0
    epochs_run: int = 0
    rollbacks: int = 0
    timeline: int = 0
    # The last validation on the current timeline: None when none ran since the last restore (the restored
    # weights' metrics are not known here, and the ones before the restore describe weights that are gone).
    final_validation_loss: float | None = None
    final_validation_accuracy: float | None = None
    duration_s: float = 0.0
    message: str = ""
    dropped_records: int = 0
    unjudged_records: int = 0
    governed: bool = False  # a governor was given and did not refuse this trainer
    weights_sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict that strict JSON allows (``allow_nan=False``): a non-finite float is the string
        "nan", "inf" or "-inf", as the governor's journal writes one, so a diverged run stays visible."""
        return {key: _json_safe(value) for key, value in self.__dict__.items()}


def _json_safe(value: Any) -> Any:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


class _Stop(Exception):
    def __init__(self, status: str, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.exit_code, self.message = status, exit_code, message


Progress = Callable[[dict[str, Any]], None]


class GovernedRun:
    """One rank's run. ``run()`` returns the RunSummary; it never raises for governor trouble."""

    def __init__(self, cfg: RunConfig, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or (lambda event: None)
        self.device = parse_device(cfg.device)
        self.dist = Distributed(self.device)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        torch.manual_seed(cfg.seed)
        self.task = get_task(cfg.task)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.data = self.task.load(cfg.data_dir, cfg.batch_size, self.generator)
        self.train_loader: Any = self.data.train
        self.sampler: DistributedSampler[Any] | None = None
        if self.dist.is_distributed:
            self.sampler = DistributedSampler(
                self.data.train.dataset, self.dist.world_size, self.dist.rank, shuffle=True, seed=cfg.seed
            )
            self.train_loader = DataLoader(self.data.train.dataset, batch_size=cfg.batch_size, sampler=self.sampler)
        model = create_model(self.task, self.device, num_outputs=self.data.num_outputs)
        self.dist.broadcast_module(model)
        self.state = TrainingState(
            model, torch.optim.Adam(model.parameters(), lr=cfg.lr), self.device, adam(cfg.lr), generator=self.generator
        )
        if self.dist.is_distributed:
            self.state.grad_sync = self.dist.average_gradients
        if cfg.compile:
            enable_compile(self.state)
        self.loss_fn = self.task.loss_fn()
        self.faults = FaultInjector([parse_fault(s) for s in cfg.inject], self.dist.rank)
        self.schedule = parse_schedule(cfg.seed_schedule)
        self.blend_plan: dict[str, float] = {}
        self.lkg = LastKnownGood(cfg.snapshot_location)
        self.ledger = CommandLedger()
        self.known_commands: dict[int, trainer_service_pb2.Command] = {}
        self.last_command_id = 0  # every rank executed every command up to this id
        self.rollbacks = 0
        self.num_restores = 0  # ROLLBACKs and RESUMEs executed
        self.run_id = cfg.run_id or default_run_id(cfg.task)
        self.client: GovernorClient | None = None
        self.vitals = VitalsBuffer(self.device, capacity=64, sink=self._sink, flush_interval_s=cfg.vitals_flush_s)
        self.last_metrics: ValidationMetrics | None = None
        self.pending: list[tuple[int, SnapshotInfo]] = []  # staged snapshots and their validation seqs, oldest first
        self.verdicts: dict[int, trainer_service_pb2.Verdict] = {}  # of the pending and the latest seq
        self.latest_seq: int | None = None  # the last validation record's seq
        self.started = time.monotonic()

    # ----------------------------------------------------------------- governor

    def _sink(self, chunk: VitalsChunk) -> None:
        if self.client is not None:
            self.client.send_vitals(chunk)

    def _connect(self) -> None:
        cfg = self.cfg
        if not cfg.governor:
            return
        hello = trainer_service_pb2.Hello(
            run_id=self.run_id,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            incarnation_id=uuid.uuid4().hex,
            task=cfg.task,
            policy_overrides=common_pb2.Policy(**cfg.policy),
            trainer_version=f"tolaria-trainer {__version__}",
        )
        if self.task.is_language_model:
            hello.random_guess_loss = self.task.random_guess_loss(self.data.num_outputs)
        else:
            hello.num_classes = self.data.num_outputs
        options = ClientOptions(
            heartbeat_s=cfg.heartbeat_s,
            token=cfg.token,
            tls_ca=cfg.tls_ca.read_bytes() if cfg.tls_ca else None,
            tls_cert=cfg.tls_cert.read_bytes() if cfg.tls_cert else None,
            tls_key=cfg.tls_key.read_bytes() if cfg.tls_key else None,
        )
        self.client = GovernorClient(cfg.governor, hello, options)
        self.client.start()
        if cfg.fail_closed:
            self._check_reachable()  # not one step before the governor welcomed this trainer
            return
        connected = self.client.wait_connected(10.0)
        if self.client.refused is not None:
            log.error(
                "the governor REFUSED this trainer: training continues UNGOVERNED (no verdicts, rollbacks or "
                "snapshots); fix the token, role or Hello, or pass --fail-closed to stop instead",
                governor=cfg.governor,
                error=str(self.client.refused),
            )
        elif not connected:
            log.warning(
                "governor not reachable yet; training continues (fail-open) and keeps retrying", governor=cfg.governor
            )

    def _check_reachable(self) -> None:
        """With --fail-closed: end the run once the governor refused this trainer (exit 2: another attempt
        would be refused again), and wait while it is unreachable (exit 4 past the deadline). A fail-open
        run goes on either way."""
        client = self.client
        if client is None or not self.cfg.fail_closed:
            return
        while not client.connected:
            refused = client.refused
            if refused is not None:
                raise _Stop("refused", ExitCode.USAGE, f"{refused} (--fail-closed: no training without the governor)")
            if client.unreachable_for_s() > self.cfg.fail_closed_deadline_s:
                raise _Stop(
                    "unreachable",
                    ExitCode.GOVERNOR_UNREACHABLE,
                    f"governor {self.cfg.governor} unreachable for more than "
                    f"{self.cfg.fail_closed_deadline_s:g} s (--fail-closed)",
                )
            time.sleep(0.1)

    # ----------------------------------------------------------------- the run

    def run(self) -> RunSummary:
        """Train until --epochs of progress, a HALT timeout, a failure, or --max-epochs-total."""
        status, code, message = "completed", int(ExitCode.OK), ""
        try:
            self._connect()
            self._adopt_run_timeline()  # a trainer welcomed before training starts on the run's timeline
            self._publish_now("initial")
            cap = self.cfg.max_epochs_total or 3 * self.cfg.epochs
            while self.state.epoch < self.cfg.epochs or not self._settled_at_end():
                if self.state.epochs_run >= cap:
                    raise _Stop(
                        "failed",
                        ExitCode.EPOCH_CAP,
                        f"--max-epochs-total {cap} reached with "
                        f"{self.state.epoch}/{self.cfg.epochs} epochs of progress",
                    )
                self._epoch()
        except _Stop as stop:
            status, code, message = stop.status, stop.exit_code, stop.message
        summary = self._finish(status, code, message)
        self.dist.close()
        return summary

    def _epoch(self) -> None:
        state = self.state
        epoch = state.epoch + 1
        self._apply_schedule(epoch)
        for spec in self.faults.before_epoch(state, epoch):
            log.warning("fault injected", fault=spec, epoch=epoch, rank=self.dist.rank)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch + 1000 * state.timeline)
        stages = set(state.model.seed_stages().values())
        if SeedStage.TRAINING in stages:
            train, mode = train_epoch_womb_mode, "womb"
        elif stages & {SeedStage.BLENDING, SeedStage.PROBATIONARY}:
            train, mode = train_epoch_blended, "blended"
        else:
            train, mode = train_epoch_normal, "normal"
        restores_before = self.num_restores
        train(state, self.train_loader, self.loss_fn, self.vitals, self._on_step)
        self.vitals.flush()
        state.epochs_run += 1
        if self.num_restores != restores_before:  # a rollback happened mid-epoch: that epoch does not count
            return
        state.epoch = epoch
        metrics = validate_and_get_metrics(
            state,
            self.data.val,
            self.loss_fn,
            self.data.num_outputs,
            self.task.is_language_model,
            self.train_loader,
            self.cfg.train_metric_batches,
        )
        self.last_metrics = metrics
        reported = self.faults.reported_loss(metrics.loss)
        self._settle_pending()  # the previous epoch's verdict has arrived by now: publish before restaging
        staged: SnapshotInfo | None = None
        if len(self.pending) == MAX_STAGED:
            self._drop_pending(self.pending[-1])  # the LKG's stage replaces the newest staged one
        try:
            staged = self.lkg.stage(state)
        except SnapshotError as exc:
            log.error("snapshot staging failed; the previous LKG stays", error=str(exc))
        self._advance_blends()
        seq = self._report_validation(epoch, reported, metrics)
        self.progress(
            {
                "event": "epoch",
                "epoch": epoch,
                "mode": mode,
                "step": state.step,
                "timeline": state.timeline,
                "val_loss": reported,
                "val_accuracy": metrics.accuracy,
                "train_loss": metrics.train_loss,
                "seeds": {k: str(v) for k, v in state.model.seed_stages().items()},
            }
        )
        self._after_validation(seq, staged)

    def _on_step(self, state: TrainingState) -> None:
        for spec in self.faults.on_step(state):
            log.warning("fault injected", fault=spec, step=state.step, rank=self.dist.rank)
        if self.cfg.agree_every_steps and state.step % self.cfg.agree_every_steps == 0:
            self._agreement_point()

    # ----------------------------------------------------------------- reporting and snapshots

    def _report_validation(self, epoch: int, loss: float, metrics: ValidationMetrics) -> int | None:
        if self.client is None:
            return None
        record = trainer_service_pb2.ValidationRecord(
            timeline=self.state.timeline,
            step=self.state.step,
            epoch=epoch,
            loss=loss,
            per_class_accuracy=metrics.per_class_accuracy,
        )
        if math.isfinite(metrics.accuracy):
            record.accuracy = min(1.0, max(0.0, metrics.accuracy))
        if metrics.perplexity is not None:
            record.perplexity = metrics.perplexity
        if metrics.train_loss is not None:
            record.train_loss = metrics.train_loss
        if metrics.train_accuracy is not None:
            record.train_accuracy = metrics.train_accuracy
        for slot in self.state.model.seed_slots():
            record.seeds.append(
                trainer_service_pb2.SeedStatus(
                    slot=slot.name, blueprint=slot.blueprint, stage=str(slot.stage), alpha=slot.alpha
                )
            )
        return self.client.send_validation(record)

    def _after_validation(self, seq: int | None, staged: SnapshotInfo | None) -> None:
        """The staged snapshot waits for its Verdict; nothing here blocks on the network."""
        previous, self.latest_seq = self.latest_seq, seq
        self._release_verdict(previous)  # superseded: only the newest validation's verdict matters at the end
        if staged is not None and seq is not None:
            self.pending.append((seq, staged))
        elif staged is not None:
            self.lkg.discard()  # ungoverned: never publish a snapshot without a verdict
        self._agreement_point()

    def _drop_pending(self, item: tuple[int, SnapshotInfo]) -> None:
        """Forget a staged snapshot (if it was published, the LKG stays) and stop waiting for its verdict."""
        self.pending.remove(item)
        self.lkg.discard(item[1])
        self._release_verdict(item[0])

    def _release_verdict(self, seq: int | None) -> None:
        """Stop tracking the verdict on ``seq`` unless a staged snapshot or the latest validation needs it."""
        if seq is None or seq == self.latest_seq or any(seq == pending for pending, _ in self.pending):
            return
        if self.verdicts.pop(seq, None) is None and self.client is not None:
            self.client.forget_verdict(seq)

    def _verdict(self, seq: int | None, wait_s: float) -> trainer_service_pb2.Verdict | None:
        """The Verdict on validation record ``seq`` once it arrived (kept until its seq is dropped)."""
        if seq is None or self.client is None:
            return None
        if seq not in self.verdicts:
            connected = self.client.connected or wait_s == 0
            verdict = self.client.wait_verdict(seq, wait_s if connected else 0.0)
            if verdict is None:
                return None
            if verdict.kind == common_pb2.VERDICT_KIND_PANIC:
                log.warning("governor verdict PANIC", reason=verdict.reason, step=verdict.step)
            self.verdicts[seq] = verdict
        return self.verdicts[seq]

    def _settle_pending(self, wait_s: float = 0.0) -> None:
        """Publish or discard staged snapshots, oldest first, each once every rank holds its Verdict (the
        newest allowed one ends up the LKG). Stops at the first verdict some rank still lacks.

        Every rank calls the same collectives in the same order, so all decide at the same step.
        """
        for position in range(self.dist.agree_max(len(self.pending))):
            item = self.pending[0] if self.pending else None
            verdict = self._verdict(item[0], wait_s if position == 0 else 0.0) if item else None
            if not self.dist.agree_min(int(verdict is not None)):
                return
            assert item is not None
            assert verdict is not None
            staged = item[1]
            allowed = verdict.snapshot_allowed and (verdict.timeline, verdict.step) == (staged.timeline, staged.step)
            if self.dist.agree_min(int(allowed)) and self.lkg.publish(staged.timeline, staged.step):
                self._report_snapshot(staged)
            self._drop_pending(item)

    def _settled_at_end(self) -> bool:
        """After the last epoch: wait up to ``verdict_wait_s`` (while connected) for the last validation's
        verdict and, after a PANIC on any rank, for a command; then an agreement point. True if every
        epoch is still done (False after a rollback: training goes on). Every rank leaves each wait
        together."""
        deadline = time.monotonic() + self.cfg.verdict_wait_s
        while True:
            verdict = self._verdict(self.latest_seq, 0.0)
            self._collect()
            judged = self.client is None or not self.client.connected or verdict is not None
            panic = verdict is not None and verdict.kind == common_pb2.VERDICT_KIND_PANIC
            settled = judged and (not panic or bool(self.known_commands))
            if self.dist.agree_min(int(settled)) or self.dist.agree_max(int(time.monotonic() >= deadline)):
                break
            time.sleep(0.01)
        self._settle_pending()
        self._agreement_point()
        return self.state.epoch >= self.cfg.epochs

    def _publish_now(self, why: str) -> None:
        info = self.lkg.take(self.state)
        log.info("snapshot published", why=why, step=info.step, snapshot_bytes=info.snapshot_bytes)
        self._report_snapshot(info)

    def _report_snapshot(self, info: SnapshotInfo) -> None:
        if self.client is not None:
            self.client.send_snapshot(info.timeline, info.step, info.snapshot_bytes, info.duration_ms, info.location)

    # ----------------------------------------------------------------- seed schedule

    def _apply_schedule(self, epoch: int) -> None:
        for event in [e for e in self.schedule if e.epoch == epoch]:
            slot = self.state.model.slot(event.slot)
            try:
                self._apply_event(event, slot.stage)
            except Exception as exc:  # an entry that no longer fits (its seed was culled) is skipped
                log.warning(
                    "seed-schedule entry skipped",
                    action=event.action,
                    slot=event.slot,
                    epoch=epoch,
                    stage=str(slot.stage),
                    reason=str(exc),
                )

    def _apply_event(self, event: ScheduleEvent, stage: SeedStage) -> None:
        state = self.state
        if event.action == "germinate":
            state.germinate(event.slot, event.blueprint)
            seed = state.model.slot(event.slot).seed
            if seed is not None:
                self.dist.broadcast_module(seed)
        elif event.action == "blend":
            if stage is not SeedStage.TRAINING:
                raise ValueError(f"blend needs a TRAINING seed, the slot is {stage}")
            slot = state.model.slot(event.slot)
            slot.advance(SeedStage.BLENDING)
            self.blend_plan[event.slot] = 1.0 / event.blend_epochs
            slot.set_alpha(self.blend_plan[event.slot])
        elif event.action == "fossilize":
            if stage not in (SeedStage.BLENDING, SeedStage.PROBATIONARY):
                raise ValueError(f"fossilize needs a BLENDING or PROBATIONARY seed, the slot is {stage}")
            state.fossilize(event.slot)
            self.blend_plan.pop(event.slot, None)
            self._publish_now(f"{event.slot} fossilized")
        elif event.action == "cull":
            state.model.slot(event.slot).cull("seed schedule")
            state.drop_seed_optimizer(event.slot)
        log.info("seed lifecycle", slot=event.slot, action=event.action, stage=str(state.model.slot(event.slot).stage))

    def _advance_blends(self) -> None:
        for name, step in list(self.blend_plan.items()):
            slot = self.state.model.slot(name)
            if slot.stage is not SeedStage.BLENDING:
                self.blend_plan.pop(name)
                continue
            if slot.alpha + step >= 1.0 - 1e-9:
                slot.advance(SeedStage.PROBATIONARY)
                self.blend_plan.pop(name)
            else:
                slot.set_alpha(slot.alpha + step)

    # ----------------------------------------------------------------- commands

    def _collect(self) -> None:
        if self.client is None:
            return
        for command in self.client.take_commands():
            if command.command_id > self.last_command_id:  # an executed command may still reach a slow rank
                self.known_commands[command.command_id] = command

    def _adopt_run_timeline(self) -> None:
        """Move every rank to the run's timeline if the daemon named a higher one (Welcome, Resync): a
        restarted trainer's records would otherwise be stale forever. Records already buffered keep
        their timeline; a snapshot staged on the old one can no longer be published."""
        if self.client is None:
            return
        target = self.dist.agree_max(self.client.run_timeline)
        if target <= self.state.timeline:
            return
        self.vitals.flush()
        for item in list(self.pending):  # staged on the old timeline: no verdict will publish them
            self._drop_pending(item)
        log.warning(
            "adopting the run's timeline from the governor",
            timeline=self.state.timeline,
            run_timeline=target,
            unjudged_records=self.client.num_unjudged_records,
        )
        self.state.timeline = target

    def _agreement_point(self) -> None:
        self._check_reachable()
        self.vitals.flush()  # buffered records go out before anything decided here
        self._settle_pending()
        self._adopt_run_timeline()
        self._collect()
        command = self._agree_command()
        if command is not None:
            self._execute(command)

    def _agree_command(self) -> trainer_service_pb2.Command | None:
        """The command every rank executes now: the highest id any rank holds, as the lowest rank holding
        it sent it (so a rank whose stream never delivered it, refused or reconnecting, executes it too
        and the ranks never diverge). None when no rank holds a new command."""
        highest = self.dist.agree_max(max(self.known_commands, default=0))
        if highest == 0:
            return None
        holds = highest in self.known_commands
        holder = self.dist.agree_min(self.dist.rank if holds else self.dist.world_size)
        assert holder < self.dist.world_size, "the highest id came from a rank that holds it"
        data = self.known_commands[highest].SerializeToString() if holds else b""
        command = trainer_service_pb2.Command.FromString(self.dist.broadcast_bytes(data, holder))
        self.known_commands = {cid: c for cid, c in self.known_commands.items() if cid > highest}
        self.last_command_id = highest
        return command

    def _execute(self, command: trainer_service_pb2.Command) -> None:
        kind = common_pb2.CommandType.Name(command.type)
        log.warning(
            "governor command",
            command_id=command.command_id,
            type=kind,
            reason=command.reason,
            punishment_reward=command.punishment_reward,
        )
        self.progress(
            {
                "event": "command",
                "type": kind,
                "command_id": command.command_id,
                "reason": command.reason,
                "punishment_reward": command.punishment_reward,
            }
        )
        if command.type == common_pb2.COMMAND_TYPE_HALT:
            self._report_result(
                command, RestoreOutcome(command.command_id, True, self.state.timeline, self.state.step, 0.0)
            )
            self._halt(command)
            return
        scale = command.recovery_lr_scale if command.type == common_pb2.COMMAND_TYPE_ROLLBACK else 1.0
        skip = command.recovery_skip_batches if command.type == common_pb2.COMMAND_TYPE_ROLLBACK else 0
        outcome = execute_restore(
            self.state,
            self.lkg,
            self.ledger,
            command.command_id,
            command.reason,
            timeline_after(command, succeeded=True),
            scale if scale > 0 else 1.0,
            skip,
        )
        self.faults.on_restore(self.state)
        self.blend_plan = {k: v for k, v in self.blend_plan.items() if self.state.model.slot(k).is_live}
        self._report_result(command, outcome)
        if not outcome.succeeded:
            raise _Stop("failed", ExitCode.ROLLBACK_FAILED, f"rollback {command.command_id} failed: {outcome.error}")
        self.num_restores += 1
        self.last_metrics = None  # they described the weights this restore replaced
        if command.type == common_pb2.COMMAND_TYPE_ROLLBACK:
            self.rollbacks += 1
        self.progress(
            {
                "event": "restored",
                "command_id": command.command_id,
                "timeline": outcome.new_timeline,
                "restored_step": outcome.restored_step,
                "culled": list(outcome.culled),
                "duration_ms": outcome.duration_ms,
            }
        )

    def _report_result(self, command: trainer_service_pb2.Command, outcome: RestoreOutcome) -> None:
        if self.client is None:
            return
        restored = outcome.succeeded and command.type != common_pb2.COMMAND_TYPE_HALT
        self.client.send_command_result(
            command,
            outcome.succeeded,
            outcome.restored_step,
            outcome.duration_ms,
            outcome.error,
            len(outcome.culled),
            # The learning rate training continues with: the restored one, times recovery_lr_scale.
            float(self.state.host_optimizer.param_groups[0]["lr"]) if restored else None,
        )

    def _halt(self, command: trainer_service_pb2.Command) -> None:
        """Stay alive with the LKG and the stream until RESUME, or give up after --halt-wait-s."""
        self.progress(
            {
                "event": "halted",
                "command_id": command.command_id,
                "reason": command.reason,
                "halt_wait_s": self.cfg.halt_wait_s,
            }
        )
        deadline = time.monotonic() + self.cfg.halt_wait_s
        while True:
            self._collect()
            resume = max(
                (c for c, cmd in self.known_commands.items() if cmd.type == common_pb2.COMMAND_TYPE_RESUME), default=0
            )
            if self.dist.agree_max(resume):
                self._agreement_point()
                return
            if time.monotonic() >= deadline or self.dist.agree_max(int(time.monotonic() >= deadline)):
                raise _Stop("halted", ExitCode.HALTED, f"halted by the governor: {command.reason}")
            time.sleep(0.1)

    # ----------------------------------------------------------------- end

    def _finish(self, status: str, code: int, message: str) -> RunSummary:
        metrics = self.last_metrics
        refused = self.client.refused if self.client is not None else None
        if refused is not None and not message:
            message = f"ungoverned: {refused}"
        summary = RunSummary(
            run_id=self.run_id,
            rank=self.dist.rank,
            status=status,
            exit_code=int(code),
            epochs_completed=self.state.epoch,
            epochs_run=self.state.epochs_run,
            rollbacks=self.rollbacks,
            timeline=self.state.timeline,
            final_validation_loss=metrics.loss if metrics else None,
            final_validation_accuracy=metrics.accuracy if metrics else None,
            duration_s=time.monotonic() - self.started,
            message=message,
            governed=self.client is not None and refused is None,
            weights_sha256=_weights_digest(self.state),
        )
        if self.client is not None:
            gone = status == "unreachable" or refused is not None  # nothing more reaches the governor
            finish = trainer_service_pb2.Finish(
                status={"completed": common_pb2.FINISH_STATUS_COMPLETED, "halted": common_pb2.FINISH_STATUS_HALTED}.get(
                    status, common_pb2.FINISH_STATUS_FAILED
                ),
                epochs_completed=summary.epochs_completed,
                num_rollbacks=summary.rollbacks,
                message=message or status,
                duration_s=summary.duration_s,
            )
            if metrics is not None:
                finish.final_validation_loss = metrics.loss
                if math.isfinite(metrics.accuracy):
                    finish.final_validation_accuracy = metrics.accuracy
            if not gone:
                self.client.send_finish(finish)
            # Deliver what the governor has not acknowledged yet (it may be reconnecting after a restart);
            # a run that stops because the governor is unreachable, or that it refused, does not wait for it.
            pending = self.client.pending()
            if pending and not self.client.connected and not gone:
                log.info(
                    "waiting for the governor to take the last records",
                    pending=pending,
                    timeout_s=self.cfg.final_flush_s,
                )
            flushed = self.client.close(flush_timeout_s=0.5 if gone else self.cfg.final_flush_s)
            summary.dropped_records = self.client.num_dropped_records
            summary.unjudged_records = self.client.num_unjudged_records
            if not flushed and not gone:
                log.warning("not every record reached the governor before exit", pending=self.client.pending())
        return summary


def _weights_digest(state: TrainingState) -> str:
    """SHA-256 of the model's snapshot tensors (to compare ranks)."""
    import hashlib

    digest = hashlib.sha256()
    model_sd = state.model.state_dict()
    for key in state.model.snapshot_keys():
        digest.update(key.encode())
        digest.update(model_sd[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
