"""VitalsBuffer: chunks of one timeline each, flushed when full, on a time budget, and on request."""

from __future__ import annotations

import pytest
import torch

from tolaria_trainer.training import VitalsBuffer, VitalsChunk


class ManualClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorder(capacity: int = 64, flush_interval_s: float = 0.1) -> tuple[VitalsBuffer, list[VitalsChunk], ManualClock]:
    chunks: list[VitalsChunk] = []
    clock = ManualClock()
    buffer = VitalsBuffer(torch.device("cpu"), capacity, chunks.append, flush_interval_s, clock)
    return buffer, chunks, clock


def record(buffer: VitalsBuffer, step: int, timeline: int, loss: float = 1.0) -> None:
    buffer.record(step, torch.tensor(loss), torch.tensor(1.0), 0.1, timeline)


def test_a_chunk_never_mixes_timelines() -> None:
    """Steps recorded before a restore keep their timeline: a step of another timeline flushes the buffer first."""
    buffer, chunks, _ = recorder()
    for step in range(1, 6):
        record(buffer, step, timeline=0, loss=float("nan"))
    for step in range(1, 4):  # restored to step 0, now on timeline 1
        record(buffer, step, timeline=1)
    buffer.flush()
    assert [(c.timeline, list(c.steps)) for c in chunks] == [(0, [1, 2, 3, 4, 5]), (1, [1, 2, 3])]
    assert chunks[0].host().timeline == 0


def test_flushes_on_the_time_budget_before_the_buffer_fills() -> None:
    """D16: a step recorded 100 ms after the first buffered one flushes, so a NaN step does not wait for 64."""
    buffer, chunks, clock = recorder(capacity=64, flush_interval_s=0.1)
    record(buffer, 1, 0)
    clock.now = 0.05
    record(buffer, 2, 0, loss=float("nan"))
    assert chunks == []
    clock.now = 0.1
    record(buffer, 3, 0)
    assert [list(c.steps) for c in chunks] == [[1, 2, 3]]
    clock.now = 0.15  # the interval counts from the first step of the next chunk
    record(buffer, 4, 0)
    assert len(chunks) == 1


def test_flushes_when_full() -> None:
    """Every ``capacity`` steps make a chunk, whatever the clock says."""
    buffer, chunks, _ = recorder(capacity=4, flush_interval_s=60.0)
    for step in range(1, 10):
        record(buffer, step, 0)
    assert [len(c) for c in chunks] == [4, 4]
    assert [r.step for r in chunks[1].records()] == [5, 6, 7, 8]


def test_a_cpu_chunk_holds_host_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the values are read at record time (no device to wait for), so the sender thread builds
    its message without a tensor operation (each would hand the GIL to the training thread and back), and
    an in-place change to the loss tensor after the step does not rewrite its record."""
    buffer, chunks, _ = recorder()
    loss = torch.tensor(2.5, requires_grad=True) * 1.0
    buffer.record(1, loss, torch.tensor(0.5), 0.1, 0)
    with torch.no_grad():
        loss.fill_(9.0)
    buffer.flush()

    def no_tensor_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor operation while building the columns")

    monkeypatch.setattr(torch, "stack", no_tensor_work)
    columns = chunks[0].host()
    assert (columns.losses, columns.grad_norms, columns.lrs) == ([2.5], [0.5], [0.1])


def test_a_one_element_loss_is_one_number_on_every_device() -> None:
    """A loss of shape (1,) is recorded like a 0-d one whether the buffer reads values (CPU) or keeps
    tensors (an accelerator: a mix of shapes used to break the stacking at the flush)."""
    for device in ("cpu", "meta"):  # "meta": a buffer for an accelerator, here holding CPU tensors
        chunks: list[VitalsChunk] = []
        buffer = VitalsBuffer(torch.device(device), 4, chunks.append)
        buffer.record(1, torch.tensor([2.0]), torch.tensor(0.5), 0.1, 0)
        buffer.record(2, torch.tensor(3.0), torch.tensor([0.25]), 0.1, 0)
        buffer.flush()
        columns = chunks[0].host()
        assert (columns.losses, columns.grad_norms) == ([2.0, 3.0], [0.5, 0.25]), device
