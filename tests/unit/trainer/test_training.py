"""Epoch functions, validation metrics, vitals, tasks and fault injection on real data."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.unit.trainer.helpers import make_state
from tolaria_trainer.errors import ScheduleError, TaskError
from tolaria_trainer.faults import FaultInjector, parse_fault
from tolaria_trainer.tasks import TASKS, create_model, get_task
from tolaria_trainer.training import (
    TrainingState,
    VitalsBuffer,
    adam,
    step_recorder,
    train_epoch_blended,
    train_epoch_normal,
    train_epoch_womb_mode,
    validate_and_get_metrics,
)


class FixedModel(torch.nn.Module):
    """Returns preset logits, to check metrics against a hand count."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.calls : self.calls + len(x)]
        self.calls += len(x)
        return out


def test_per_class_accuracy_matches_hand_count() -> None:
    """Per-class accuracy by bincount equals counting by hand."""
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0, 2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5
    state = make_state()
    state.forward = FixedModel(logits)
    loader = DataLoader(TensorDataset(torch.zeros(10, 16), y), batch_size=4)
    metrics = validate_and_get_metrics(state, loader, torch.nn.CrossEntropyLoss(), 3)
    hand = [
        sum(1 for t, p in zip(y.tolist(), pred.tolist(), strict=True) if t == c and p == c) / y.tolist().count(c)
        for c in range(3)
    ]
    assert metrics.per_class_accuracy == pytest.approx(hand)
    assert metrics.per_class_accuracy == pytest.approx([2 / 3, 2 / 3, 3 / 4])
    assert metrics.accuracy == pytest.approx(7 / 10)
    expected_loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert metrics.loss == pytest.approx(expected_loss, rel=1e-5)


def test_hot_loop_never_reads_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our training loop calls no Tensor.item/tolist/__float__/__bool__; vitals come out afterwards.

    Reads made inside torch itself (Adam reads its CPU step counter) are let through: on CUDA they are
    no device sync, and the GPU test checks real syncs under sync debug mode. The buffer is one for an
    accelerator (it keeps the step tensors): a buffer for the CPU reads each value by design, which
    syncs nothing (test_vitals.py).
    """
    import sys

    state = make_state(scheduler=False)
    task = get_task("synthetic")
    data = task.load(None, 64, state.generator)
    vitals = VitalsBuffer(torch.device("meta"), capacity=5)
    batches = list(data.train)
    offenders: list[str] = []

    def guard(name: str):  # type: ignore[no-untyped-def]
        original = getattr(torch.Tensor, name)

        def checked(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("tolaria_trainer"):
                offenders.append(f"{caller} called Tensor.{name}")
            return original(self, *args, **kwargs)

        return checked

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, guard(name))
        stats = train_epoch_normal(state, batches, task.loss_fn(), step_recorder(state, vitals))
    assert offenders == []
    vitals.flush()
    records = vitals.drain()
    assert [r.step for r in records] == list(range(1, stats.num_steps + 1))
    assert all(math.isfinite(r.loss) and r.grad_norm > 0 and r.lr == 1e-2 for r in records)


def test_womb_and_blended_epochs_step_the_right_optimizers() -> None:
    """Womb mode steps host and seed (host forward unchanged); blended epochs train the blended seed."""
    state = make_state(scheduler=False)
    task = get_task("synthetic")
    data = task.load(None, 64, state.generator)
    vitals = VitalsBuffer(state.device, 16)
    state.germinate("slot0", "residual")
    seed = state.model.slot("slot0").seed
    assert seed is not None
    before = [p.clone() for p in seed.parameters()]
    host_before = state.model.head.weight.clone()
    train_epoch_womb_mode(state, data.train, task.loss_fn(), step_recorder(state, vitals))
    assert any(not torch.equal(a, b) for a, b in zip(before, seed.parameters(), strict=True))
    assert not torch.equal(host_before, state.model.head.weight)
    from tolaria_trainer.model import SeedStage

    state.model.slot("slot0").advance(SeedStage.BLENDING)
    state.model.slot("slot0").set_alpha(0.5)
    mid = [p.clone() for p in seed.parameters()]
    train_epoch_blended(state, data.train, task.loss_fn(), step_recorder(state, vitals))
    assert any(not torch.equal(a, b) for a, b in zip(mid, seed.parameters(), strict=True))


def test_language_model_perplexity(tmp_path: Path) -> None:
    """tinylm reads a text file; validation reports perplexity = exp(loss)."""
    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "input.txt").write_text(text)
    task = get_task("tinylm")
    data = task.load(tmp_path, 64, torch.Generator().manual_seed(0))
    assert data.num_outputs == len(set(text))
    model = create_model(task, "cpu", num_outputs=data.num_outputs)
    state = TrainingState(model, [torch.optim.Adam(model.parameters(), 1e-2)], torch.device("cpu"), adam(1e-2))
    train_epoch_normal(state, data.train, task.loss_fn(), step_recorder(state, VitalsBuffer(state.device)))
    metrics = validate_and_get_metrics(state, data.val, task.loss_fn(), data.num_outputs, is_language_model=True)
    assert metrics.perplexity == pytest.approx(math.exp(metrics.loss))
    assert metrics.loss < math.log(data.num_outputs)


def write_cifar(folder: Path, n: int = 40) -> None:
    """Small files in the CIFAR-10 python batch format."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)


