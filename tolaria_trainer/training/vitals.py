"""Per-step vitals gathered on the device without host syncs, handed to a sink in chunks.

The hot loop calls ``record`` with device tensors; nothing there reads an accelerator's tensor on the
host. (A CPU tensor is read at once: ``item()`` is cheaper than keeping a detached tensor, and the sender
thread then builds its message with no tensor work, which would hand the GIL back and forth with the
training thread.) The buffer is copied to the host asynchronously and handed to the sink as a VitalsChunk
when it holds ``capacity`` steps, when ``flush_interval_s`` has passed since its first step (so a NaN step
reaches the governor within about that time, not only when the buffer fills; reading the host clock is
no device sync), when a step of another timeline arrives (a chunk never mixes timelines: every record
keeps the timeline it was produced on), and on ``flush``. The sink's consumer (a background thread)
calls ``host()``, which is where the only wait happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tolaria_trainer.governance import VitalsColumns
from tolaria_trainer.training.state import TrainingState


@dataclass(frozen=True)
class StepVitals:
    """One train-step record on the host."""

    step: int
    loss: float
    grad_norm: float
    lr: float


# Pinned host copy (CUDA), or per-step columns: host floats (CPU) or detached tensors (another device).
Values = torch.Tensor | tuple[list[Any], list[Any]]


class VitalsChunk:
    """Records of one timeline: on CUDA copied (perhaps still copying) to pinned host memory; on the CPU
    host floats already; on another device the step tensors themselves, stacked by the consumer thread (so
    the training thread does not)."""

    def __init__(
        self,
        timeline: int,
        steps: list[int],
        lrs: list[float],
        values: Values,
        event: torch.cuda.Event | None,
        pins: tuple[int, ...] = (),
    ) -> None:
        self.timeline, self.steps, self.lrs, self._values, self._event = timeline, steps, lrs, values, event
        self.pins = pins
        self._host: VitalsColumns | None = None

    def host(self) -> VitalsColumns:
        """Wait for the copy (if on CUDA) and return the columns (computed once). Call from the consumer
        thread."""
        if self._host is None:
            if self._event is not None:
                self._event.synchronize()
            losses, grads = _host_columns(self._values)
            self._host = VitalsColumns(self.timeline, self.steps, losses, grads, self.lrs, self.pins)
        return self._host

    def records(self) -> list[StepVitals]:
        """The records one by one (waits like ``host``)."""
        c = self.host()
        return [StepVitals(*row) for row in zip(c.steps, c.losses, c.grad_norms, c.lrs, strict=True)]

    def __len__(self) -> int:
        return len(self.steps)


Sink = Callable[[VitalsChunk], None]


def _host_columns(values: Values) -> tuple[list[float], list[float]]:
    """The loss and grad-norm columns as host floats."""
    if isinstance(values, torch.Tensor):  # pinned (n, 2), copied from CUDA
        rows = values.tolist()
        return [row[0] for row in rows], [row[1] for row in rows]
    losses, grads = values
    if losses and isinstance(losses[0], torch.Tensor):  # another device's tensors: stacked here, not in training
        cpu = torch.device("cpu")
        return _stacked(losses, cpu).tolist(), _stacked(grads, cpu).tolist()
    return losses, grads


def _not_scalar(loss: torch.Tensor, grad_norm: torch.Tensor) -> str:
    return (
        "a step's loss and gradient norm must each be one number (reduce a per-sample loss first); got shapes "
        f"{tuple(loss.shape)} and {tuple(grad_norm.shape)}"
    )


def _stacked(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One float32 tensor of 0-d ``tensors`` on ``device``: one kernel when they are there already (the
    usual case), a copy of each only when some are elsewhere (a loss on the GPU, a grad norm on the CPU)."""
    try:
        stacked = torch.stack(tensors)
    except RuntimeError:  # tensors on different devices
        stacked = torch.stack([t.to(device, non_blocking=True) for t in tensors])
    return stacked.to(device, torch.float32, non_blocking=True)


