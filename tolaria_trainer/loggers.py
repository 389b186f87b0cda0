"""Governor events in the user's own tools: TensorBoard, Weights & Biases, a framework's logger, any callable.

::

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter("runs/exp1")
    with GovernedTraining(model, optimizer, governor=address, loggers=[writer, wandb.run, print]) as gov:
        ...

``GovernedTraining`` hands each logger a ``GovernorEvent`` whenever the governor's orders changed the run:
a restore (ROLLBACK or RESUME), a HALT, a halt that outlasted ``halt_wait_s``, a restore that failed, and,
at agreement points, a rise in the records the governor never judged (shed, stale or dropped). Nothing is
logged while nothing happens: the per-step path never touches a logger. An event's ``scalars()`` are the
``governor/*`` series (``SCALARS``) and ``text()`` the decision with its reason (``governor/decision``),
both at ``event.step``: the governed step at which it happened (before a restore rewinds it).

A logger is one of:

* an object with ``log_event(event)`` (the ``GovernorLogger`` protocol), used as it is;
* a TensorBoard ``SummaryWriter`` (or anything with ``add_scalar`` and ``add_text``): scalars and the
  decision as text at ``event.step``, flushed at once;
* an object with ``log_metrics(metrics, step)`` (a Lightning logger, say): the scalars at ``event.step``;
* a ``wandb`` run (``log`` and ``define_metric``): the scalars and the decision, added to the run's current
  row (``commit=False``) with ``governor/step`` as their x-axis, so the run's own step is never disturbed;
* any other callable: called with the ``GovernorEvent``.

A logger that raises is reported (a warning naming it) and the run goes on: logging never stops training.
Under torchrun, pass loggers on the ranks that should write (usually rank 0 only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("tolaria.loggers")

SCALARS = (
    "governor/rollbacks",
    "governor/restores",
    "governor/timeline",
    "governor/restored_step",
    "governor/punishment",
    "governor/lr_scale",
    "governor/skip_batches",
    "governor/halted",
    "governor/shed_records",
    "governor/unjudged_records",
)
"""Every scalar an event may carry (``restored_step``, ``punishment``, ``lr_scale`` and ``skip_batches``
only when a command was executed; the others always)."""

DECISION_TAG = "governor/decision"
"""The tag (key) of the decision's text."""

KINDS = ("rollback", "resume", "halt", "halted", "restore_failed", "records")
"""``rollback``/``resume``: the LKG was restored in place; ``halt``: a HALT arrived (training waits for a
RESUME up to ``halt_wait_s``); ``halted``: no RESUME came, the loop must stop; ``restore_failed``: a
restore failed (RollbackFailed follows); ``records``: more records went unjudged since the last event."""


@dataclass(frozen=True)
class GovernorEvent:
    """What the governor's orders did to the run, at ``step``. Counters are the run's totals so far."""

    kind: str
    step: int
    """The governed step at which it happened (``GovernedTraining.state.step`` before a restore)."""
    timeline: int
    """The timeline training goes on with (after a restore, the new one)."""
    num_rollbacks: int
    num_restores: int
    num_shed_records: int
    """Train-step records the governor acknowledged without judging them because it was behind."""
    num_unjudged_records: int
    """Records the governor never judged otherwise: journaled stale, or dropped here under back-pressure."""
    command_id: int | None = None
    command_type: str = ""
    reason: str = ""
    restored_step: int | None = None
    punishment_reward: float = 0.0
    lr_scale: float = 1.0
    skip_batches: int = 0

    @property
    def halted(self) -> bool:
        """The loop must stop (a HALT that no RESUME followed within ``halt_wait_s``)."""
        return self.kind == "halted"

    def scalars(self) -> dict[str, float]:
        """The ``governor/*`` scalars of this event (a subset of ``SCALARS``)."""
        values: dict[str, float] = {
            "governor/rollbacks": float(self.num_rollbacks),
            "governor/restores": float(self.num_restores),
            "governor/timeline": float(self.timeline),
            "governor/halted": 1.0 if self.halted else 0.0,
            "governor/shed_records": float(self.num_shed_records),
            "governor/unjudged_records": float(self.num_unjudged_records),
        }
        if self.command_id is not None:
            values["governor/punishment"] = float(self.punishment_reward)
            values["governor/lr_scale"] = float(self.lr_scale)
            values["governor/skip_batches"] = float(self.skip_batches)
        if self.restored_step is not None:
            values["governor/restored_step"] = float(self.restored_step)
        return values

    def text(self) -> str:
        """One line: what happened and why ("rollback (command 1) at step 100: restored step 96 on timeline
        1: non-finite train loss nan at step 97 (rank 0)")."""
        head = f"{self.kind} (command {self.command_id})" if self.command_id is not None else self.kind
        where = f"{head} at step {self.step}"
        if self.kind == "records":
            return (
                f"{where}: {self.num_shed_records} record(s) shed and {self.num_unjudged_records} otherwise "
                "never judged by the governor so far"
            )
        if self.restored_step is not None:
            where += f": restored step {self.restored_step} on timeline {self.timeline}"
        return f"{where}: {self.reason}" if self.reason else where