def test_cifar10_from_python_batches(tmp_path: Path) -> None:
    """cifar10 reads the standard python batches and trains a conv host on them."""
    write_cifar(tmp_path / "cifar-10-batches-py")
    task = get_task("cifar10")
    data = task.load(tmp_path, 16, torch.Generator().manual_seed(0))
    assert "80 train / 40 test" in data.description
    model = create_model(task, "cpu")
    x, _ = next(iter(data.train))
    assert x.shape == (16, 3, 32, 32)
    assert model(x).shape == (16, 10)
    with pytest.raises(TaskError, match=r"data_batch_1\.\.5 and test_batch"):
        task.load(tmp_path / "nowhere", 16, torch.Generator())


def test_task_registry() -> None:
    """The four tasks are registered; an unknown one lists them."""
    assert set(TASKS) == {"digits", "synthetic", "cifar10", "tinylm"}
    with pytest.raises(TaskError, match="tasks: cifar10, digits, synthetic, tinylm"):
        get_task("mnist")


def test_parse_faults() -> None:
    """Fault specs parse with defaults; malformed ones say the syntax."""
    assert parse_fault("spike@epoch=13:x50:epochs=2").__dict__ | {} == {
        "kind": "spike",
        "unit": "epoch",
        "at": 13,
        "factor": 50.0,
        "epochs": 2,
        "seconds": 3600.0,
        "spec": "spike@epoch=13:x50:epochs=2",
        "rank": None,
        "timeline": None,
        "attempt": None,
    }
    assert parse_fault("lr-blowup@step=3000:x1000").factor == 1000.0
    assert parse_fault("hang@epoch=15:s=2").seconds == 2.0
    for bad, message in (
        ("nan@step=3", "lr-blowup is given @step"),
        ("boom@epoch=1", "unknown fault"),
        ("nan", "expected KIND@epoch=N"),
    ):
        with pytest.raises(ScheduleError, match=message):
            parse_fault(bad)


def test_a_fault_with_a_timeline_waits_for_it() -> None:
    """nan@epoch=2:timeline=1 does not fire on timeline 0, even past its epoch; it fires once the trainer
    is on timeline 1 (a chain of faults, each after the previous rollback)."""
    state = make_state(scheduler=False)
    injector = FaultInjector([parse_fault("nan@epoch=2:timeline=1")])
    assert injector.before_epoch(state, 3) == []
    state.timeline = 1
    assert injector.before_epoch(state, 3) == ["nan@epoch=2:timeline=1"]
    assert injector.before_epoch(state, 4) == []


def test_faults_fire_once() -> None:
    """nan, lobotomy, spike and lr-blowup fire once each, never again after a restore."""
    state = make_state(scheduler=False)
    injector = FaultInjector(
        [parse_fault(s) for s in ("nan@epoch=2", "spike@epoch=3:x10:epochs=2", "lr-blowup@step=5:x100")]
    )
    assert injector.before_epoch(state, 1) == []
    assert injector.before_epoch(state, 2) == ["nan@epoch=2"]
    assert torch.isnan(state.model.head.weight).all()
    assert injector.before_epoch(state, 2) == []
    injector.before_epoch(state, 3)
    assert [injector.reported_loss(1.0) for _ in range(3)] == [10.0, 10.0, 1.0]
    state.step = 5
    assert injector.on_step(state) == ["lr-blowup@step=5:x100"]
    assert state.host_optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    state.step = 6
    assert injector.on_step(state) == []
    lobotomy = FaultInjector([parse_fault("lobotomy@epoch=1")])
    lobotomy.before_epoch(state, 1)
    logits = state.model(torch.randn(4, 16))
    assert torch.equal(logits, torch.zeros_like(logits))


