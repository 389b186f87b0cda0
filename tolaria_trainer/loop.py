"""The `tolaria-train` loop: epochs of the morphogenetic model, governed by ``GovernedTraining``.

Each epoch applies the seed schedule and the injected faults, trains in the mode the seeds call for
(every optimizer step goes through ``GovernedTraining.step``: vitals, and an agreement point every
``agree_every_steps``), then validates: the report stages an LKG snapshot for the governor's verdict and
the agreement point after it executes any command. An epoch in which a rollback happened does not
count. Training ends only when the agreement point after the last validation (``settle``: it waits
briefly for the verdict and, after a PANIC, for the command) leaves every epoch done: a rollback there
trains the lost epochs again. Everything about the governor (snapshots, verdicts, commands, timelines,
multi-rank agreement) lives in ``governed.py``; this file is the story of one run.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import structlog
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from tolaria.exit_codes import ExitCode
from tolaria_trainer.config import RunConfig
from tolaria_trainer.device import parse_device
from tolaria_trainer.distributed import Distributed
from tolaria_trainer.errors import PeerLost
from tolaria_trainer.faults import FaultInjector, parse_fault
from tolaria_trainer.governance import FinishStatus, Governance, GovernorRefused
from tolaria_trainer.governed import (
    GovernedTraining,
    GovernorUnreachable,
    Outcome,
    Progress,
    RollbackFailed,
    RunHalted,
)
from tolaria_trainer.model import parse_schedule
from tolaria_trainer.tasks import create_model, get_task
from tolaria_trainer.training import (
    adam,
    enable_compile,
    train_epoch_blended,
    train_epoch_normal,
    train_epoch_womb_mode,
    validate_and_get_metrics,
)
from tolaria_trainer.training.lifecycle import SeedLifecycle

log = structlog.get_logger("tolaria.loop")

TRAIN_EPOCH = {"womb": train_epoch_womb_mode, "blended": train_epoch_blended, "normal": train_epoch_normal}


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
    shed_records: int = 0
    unjudged_records: int = 0  # journaled stale by the governor (a Resync)
    # How governed the run was (governance.Coverage): a governor was given, did not refuse this trainer and
    # judged at least one record; the records it never judged (stale, dropped, shed, never acknowledged)
    # and the seconds without it. A fail-open run says so in ``message`` too.
    governed: bool = False
    governor: str = ""
    never_judged_records: int = 0
    seconds_without_governor: float = 0.0
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


class GovernedRun:
    """One rank's run. ``run()`` returns the RunSummary; it never raises for governor trouble.

    ``governance`` replaces the connection to ``cfg.governor`` (tests pass a scripted one).
    """

    def __init__(self, cfg: RunConfig, progress: Progress | None = None, governance: Governance | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or (lambda event: None)
        self.device = parse_device(cfg.device)
        self.dist = Distributed(self.device)
        if self.dist.is_distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        torch.manual_seed(cfg.seed)
        self.task = get_task(cfg.task)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.data = self.task.load(cfg.data_dir, cfg.batch_size, generator)
        self.train_loader: Any = self.data.train
        self.sampler: DistributedSampler[Any] | None = None
        if self.dist.is_distributed:
            self.sampler = DistributedSampler(
                self.data.train.dataset, self.dist.world_size, self.dist.rank, shuffle=True, seed=cfg.seed
            )
            self.train_loader = DataLoader(self.data.train.dataset, batch_size=cfg.batch_size, sampler=self.sampler)
        model = create_model(self.task, self.device, num_outputs=self.data.num_outputs)
        self.dist.broadcast_module(model)
        language_model = self.task.is_language_model
        self.gov = GovernedTraining(
            model,
            torch.optim.Adam(model.parameters(), lr=cfg.lr),
            governor=governance if governance is not None else cfg.governor,
            options=cfg.governed_options(
                num_classes=None if language_model else self.data.num_outputs,
                random_guess_loss=self.task.random_guess_loss(self.data.num_outputs) if language_model else None,
            ),
            device=self.device,
            generator=generator,
            seed_optimizer_factory=adam(cfg.lr),
            distributed=self.dist,
            progress=self.progress,
        )
        self.state = self.gov.state
        if self.dist.is_distributed:
            self.state.grad_sync = self.dist.average_gradients
        if cfg.compile:
            enable_compile(self.state)
        self.loss_fn = self.task.loss_fn()
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun's restarts of the workers
        self.faults = FaultInjector([parse_fault(s) for s in cfg.inject], self.dist.rank, attempt)
        self.seeds = SeedLifecycle(parse_schedule(cfg.seed_schedule), self.state, self.dist, self.gov.checkpoint)
        self.started = time.monotonic()

    def run(self) -> RunSummary:
        """Train until --epochs of progress, a HALT timeout, a failure, or --max-epochs-total."""
        status, code, message = "completed", int(ExitCode.OK), ""
        try:
            self.gov.start()
            while self.state.epoch < self.cfg.epochs or self._rolled_back_at_end():
                if self.state.epochs_run >= self.cfg.epoch_cap:
                    raise _Stop(
                        "failed",
                        ExitCode.EPOCH_CAP,
                        f"--max-epochs-total {self.cfg.epoch_cap} reached with "
                        f"{self.state.epoch}/{self.cfg.epochs} epochs of progress",
                    )
                self._epoch()
        except _Stop as stop:
            status, code, message = stop.status, stop.exit_code, stop.message
        except RunHalted as exc:
            status, code, message = "halted", ExitCode.HALTED, str(exc)
        except GovernorUnreachable as exc:
            status, code, message = "unreachable", ExitCode.GOVERNOR_UNREACHABLE, f"{exc} (--fail-closed)"
        except GovernorRefused as exc:
            status, code, message = "refused", ExitCode.USAGE, f"{exc} (--fail-closed: no training without it)"
        except RollbackFailed as exc:
            status, code, message = "failed", ExitCode.ROLLBACK_FAILED, str(exc)
        except PeerLost as exc:
            status, code, message = "peer_lost", ExitCode.PEER_LOST, str(exc)
        summary = self._finish(status, code, message)
        self.dist.close()
        return summary

    def _epoch(self) -> None:
        state = self.state
        epoch = state.epoch + 1
        self.seeds.before_epoch(epoch)
        for spec in self.faults.before_epoch(state, epoch):
            log.warning("fault injected", fault=spec, epoch=epoch, rank=self.dist.rank)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch + 1000 * state.timeline)
        mode = self.seeds.mode()
        restores_before = self.gov.num_restores
        TRAIN_EPOCH[mode](state, self.train_loader, self.loss_fn, self._on_step)
        state.epochs_run += 1
        if self.gov.num_restores != restores_before:  # a rollback happened mid-epoch: that epoch does not count
            return
        self._react(self.gov.before_validation())  # never validate weights the governor already condemned
        if self.gov.num_restores != restores_before:
            return
        metrics = validate_and_get_metrics(
            state,
            self.data.val,
            self.loss_fn,
            self.data.num_outputs,
            self.task.is_language_model,
            self.train_loader,
            self.cfg.train_metric_batches,
        )
        reported = self.faults.reported_loss(metrics.loss)
        self.seeds.after_validation()
        self.gov.report_validation(
            reported,
            metrics.accuracy,
            metrics.per_class_accuracy,
            epoch=epoch,
            perplexity=metrics.perplexity,
            train_loss=metrics.train_loss,
            train_accuracy=metrics.train_accuracy,
        )
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
                "seeds": {k: str(v) for k, v in state.host.seed_stages().items()},
            }
        )
        self._react(self.gov.agreement_point())

    def _on_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Record the step; True after a restore: the epoch stops there (the next one starts from the restored
        epoch, skipping the batches the restore asked to skip)."""
        outcome = self.gov.step(loss, grad_norm)
        for spec in self.faults.on_step(self.state):
            log.warning("fault injected", fault=spec, step=self.state.step, rank=self.dist.rank)
        self._react(outcome)
        return outcome.restored

    def _react(self, outcome: Outcome) -> None:
        """After a restore: injected faults are spent and culled seeds leave the blend plan."""
        if outcome.restored:
            self.faults.on_restore(self.state)
            self.seeds.after_restore()
        if outcome.halted:
            raise RunHalted(outcome.command.reason if outcome.command else "")

    def _rolled_back_at_end(self) -> bool:
        """After the last epoch: settle the last verdict; True if a rollback undid epochs (train them again)."""
        self._react(self.gov.settle())
        return self.state.epoch < self.cfg.epochs

    def _finish(self, status: str, code: int, message: str) -> RunSummary:
        gov = self.gov
        refused = gov.governance.refusal
        if refused is not None and not message:
            message = f"ungoverned: {refused}"
        finish = {"completed": FinishStatus.COMPLETED, "halted": FinishStatus.HALTED}.get(status, FinishStatus.FAILED)
        # A governor that is unreachable, or that refused this trainer, is not told (nor waited for); nor is
        # it told of a lost peer: the run goes on when the launcher restarts the ranks (a new incarnation of
        # each), and the snapshots stay in shared memory for them to adopt.
        untold = status in ("unreachable", "peer_lost") or refused is not None
        gov.close(None if untold else finish, message)
        coverage = gov.coverage()
        told = coverage.describe() if refused is None else ""
        if told:
            log.warning(told, run_id=gov.run_id, rank=self.dist.rank)
            message = f"{message}; {told}" if message else told
        last = gov.last_validation
        return RunSummary(
            run_id=gov.run_id,
            rank=self.dist.rank,
            status=status,
            exit_code=int(code),
            epochs_completed=self.state.epoch,
            epochs_run=self.state.epochs_run,
            rollbacks=gov.num_rollbacks,
            timeline=self.state.timeline,
            final_validation_loss=last.loss if last else None,
            final_validation_accuracy=last.accuracy if last else None,
            duration_s=time.monotonic() - self.started,
            message=message,
            dropped_records=gov.governance.num_dropped_records,
            shed_records=gov.governance.num_shed_records,
            unjudged_records=gov.governance.num_unjudged_records,
            governed=gov.governed and coverage.judged_any,
            governor=coverage.governor,
            never_judged_records=coverage.never_judged,
            seconds_without_governor=round(coverage.seconds_without, 3),
            weights_sha256=_weights_digest(self.state.model),
        )


def _weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's snapshot tensors (to compare ranks)."""
    from tolaria_trainer.snapshot import snapshot_keys

    digest = hashlib.sha256()
    model_sd = model.state_dict()
    for key in snapshot_keys(model):
        digest.update(key.encode())
        digest.update(model_sd[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


__all__ = ["GovernedRun", "RunConfig", "RunSummary"]