class VitalsBuffer:
    """Device-side buffer of (loss, grad_norm) per step; steps, lrs and the timeline are host values. A step
    only keeps references to its (detached) loss and grad-norm tensors; a chunk stacks them in two kernels.
    On the CPU a step keeps their values (``item()`` reads no accelerator).

    ``clock`` (monotonic seconds) is read once per step for the flush interval.
    """

    def __init__(
        self,
        device: torch.device,
        capacity: int = 64,
        sink: Sink | None = None,
        flush_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.capacity = capacity
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self._on_host = device.type == "cpu"
        self._losses: list[Any] = []  # host floats, or detached 0-d device tensors stacked once per chunk
        self._grads: list[Any] = []
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.timeline = 0
        self.sink = sink
        self.chunks: list[VitalsChunk] = []
        self._first_at = 0.0
        self._pins: list[tuple[int, int]] = []  # (timeline, step) pinned, for the next chunk

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, timeline: int) -> None:
        """Store one step's vitals, produced on ``timeline`` (device copies only); flush when full, when the
        flush interval has passed, or first when ``timeline`` differs from the buffered steps'."""
        loss_value: Any
        grad_value: Any
        if self._on_host:
            try:
                loss_value, grad_value = loss.item(), grad_norm.item()
            except RuntimeError:
                raise ValueError(_not_scalar(loss, grad_norm)) from None
        else:  # detached only when part of a graph (a grad norm seldom is): detach shares the storage anyway
            if loss.dim() or grad_norm.dim():  # one number of shape (1,) is one too (item() takes it on the CPU)
                if loss.numel() != 1 or grad_norm.numel() != 1:
                    raise ValueError(_not_scalar(loss, grad_norm))
                loss, grad_norm = loss.reshape(()), grad_norm.reshape(())
            loss_value = loss.detach() if loss.requires_grad else loss
            grad_value = grad_norm.detach() if grad_norm.requires_grad else grad_norm
        steps = self.steps
        if steps and timeline != self.timeline:
            self.flush()
            steps = self.steps
        now = self.clock()
        if not steps:
            self.timeline, self._first_at = timeline, now
        self._losses.append(loss_value)
        self._grads.append(grad_value)
        steps.append(step)
        self.lrs.append(lr)
        if len(steps) == self.capacity or now - self._first_at >= self.flush_interval_s:
            self.flush()

    def pin(self, step: int, timeline: int) -> None:
        """Ask the governor to keep its detector state as of ``step`` (a snapshot may be staged there); the
        pin travels with the next chunk of ``timeline`` (and is dropped if the next chunk is of another)."""
        self._pins.append((timeline, step))

    def flush(self) -> VitalsChunk | None:
        """Start the host copy of what is buffered and hand it to the sink (or keep it in ``chunks``)."""
        n = len(self.steps)
        if n == 0:
            return None
        device = self.device
        event: torch.cuda.Event | None = None
        host: Values
        if device.type == "cuda":  # kernels belong on the training thread's stream: stack and copy here
            values = torch.stack((_stacked(self._losses, device), _stacked(self._grads, device)), dim=1)
            host = torch.empty((n, 2), dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        else:
            host = (self._losses, self._grads)
        pins = tuple(step for timeline, step in self._pins if timeline == self.timeline)
        chunk = VitalsChunk(self.timeline, self.steps, self.lrs, host, event, pins)
        self.steps, self.lrs, self._losses, self._grads, self._pins = [], [], [], [], []
        if self.sink is not None:
            self.sink(chunk)
        else:
            self.chunks.append(chunk)
        return chunk

    def drain(self) -> list[StepVitals]:
        """All records kept in ``chunks`` (no sink), in order; empties them."""
        out = [r for chunk in self.chunks for r in chunk.records()]
        self.chunks.clear()
        return out


def record_step(state: TrainingState, vitals: VitalsBuffer, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Record one optimizer step's vitals on the state's timeline, then count it (a refused loss counts
    nothing), as ``GovernedTraining.step`` does inline."""
    vitals.record(state.step + 1, loss, grad_norm, state.learning_rate(), state.timeline)
    state.step += 1


def step_recorder(state: TrainingState, vitals: VitalsBuffer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A step hook for the epoch functions that only counts and records (ungoverned, and in tests)."""
    return lambda loss, grad_norm: record_step(state, vitals, loss, grad_norm)
