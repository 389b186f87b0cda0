"""Per-step vitals gathered on the device without host syncs, handed to a sink in chunks.

The hot loop calls ``record`` with device tensors; nothing there reads a tensor on the host. Every
``capacity`` steps (and on ``flush``) the buffer is copied to the host asynchronously and handed to
the sink as a VitalsChunk; the sink's consumer (a background thread) calls ``records()``, which is
where the only wait happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepVitals:
    """One train-step record on the host."""

    step: int
    loss: float
    grad_norm: float
    lr: float


class VitalsChunk:
    """Records copied (perhaps still copying) to the host."""

    def __init__(
        self, steps: list[int], lrs: list[float], values: torch.Tensor, event: torch.cuda.Event | None
    ) -> None:
        self.steps, self.lrs, self._values, self._event = steps, lrs, values, event

    def records(self) -> list[StepVitals]:
        """Wait for the copy (if on CUDA) and return the records. Call from the consumer thread."""
        if self._event is not None:
            self._event.synchronize()
        rows = self._values.tolist()
        return [StepVitals(s, row[0], row[1], lr) for s, row, lr in zip(self.steps, rows, self.lrs, strict=True)]

    def __len__(self) -> int:
        return len(self.steps)


Sink = Callable[[VitalsChunk], None]


class VitalsBuffer:
    """Device-side buffer of (loss, grad_norm) per step; steps and lrs are host values already."""

    def __init__(self, device: torch.device, capacity: int = 64, sink: Sink | None = None) -> None:
        self.device = device
        self.capacity = capacity
        self.values = torch.zeros(capacity, 2, device=device)
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.sink = sink
        self.chunks: list[VitalsChunk] = []

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """Store one step's vitals (device copies only); flush when full."""
        row = len(self.steps)
        self.values[row].copy_(torch.stack((loss.detach().float(), grad_norm.detach().float())))
        self.steps.append(step)
        self.lrs.append(lr)
        if len(self.steps) == self.capacity:
            self.flush()

    def flush(self) -> VitalsChunk | None:
        """Start the host copy of what is buffered and hand it to the sink (or keep it in ``chunks``)."""
        n = len(self.steps)
        if n == 0:
            return None
        event: torch.cuda.Event | None = None
        if self.device.type == "cuda":
            host = torch.empty((n, 2), dtype=self.values.dtype, pin_memory=True)
            host.copy_(self.values[:n], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        else:
            host = self.values[:n].clone()
        chunk = VitalsChunk(self.steps, self.lrs, host, event)
        self.steps, self.lrs = [], []
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