@pytest.mark.slow
def test_digits_reaches_90_percent_and_recovers_from_nan() -> None:
    """15 epochs on digits reach >= 90 %; with NaN injected at epoch 8 and a rollback, still >= 90 %."""
    from tolaria_trainer.rollback import CommandLedger, execute_restore
    from tolaria_trainer.snapshot import LastKnownGood

    task = get_task("digits")
    results = {}
    for inject in (False, True):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        data = task.load(None, 32, generator)
        model = create_model(task, "cpu")
        state = TrainingState(
            model, [torch.optim.Adam(model.parameters(), 1e-3)], torch.device("cpu"), adam(1e-3), generator=generator
        )
        vitals = VitalsBuffer(state.device, 64)
        lkg, ledger = LastKnownGood("host"), CommandLedger()
        lkg.take(state)
        injector = FaultInjector([parse_fault("nan@epoch=8")] if inject else [])
        loss_fn = task.loss_fn()
        rollbacks = 0
        while state.epoch < 15:
            epoch = state.epoch + 1
            injector.before_epoch(state, epoch)
            train_epoch_normal(state, data.train, loss_fn, step_recorder(state, vitals))
            state.epoch = epoch
            metrics = validate_and_get_metrics(state, data.val, loss_fn, 10)
            if not math.isfinite(metrics.loss):  # the test plays the governor: roll back to the LKG
                outcome = execute_restore(state, lkg, ledger, rollbacks + 1, "nan", state.timeline + 1)
                assert outcome.succeeded
                rollbacks += 1
                continue
            lkg.take(state)
        results[inject] = (metrics.accuracy, rollbacks, state.timeline)
    assert results[False][0] >= 0.90
    assert results[False][1] == 0
    accuracy, rollbacks, timeline = results[True]
    assert accuracy >= 0.90
    assert (rollbacks, timeline) == (1, 1)


@pytest.mark.slow
def test_compiled_forward_trains_like_eager() -> None:
    """With torch.compile (aot_eager backend here, for speed) a step gives the eager step's loss."""
    from tolaria_trainer.training import enable_compile

    losses = []
    for compiled in (False, True):
        state = make_state(scheduler=False, seed=3)
        if compiled:
            enable_compile(state, backend="aot_eager")
        x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
        vitals = VitalsBuffer(state.device, 4)
        train_epoch_normal(state, [(x, y)] * 2, get_task("synthetic").loss_fn(), step_recorder(state, vitals))
        vitals.flush()
        losses.append([r.loss for r in vitals.drain()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_seed_gradient_checkpointing_gives_same_gradients() -> None:
    """Womb mode with a checkpointed seed computes the same seed gradients."""
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(5)
        task = get_task("synthetic")
        model = create_model(task, "cpu", checkpoint_seeds=checkpoint)
        state = TrainingState(model, [torch.optim.SGD(model.parameters(), 0.1)], torch.device("cpu"), adam(1e-2))
        state.germinate("slot0", "residual")
        seed = state.model.slot("slot0").seed
        assert seed is not None
        for p in seed.parameters():
            torch.nn.init.normal_(p)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
        task.loss_fn()(state(x), torch.arange(8) % 4).backward()
        grads.append([p.grad.clone() for p in seed.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b)


def test_hang_fault_sleeps_once() -> None:
    """hang@epoch=N:s=S stops progress for S seconds, once."""
    import time

    state = make_state()
    injector = FaultInjector([parse_fault("hang@epoch=1:s=0.2")])
    started = time.monotonic()
    assert injector.before_epoch(state, 1) == ["hang@epoch=1:s=0.2"]
    assert time.monotonic() - started >= 0.2
    assert injector.before_epoch(state, 1) == []


def test_an_attempt_limited_fault_strikes_only_in_that_launcher_attempt() -> None:
    """``:attempt=A``: a transient fault that torchrun's restart (attempt 1) does not meet again."""
    fault = parse_fault("hang@epoch=4:s=600:rank=1:attempt=0")
    assert (fault.rank, fault.attempt) == (1, 0)
    assert FaultInjector([fault], rank=1, attempt=0).faults == [fault]
    assert FaultInjector([fault], rank=1, attempt=1).faults == []
    assert FaultInjector([fault], rank=0, attempt=0).faults == []
    assert FaultInjector([parse_fault("hang@epoch=4")], attempt=3).faults, "without :attempt, every attempt"