@runtime_checkable
class GovernorLogger(Protocol):
    """The one hook: called on the training thread, rarely (never per step); it should not block long."""

    def log_event(self, event: GovernorEvent) -> None: ...


class TensorBoardLogger:
    """A ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's): each scalar with ``add_scalar``, the
    decision with ``add_text``, at ``event.step``; flushed at once (events are rare, and a run that dies right
    after a rollback should still show it)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.writer!r})"

    def log_event(self, event: GovernorEvent) -> None:
        for tag, value in event.scalars().items():
            self.writer.add_scalar(tag, value, event.step)
        self.writer.add_text(DECISION_TAG, event.text(), event.step)
        self.writer.flush()


class MetricsLogger:
    """An object with ``log_metrics(metrics, step)`` (Lightning's loggers, for one): the scalars at
    ``event.step`` (these take numbers only; the decision's text goes to the Python log); ``save()`` after,
    where it has one."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def __repr__(self) -> str:
        return f"MetricsLogger({self.logger!r})"

    def log_event(self, event: GovernorEvent) -> None:
        self.logger.log_metrics(event.scalars(), step=event.step)
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()


class WandbLogger:
    """A ``wandb`` run: the scalars, ``governor/step`` and the decision's text, added to the run's current row
    without committing it (``commit=False``: the run's own step, which must only grow, is left alone);
    ``governor/step`` is declared the x-axis of ``governor/*``."""

    def __init__(self, run: Any) -> None:
        self.run = run
        run.define_metric("governor/step")
        run.define_metric("governor/*", step_metric="governor/step")

    def __repr__(self) -> str:
        return f"WandbLogger({self.run!r})"

    def log_event(self, event: GovernorEvent) -> None:
        row: dict[str, Any] = {"governor/step": event.step, **event.scalars(), DECISION_TAG: event.text()}
        self.run.log(row, commit=False)


class CallableLogger:
    """Any callable: ``fn(event)``."""

    def __init__(self, fn: Callable[[GovernorEvent], object]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"CallableLogger({self.fn!r})"

    def log_event(self, event: GovernorEvent) -> None:
        self.fn(event)


def as_governor_logger(logger: object) -> GovernorLogger:
    """The adapter for one logger (see the module's docstring); TypeError for anything else."""
    if isinstance(logger, GovernorLogger):
        return logger
    if _has(logger, "add_scalar", "add_text"):
        return TensorBoardLogger(logger)
    if _has(logger, "log_metrics"):
        return MetricsLogger(logger)
    if _has(logger, "log", "define_metric"):
        return WandbLogger(logger)
    if callable(logger):
        return CallableLogger(logger)
    raise TypeError(
        f"loggers: expected a TensorBoard SummaryWriter, a wandb run, a logger with log_metrics(metrics, step), "
        f"an object with log_event(event) or a callable taking a GovernorEvent; got {type(logger).__name__} "
        f"{logger!r:.80}"
    )


def _has(obj: object, *methods: str) -> bool:
    return all(callable(getattr(obj, name, None)) for name in methods)


class GovernorLoggers:
    """The loggers of one run: each event goes to every one of them, in order; one that raises is reported
    and skipped (the others still get the event). Falsy when there are none, so the caller builds no event."""

    def __init__(self, loggers: object = ()) -> None:
        """``loggers``: one logger or a list/tuple of them; TypeError (naming the bad one) before any is used."""
        items: Iterable[object] = loggers if isinstance(loggers, list | tuple) else (loggers,)
        if loggers is None:
            items = ()
        self.loggers: list[GovernorLogger] = [as_governor_logger(item) for item in items]
        self.num_events = 0

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def __len__(self) -> int:
        return len(self.loggers)

    def add(self, logger: object) -> None:
        """One more logger (TypeError for one that is none)."""
        self.loggers.append(as_governor_logger(logger))

    def emit(self, event: GovernorEvent) -> None:
        """Hand ``event`` to every logger; never raises for a logger's failure."""
        self.num_events += 1
        for logger in self.loggers:
            try:
                logger.log_event(event)
            except Exception:
                log.warning(
                    "governor logger %s failed on a %s event; training goes on", logger, event.kind, exc_info=True
                )


__all__ = [
    "DECISION_TAG",
    "KINDS",
    "SCALARS",
    "CallableLogger",
    "GovernorEvent",
    "GovernorLogger",
    "GovernorLoggers",
    "MetricsLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "as_governor_logger",
]
