"""GovernedTraining: put any PyTorch training loop under the governor.

::

    with GovernedTraining(model, [optimizer], governor="127.0.0.1:50051", num_classes=10) as gov:
        for epoch in range(epochs):
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                gov.step(loss)                       # a device tensor: no host sync
            gov.validate(val_loss, accuracy=val_acc, epoch=epoch)

``step`` records the step's loss and gradient norm in a device buffer that a background thread sends
(train-step records: judged for non-finite values, and by the step detectors of the profile);
``validate`` reports a validation, stages a last-known-good (LKG) snapshot that the governor's
Verdict publishes, and is an agreement point. Agreement points also come every
``agree_every_steps`` steps; commands are executed only there, by every rank at the same step. Both
return an ``Outcome``: whether a restore happened in place (the model, optimizers, schedulers, grad
scaler, RNG states and ``extra_state`` are back at the LKG; ``restored_step``, the new timeline,
batches to skip, the LR scale applied and the punishment reward say how) or that the run is halted.

The protocol it follows is docs/protocol.md. Under torchrun every rank constructs one; the agreement
collectives run on a gloo group of their own (CPU tensors, no device sync).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Unpack

import torch
from torch import nn

from tolaria_trainer import waits
from tolaria_trainer.adoption import adopt_run_timeline, adopt_shared_snapshot, last_known_good
from tolaria_trainer.commands import Commands
from tolaria_trainer.distributed import Distributed
from tolaria_trainer.ending import ending, finish_report
from tolaria_trainer.errors import GovernorUnreachable, RollbackFailed, RunHalted
from tolaria_trainer.governance import (
    Command,
    CommandType,
    Coverage,
    FinishStatus,
    Governance,
    GovernorRefused,
    Ungoverned,
    ValidationReport,
)
from tolaria_trainer.grad_norm import GradNorm
from tolaria_trainer.guard import install_step_guard
from tolaria_trainer.loggers import GovernorLoggers
from tolaria_trainer.options import GovernedKnobs, GovernedOptions, default_run_id
from tolaria_trainer.outcome import Outcome
from tolaria_trainer.publishing import SnapshotPublishing
from tolaria_trainer.reachability import Reachability
from tolaria_trainer.snapshot import SnapshotInfo
from tolaria_trainer.training.state import OptimizerFactory, TrainingState
from tolaria_trainer.training.vitals import VitalsBuffer, VitalsChunk
from tolaria_trainer.verdicts import Measured
from tolaria_trainer.vouching import Staged

log = logging.getLogger("tolaria.governed")

Progress = Callable[[dict[str, Any]], None]


class GovernedTraining:
    """One rank's governed training: a context manager around the user's own loop.

    ``governor`` is the daemon's address (``host:port``), a ``Governance`` object, or None for an
    ungoverned run (everything works the same; nothing is judged, and the LKG stays the initial one).
    The snapshotted state is ``model`` (a model with ``seed_slots()``/``snapshot_keys()`` has its live
    seeds left out and culled on rollback), ``optimizers``, ``schedulers``, ``grad_scaler``, RNG states
    and ``extra_state`` (a dict, or an object with ``state_dict``/``load_state_dict``: a data loader
    position, say). ``fail_closed`` pauses at agreement points while the governor is unreachable and
    raises GovernorUnreachable after ``fail_closed_deadline_s``; a refusal (wrong token or role) then
    raises GovernorRefused instead of training ungoverned. ``loggers`` (a TensorBoard SummaryWriter, a wandb
    run, a logger with ``log_metrics``, a callable, or a list of them: ``tolaria_trainer.loggers``) get the
    ``governor/*`` scalars and the decision's reason each time a command changed the run. The knobs
    (``agree_every_steps``, ``fail_closed``, ...) are ``GovernedOptions``: given as ``options``, as keywords,
    or both (the keywords replace those fields).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        governor: str | Governance | None,
        options: GovernedOptions | None = None,
        schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler] = (),
        grad_scaler: torch.amp.GradScaler | None = None,
        extra_state: Any = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        seed_optimizer_factory: OptimizerFactory | None = None,
        distributed: Distributed | None = None,
        progress: Progress | None = None,
        loggers: Any = (),
        **knobs: Unpack[GovernedKnobs],
    ) -> None:
        options = (options if options is not None else GovernedOptions()).with_knobs(knobs)  # ValueError first
        self.options = options
        self.loggers = GovernorLoggers(loggers)  # TypeError for a bad one, before anything is changed
        self.device = torch.device(device) if device is not None else _device_of(model)
        self.dist = distributed if distributed is not None else Distributed(self.device)
        self.state = TrainingState(
            model,
            [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers),
            self.device,
            seed_optimizer_factory,
            schedulers=list(schedulers),
            scaler=grad_scaler,
            generator=generator,
            extra_state=extra_state,
        )
        self.run_id = options.run_id or default_run_id(options.task)
        self.governance = governance_for(governor, self.run_id, self.dist, options)
        # a grad scaler already skips non-finite steps
        self.guard = install_step_guard(self.state) if options.guard_steps and grad_scaler is None else None
        self.progress = progress or (lambda event: None)
        self.agree_every_steps = options.agree_every_steps  # read by every step: one lookup, not two
        self._assemble(options)
        self.adopted: SnapshotInfo | None = None  # the snapshot an earlier process left in shared memory
        self.last_validation: ValidationReport | None = None  # on the current timeline (None after a restore)
        self.halted: str | None = None
        self.started_at = time.monotonic()
        self._single = self.dist.world_size == 1
        self._started = False
        self._closed = False
        self._quiet_outcome = Outcome()

    def _assemble(self, options: GovernedOptions) -> None:
        """The collaborators this facade hands its work to, wired to the state, the governance and each other."""
        governance, state, dist = self.governance, self.state, self.dist
        self.reachability = Reachability(
            governance, options.fail_closed, options.fail_closed_deadline_s, options.connect_wait_s
        )
        self.grad_norm = GradNorm(state, self.guard, self.device)
        self.lkg = last_known_good(options, self.run_id, dist.rank, governance.governed)
        self.commands = Commands(
            state,
            self.lkg,
            governance,
            dist,
            self.guard,
            self.loggers,
            self._progress,
            onset_margin_steps=options.onset_margin_steps,
            halt_wait_s=options.halt_wait_s,
        )
        self.snapshots = SnapshotPublishing(
            self.lkg, state, governance, dist, self.commands.any_known, options.step_snapshot_every, self._progress
        )
        self.vitals = VitalsBuffer(self.device, 64, sink=self._send_vitals, flush_interval_s=options.vitals_flush_s)

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> GovernedTraining:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(*ending(exc))

    def start(self) -> None:
        """Connect (waiting up to ``connect_wait_s`` for the first Welcome), move to the run's timeline
        if the governor names a later one, and publish the initial LKG."""
        if self._started:
            return
        self._started = True
        self.reachability.connect()
        adopt_run_timeline(self.state, self.governance, self.dist, self.vitals.flush, self.snapshots.drop_staged)
        self.adopted = adopt_shared_snapshot(self.lkg, self.state, self.governance, self.dist, self._progress)
        if self.adopted is not None:
            self.commands.adopted_on(self.state.timeline - 1)
        self.checkpoint("adopted" if self.adopted is not None else "initial")

    def _progress(self, event: dict[str, Any]) -> None:
        """Hand an event to ``progress`` (looked up at each call: the caller may replace it)."""
        self.progress(event)

    @property
    def num_rollbacks(self) -> int:
        """ROLLBACKs executed."""
        return self.commands.num_rollbacks

    @property
    def num_restores(self) -> int:
        """ROLLBACKs and RESUMEs executed."""
        return self.commands.num_restores

    @property
    def step_pending(self) -> Staged | None:
        """The step snapshot staged at an agreement point, awaiting the train stream (``StepSnapshots``)."""
        return self.snapshots.steps.pending

    @property
    def governed(self) -> bool:
        """True while a governor judges this run (False without one, or once it refused this trainer)."""
        return self.governance.governed and self.governance.refusal is None

    def coverage(self) -> Coverage:
        """How governed this run has been so far: whether the governor judged anything, the records it never
        judged, the seconds without it (``Coverage.describe()`` says it in one line). Call it after ``close``
        for the final account."""
        return self.governance.coverage()

    def close(self, status: FinishStatus | None, message: str = "", flush_timeout_s: float | None = None) -> bool:
        """Tell the governor how the run ended (None: don't, it is unreachable), wait for it to take the
        last records, stop the connection. Returns True if every record was acknowledged."""
        if self._closed:
            return True
        self._closed = True
        if self.guard is not None:
            self.guard.uninstall()
        self.grad_norm.close()
        self.vitals.flush()
        if self.governance.refusal is not None:
            status = None  # a governor that refused this trainer takes nothing more
        finish = finish_report(status, message, self.state, self.num_rollbacks, self.started_at, self.last_validation)
        timeout = self.options.final_flush_s if flush_timeout_s is None else flush_timeout_s
        flushed = self.reachability.finish(finish, timeout)
        # The run finished: its snapshots go. Otherwise (failed, unreachable) they stay for a restart to adopt.
        self.lkg.close(remove=finish is not None and finish.status in (FinishStatus.COMPLETED, FinishStatus.HALTED))
        return flushed

    # ----------------------------------------------------------------- the user's calls

    def step(self, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None) -> Outcome:
        """Record one optimizer step (call it after ``optimizer.step()``, or with a grad scaler after
        ``scaler.step`` and ``scaler.update``). ``grad_norm`` defaults to the total norm of the gradients the
        optimizers hold (after any clipping); with a grad scaler it is the unscaled norm, whether the scaler
        unscaled the gradients already (``scaler.unscale_``, ``scaler.step``) or not. Nothing here reads the
        device; every ``agree_every_steps`` steps it is an agreement point."""
        # The hot path: after a training step the caches are cold and each call or lookup here costs
        # about a microsecond (tests/benchmarks/bench_step_overhead.py), so it is spelled out inline.
        if self.halted is not None or not self._started:
            self._check_open()
        state = self.state
        if state.skip_batches:  # a batch the restore asked to skip, and the loop did not skip in its data
            return self._skipped()
        if grad_norm is None:
            grad_norm = self.grad_norm.take()
        elif type(grad_norm) is not torch.Tensor:
            grad_norm = _as_tensor(grad_norm, self.device)

        if type(loss) is not torch.Tensor:
            loss = _as_tensor(loss, self.device)
        step, timeline = state.step + 1, state.timeline
        self.vitals.record(step, loss, grad_norm, state.learning_rate(), timeline)  # raises on a bad loss
        state.step = step
        if self.agree_every_steps and step % self.agree_every_steps == 0:
            return self.agreement_point()
        if self._single and self.governance.commands_waiting:  # one rank needs no agreement: act at once
            return self.agreement_point()
        quiet = self._quiet_outcome
        return quiet if quiet.timeline == timeline else self._quiet(timeline)

    def _skipped(self) -> Outcome:
        """One batch of a restore's skip: its update was not applied (the step guard), so it is neither
        recorded nor counted."""
        state = self.state
        state.skip_batches -= 1
        if self.guard is None:
            log.warning(
                "a skipped batch was trained: without the step guard (a grad scaler, guard_steps=False) "
                "the loop must skip it itself (take_skip)"
            )
        return self._quiet(state.timeline)

    def take_skip(self) -> int:
        """The batches a restore asked to skip that are still to skip, handed to a loop that skips them in
        its data (and not computed at all); without this call each of them is computed and not applied."""
        skip, self.state.skip_batches = self.state.skip_batches, 0
        return skip

    def _quiet(self, timeline: int) -> Outcome:
        """The outcome of a step or agreement point that only recorded (one object per timeline: nothing
        allocated per step)."""
        if self._quiet_outcome.timeline != timeline:
            self._quiet_outcome = Outcome(timeline=timeline)
        return self._quiet_outcome

    def validate(
        self,
        loss: float,
        accuracy: float | None = None,
        per_class_accuracy: Sequence[float] = (),
        *,
        epoch: int | None = None,
        perplexity: float | None = None,
        train_loss: float | None = None,
        train_accuracy: float | None = None,
    ) -> Outcome:
        """Report a validation (host floats: the one sync is the caller's), stage an LKG snapshot for the
        governor's verdict, and hold an agreement point (``report_validation`` then ``agreement_point``).
        ``epoch`` (default: unchanged) is kept in the snapshot, so a restore tells the loop where it is."""
        self.report_validation(
            loss,
            accuracy,
            per_class_accuracy,
            epoch=epoch,
            perplexity=perplexity,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
        )
        return self.agreement_point()

    def report_validation(
        self,
        loss: float,
        accuracy: float | None = None,
        per_class_accuracy: Sequence[float] = (),
        *,
        epoch: int | None = None,
        perplexity: float | None = None,
        train_loss: float | None = None,
        train_accuracy: float | None = None,
    ) -> int:
        """The first half of ``validate``: stage the snapshot and queue the report; returns its seq. The
        caller holds the agreement point when it is ready (``tolaria-train`` reports progress between)."""
        self._check_open()
        if epoch is not None:
            self.state.epoch = epoch
        measured = Measured(loss, accuracy, per_class_accuracy, perplexity, train_loss, train_accuracy)
        seq, self.last_validation = self.snapshots.validations.report(self.state, measured, self.governed, self.vitals)
        return seq

    @property
    def condemned(self) -> bool:
        """True when this rank saw a non-finite step since the LKG was last restored (its update was not
        applied) or holds a command not yet executed: the governor's ROLLBACK is on its way, and the
        weights are not worth validating."""
        return self.commands.condemned

    def before_validation(self) -> Outcome:
        """Call before validating: when the run is condemned (``condemned``), wait up to ``verdict_wait_s``
        for the command and execute it, so that a validation never runs on weights the governor already
        condemned. A restored outcome means the restore happened here: validate the restored weights (or
        skip the validation). A quiet outcome otherwise; every rank takes part."""
        self._check_open()
        self.commands.collect()
        if not self.dist.agree_max(int(self.condemned)):
            return self._quiet(self.state.timeline)
        waits.for_command(self.commands, self.governance, self.dist, self.options.verdict_wait_s, self.vitals.flush)
        return self.agreement_point()

    def settle(self, wait_s: float | None = None) -> Outcome:
        """At the end of training: wait up to ``wait_s`` (default ``verdict_wait_s``) for the last validation's
        verdict and, after a PANIC, for its command; then an agreement point. A restored outcome means the
        last validations were rolled back: train them again.

        While no governor is attached it waits only when a command is known to be coming (a PANIC verdict, or
        a non-finite step this rank skipped: ``condemned``), and then up to ``connect_wait_s`` at least, for
        the governor to come back and send it: a run must not finish on weights its governor already
        condemned because the governor restarted at the wrong moment (fail-open trains on, and says so)."""
        self._check_open()
        wait = self.options.verdict_wait_s if wait_s is None else wait_s
        waits.for_settled(
            self.snapshots.validations, self.commands, self.governance, self.dist, wait, self.options.connect_wait_s
        )
        self.snapshots.validations.settle()
        return self.agreement_point()

    def checkpoint(self, why: str) -> SnapshotInfo:
        """Make the current state the LKG at once, without a verdict (the initial state; right after a
        seed was fossilized, when older snapshots no longer fit the model)."""
        return self.snapshots.checkpoint(why)

    # ----------------------------------------------------------------- agreement

    def agreement_point(self) -> Outcome:
        """Send what is buffered, publish snapshots whose verdicts every rank holds, adopt the run's
        timeline, and execute the command every rank agrees on (if any)."""
        self.reachability.check()
        self.vitals.pin(self.state.step, self.state.timeline)  # a step snapshot may be staged here
        self.vitals.flush()  # buffered records go out before anything decided here
        self.commands.collect()  # first: every verdict the governor sent before a command taken here has arrived
        self.snapshots.validations.settle()
        adopt_run_timeline(self.state, self.governance, self.dist, self.vitals.flush, self.snapshots.drop_staged)
        self.snapshots.steps.settle()
        command = self.commands.agree()
        if command is None:
            if self.loggers:
                self.commands.log_records()  # a command's own event carries the counts
            self.snapshots.steps.stage(self.governed)
            return self._quiet(self.state.timeline)
        return self._execute(command)

    def _check_open(self) -> None:
        if self.halted is not None:
            raise RunHalted(self.halted)
        if not self._started:
            raise RuntimeError("GovernedTraining is not started: use it as a context manager, or call start()")

    def _send_vitals(self, chunk: VitalsChunk) -> None:
        last_seq = self.governance.send_vitals(chunk)
        self.snapshots.vouching.sent(chunk.timeline, chunk.steps[-1], last_seq)  # what vouching for a snapshot needs

    def _execute(self, command: Command) -> Outcome:
        """Execute the command every rank agreed on (``Commands``): a HALT waits for its RESUME (executed at
        an agreement point) or halts the run; a ROLLBACK or RESUME leaves the timeline its staged snapshots
        were staged on and restores the LKG."""
        self.commands.announce(command)
        if command.type is CommandType.HALT:
            if self.commands.halt(command):
                return self.agreement_point()
            self.halted = command.reason
            return Outcome(halted=True, command=command, timeline=self.state.timeline)
        self.snapshots.drop_staged()
        restored = self.commands.restore(command)
        self.last_validation = None  # the validations reported since the LKG are undone
        return restored


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _as_tensor(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A tensor as it is (the vitals buffer detaches it), a number as a 0-d tensor on ``device``."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value), device=device)


def governance_for(
    governor: str | Governance | None, run_id: str, dist: Distributed, options: GovernedOptions
) -> Governance:
    """The Governance for a ``governor`` argument: none (Ungoverned), the one given, or a connection to its
    address (``client.factory``, imported only then: an ungoverned run loads no gRPC)."""
    if governor is None:
        return Ungoverned()
    if not isinstance(governor, str):
        return governor
    from tolaria_trainer.client.factory import connect

    return connect(governor, run_id, dist.rank, dist.world_size, options)


__all__ = [
    "GovernedOptions",
    "GovernedTraining",
    "GovernorRefused",
    "GovernorUnreachable",
    "Outcome",
    "Progress",
    "RollbackFailed",
    "RunHalted",
    "default_run_id",
]
