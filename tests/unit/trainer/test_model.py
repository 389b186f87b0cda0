"""Seeds, slots, stages, blueprints, schedules, device validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolaria_trainer.device import parse_device
from tolaria_trainer.errors import DeviceError, ScheduleError, StageTransitionError
from tolaria_trainer.model import BLUEPRINTS, SeedSlot, SeedSlotProtocol, SeedStage, parse_schedule


@settings(max_examples=50, deadline=None)
@given(
    blueprint=st.sampled_from(sorted(BLUEPRINTS)),
    batch=st.integers(min_value=1, max_value=8),
    scale=st.floats(min_value=0.01, max_value=100.0),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_womb_mode_forward_equals_host_and_seed_learns(blueprint: str, batch: int, scale: float, seed: int) -> None:
    """In TRAINING the slot output equals the host features exactly; the seed gets gradients, the host input sees none from it."""
    torch.manual_seed(seed)
    slot = SeedSlot("s", 12)
    seed_module = slot.germinate(blueprint)
    slot.advance(SeedStage.TRAINING)
    for p in seed_module.parameters():  # make the seed's output non-zero
        torch.nn.init.normal_(p)
    h = (torch.randn(batch, 12) * scale).requires_grad_(True)
    out = slot(h)
    assert torch.equal(out, h)
    weights = torch.randn(batch, 12)
    (out * weights).sum().backward()
    grads = [p.grad for p in seed_module.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)
    assert h.grad is not None
    assert torch.equal(h.grad, weights), "the host's gradient is exactly the downstream gradient"


def test_blending_and_fossilized_outputs() -> None:
    """BLENDING adds alpha × seed; PROBATIONARY and FOSSILIZED add the whole seed."""
    torch.manual_seed(0)
    slot = SeedSlot("s", 6)
    seed = slot.germinate("residual")
    for p in seed.parameters():
        torch.nn.init.normal_(p)
    h = torch.randn(3, 6)
    slot.advance(SeedStage.TRAINING)
    slot.advance(SeedStage.BLENDING)
    slot.set_alpha(0.25)
    assert torch.allclose(slot(h), h + 0.25 * seed(h))
    slot.advance(SeedStage.PROBATIONARY)
    assert slot.alpha == 1.0
    slot.advance(SeedStage.FOSSILIZED)
    assert torch.allclose(slot(h), h + seed(h))


def test_stage_transitions_enforced() -> None:
    """Only the lifecycle's transitions are allowed; culling a live seed removes it."""
    slot = SeedSlot("s", 4)
    assert isinstance(slot, SeedSlotProtocol)
    with pytest.raises(StageTransitionError, match="DORMANT -> TRAINING is not allowed"):
        slot.advance(SeedStage.TRAINING)
    slot.germinate("lowrank")
    with pytest.raises(StageTransitionError, match="GERMINATED -> FOSSILIZED"):
        slot.advance(SeedStage.FOSSILIZED)
    slot.advance(SeedStage.TRAINING)
    slot.cull("test")
    assert (slot.stage, slot.seed, slot.cull_reason) == (SeedStage.CULLED, None, "test")
    slot.germinate("residual")  # a culled slot can grow again
    with pytest.raises(StageTransitionError, match="unknown blueprint"):
        SeedSlot("t", 4).germinate("oak")


def test_fossilized_seed_cannot_be_culled_or_moved() -> None:
    """FOSSILIZED is final: cull is a no-op, no transition is allowed."""
    slot = SeedSlot("s", 4)
    slot.germinate("residual")
    for stage in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED):
        slot.advance(stage)
    slot.cull("no")
    assert slot.stage is SeedStage.FOSSILIZED
    assert slot.seed is not None
    with pytest.raises(StageTransitionError):
        slot.advance(SeedStage.CULLED)


def test_parse_schedule() -> None:
    """The schedule grammar, with slot prefixes and blend lengths."""
    events = parse_schedule("germinate:residual@2, blend:3@4, fossilize@7, slot1/germinate:lowrank@3")
    assert [(e.epoch, e.slot, e.action, e.blueprint, e.blend_epochs) for e in events] == [
        (2, "slot0", "germinate", "residual", 2),
        (3, "slot1", "germinate", "lowrank", 2),
        (4, "slot0", "blend", "", 3),
        (7, "slot0", "fossilize", "", 2),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("germinate@2", "germinate needs a blueprint"),
        ("grow:residual@2", "unknown action 'grow'"),
        ("blend@x", "expected [SLOT/]ACTION[:ARG]@EPOCH"),
        ("fossilize:now@3", "fossilize takes no argument"),
        ("cull@0", "epoch must be >= 1"),
    ],
)
def test_schedule_errors(text: str, message: str) -> None:
    """Malformed schedules raise ScheduleError naming the item."""
    with pytest.raises(ScheduleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpu", "unknown device type 'gpu'"),
        ("cuda:", "malformed device 'cuda:'"),
        ("cpu:1", "the CPU has no index other than 0"),
        ("tpu:0", "unknown device type 'tpu'"),
    ],
)
def test_device_validation_messages(spec: str, message: str) -> None:
    """Bad device strings raise DeviceError saying how to fix them."""
    with pytest.raises(DeviceError, match=message):
        parse_device(spec)


def test_cuda_validation_without_or_with_cuda() -> None:
    """Without CUDA 'cuda' says so and suggests cpu; with CUDA an index past the count is refused."""
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"CUDA is not available here.*use --device cpu"):
            parse_device("cuda:0")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(DeviceError, match=f"only {count} CUDA device"):
            parse_device(f"cuda:{count}")
    assert parse_device(" CPU ") == torch.device("cpu")
