"""GovernedTraining around a plain PyTorch loop (no morphogenetic model), with a scripted Governance:
what a restore brings back, the outcomes, HALT and RESUME, fail-closed refusals, ungoverned runs."""

from __future__ import annotations

import math
import random
import threading

import numpy as np
import pytest
import torch
from torch import nn

from tests.unit.trainer.fake_governance import FakeGovernance
from tests.unit.trainer.helpers import assert_bitwise_equal
from tolaria_trainer import GovernedTraining, RunHalted
from tolaria_trainer.governance import CommandType, FinishStatus, GovernorRefused, VerdictKind
from tolaria_trainer.training import VitalsBuffer


class Position:
    """A data-loader position with state_dict/load_state_dict (like torchdata's StatefulDataLoader)."""

    def __init__(self) -> None:
        self.batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = state["batches"]


def plain_setup(seed: int = 0) -> tuple[nn.Module, list[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    body = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
    head = torch.optim.SGD(model[2].parameters(), lr=5e-2, momentum=0.9)
    return model, [body, head], torch.optim.lr_scheduler.StepLR(body, step_size=4, gamma=0.5)


def train_steps(gov: GovernedTraining, n: int, position: Position | None = None) -> list[object]:
    model, optimizers = gov.state.model, gov.state.optimizers
    outcomes = []
    for _ in range(n):
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        for scheduler in gov.state.schedulers:
            scheduler.step()
        if position is not None:
            position.batches += 1
        outcomes.append(gov.step(loss))
    return outcomes


def state_of(gov: GovernedTraining) -> dict[str, object]:
    return {
        "model": {k: v.clone() for k, v in gov.state.model.state_dict().items()},
        "optim": [
            {
                pid: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for pid, s in o.state_dict()["state"].items()
            }
            for o in gov.state.optimizers
        ],
        "scheduler": dict(gov.state.schedulers[0].state_dict()),
        "torch_rng": torch.get_rng_state().clone(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "step": gov.state.step,
    }


def test_rollback_restores_everything_in_place_and_says_how() -> None:
    """Two optimizers, a scheduler, RNGs, the user's extra state: all back at the published LKG, in the same
    objects; the outcome names the restored step, the new timeline, the recipe and the punishment."""
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    position = Position()
    gov = GovernedTraining(
        model,
        optimizers,
        governor=fake,
        num_classes=3,
        schedulers=[scheduler],
        extra_state=position,
        agree_every_steps=5,
    )
    params = [id(p) for p in model.parameters()]
    with gov:
        train_steps(gov, 10, position)
        seq = gov.report_validation(1.0, 0.5, epoch=1)
        fake.verdict_on(seq)
        assert not gov.agreement_point().restored
        assert gov.lkg.info is not None
        assert gov.lkg.info.step == 10, "the verdict published the staged snapshot"
        lkg = state_of(gov)
        train_steps(gov, 3, position)  # steps 11..13: trained on, to be undone
        fake.order(CommandType.ROLLBACK, skip=7, lr_scale=0.5, punishment=-10.0)
        (outcome,) = train_steps(gov, 1, position)  # one rank executes a command at its next step
    assert outcome.restored
    assert not outcome.halted
    assert (outcome.restored_step, outcome.restored_epoch, outcome.timeline) == (10, 1, 1)
    assert (outcome.skip_batches, outcome.lr_scale, outcome.punishment_reward) == (7, 0.5, -10.0)
    restored = state_of(gov)
    for group_lrs in ("scheduler",):  # the LR scale moved the schedulers' base LRs: compare the rest bit for bit
        restored[group_lrs] = lkg[group_lrs] = None
    assert_bitwise_equal(restored, lkg)
    assert [id(p) for p in model.parameters()] == params, "restored in place"
    assert position.batches == 10, "the extra state came back"
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * 1e-2 * 0.5**2), "StepLR at step 10, × 0.5"
    (result,) = fake.results
    assert (result.succeeded, result.restored_step, result.command.timeline_after(True)) == (True, 10, 1)
    assert fake.finish is not None
    assert fake.finish.status is FinishStatus.COMPLETED
    assert fake.finish.num_rollbacks == 1
    assert fake.finish.final_validation_loss is None, "the validation before the restore no longer describes the model"


def test_steps_carry_the_timeline_they_were_produced_on() -> None:
    """Steps before a restore are sent on timeline 0, the ones after on timeline 1; losses are the real ones."""
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    with GovernedTraining(model, optimizers, governor=fake, schedulers=[scheduler], agree_every_steps=4) as gov:
        train_steps(gov, 3)
        fake.order(CommandType.ROLLBACK)
        train_steps(gov, 3)
    timelines = [(timeline, step) for timeline, step, _ in fake.steps]
    assert timelines == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert all(math.isfinite(loss) and loss > 0 for _, _, loss in fake.steps)


def test_halt_then_resume_restores_and_halt_without_resume_stops_the_run() -> None:
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    with GovernedTraining(
        model, optimizers, governor=fake, schedulers=[scheduler], agree_every_steps=2, halt_wait_s=0.5
    ) as gov:
        train_steps(gov, 1)
        fake.order(CommandType.HALT)
        resume = threading.Timer(0.1, fake.order, (CommandType.RESUME,))  # a controller, while the run waits
        resume.start()
        outcome = train_steps(gov, 1)[0]
        resume.join()
        assert outcome.restored
        assert outcome.command is not None
        assert outcome.command.type is CommandType.RESUME
        assert (outcome.restored_step, outcome.timeline) == (0, 1)
        fake.order(CommandType.HALT)
        outcome = train_steps(gov, 1)[-1]  # executed at the next step: one rank needs no agreement point
        assert outcome.halted
        assert not outcome.restored
        with pytest.raises(RunHalted, match="scripted HALT"):
            gov.step(1.0)
    assert [r.command.type for r in fake.results] == [CommandType.HALT, CommandType.RESUME, CommandType.HALT]


def test_a_panic_verdict_never_publishes_its_snapshot() -> None:
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    with GovernedTraining(model, optimizers, governor=fake, schedulers=[scheduler], agree_every_steps=0) as gov:
        train_steps(gov, 4)
        seq = gov.report_validation(float("nan"), epoch=1)
        fake.verdict_on(seq, VerdictKind.PANIC, allowed=False)
        fake.order(CommandType.ROLLBACK)
        outcome = gov.agreement_point()
    assert outcome.restored
    assert outcome.restored_step == 0
    assert [s.step for s in fake.snapshots] == [0], "only the initial LKG"
    assert math.isnan(fake.validations[seq].loss), "a NaN loss is reported as it is"


def test_fail_closed_refusal_raises_and_fail_open_refusal_trains_ungoverned() -> None:
    model, optimizers, _ = plain_setup()
    refused = FakeGovernance(refusal=GovernorRefused("UNAUTHENTICATED", "bad token"), connected=False)
    with pytest.raises(GovernorRefused, match="bad token"):
        GovernedTraining(model, optimizers, governor=refused, fail_closed=True).start()
    refused = FakeGovernance(refusal=GovernorRefused("UNAUTHENTICATED", "bad token"), connected=False)
    with GovernedTraining(model, optimizers, governor=refused, agree_every_steps=2) as gov:
        train_steps(gov, 4)
        gov.validate(1.0)
        assert not gov.governed
    assert refused.finish is None, "a governor that refused the trainer is not told anything more"


def test_ungoverned_training_stages_nothing() -> None:
    model, optimizers, scheduler = plain_setup()
    with GovernedTraining(model, optimizers, governor=None, schedulers=[scheduler], agree_every_steps=2) as gov:
        train_steps(gov, 6)
        outcome = gov.validate(0.9, 0.6, epoch=1)
        assert not outcome.restored
        assert gov.lkg.staged_info is None
        assert not gov.governed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "at least 2"),
        ({"num_classes": 3, "random_guess_loss": 1.0}, "not both"),
        ({"random_guess_loss": float("nan")}, "positive finite"),
        ({"agree_every_steps": -1}, ">= 0"),
        ({"extra_state": object()}, "extra_state must be a dict"),
        ({"governor": "localhost"}, "governor 'localhost': no port"),
        ({"governor": "127.0.0.1:99999"}, "not a number in 1..65535"),
        ({"governor": "http://127.0.0.1:50051"}, "no URL"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict[str, object], message: str) -> None:
    model, optimizers, _ = plain_setup()
    arguments: dict[str, object] = {"governor": None, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        GovernedTraining(model, optimizers, **arguments)  # type: ignore[arg-type]


def test_a_per_sample_loss_is_a_clear_error_that_changes_nothing() -> None:
    """step() takes one number: a loss left unreduced (or a grad norm per parameter) is refused before the
    step is counted or recorded, on the CPU (values read at once) as on an accelerator (tensors kept)."""
    model, optimizers, _ = plain_setup()
    with GovernedTraining(model, optimizers, governor=None) as gov:
        train_steps(gov, 2)
        with pytest.raises(ValueError, match=r"must each be one number .*got shapes \(4,\) and \(\)"):
            gov.step(torch.ones(4), torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"got shapes \(\) and \(2,\)"):
            gov.step(torch.tensor(1.0), torch.ones(2))
        assert gov.state.step == 2
        assert gov.vitals.steps == [1, 2]
    accelerator = VitalsBuffer(torch.device("meta"))
    with pytest.raises(ValueError, match=r"got shapes \(4,\) and \(\)"):
        accelerator.record(1, torch.ones(4), torch.tensor(1.0), 0.1, 0)
    assert accelerator.steps == []


def test_step_snapshots_are_vouched_for_by_the_train_stream_and_an_onset_picks_one() -> None:
    """Every step_snapshot_every steps a snapshot is staged; it is published once the governor acknowledged
    the records train_verification_steps past it with no command. A ROLLBACK with an onset goes back to the
    newest snapshot older than the onset (less the margin); one without goes back to the validated LKG."""
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance(train_verification_steps=5)
    with GovernedTraining(
        model,
        optimizers,
        governor=fake,
        schedulers=[scheduler],
        agree_every_steps=10,
        step_snapshot_every=20,
        onset_margin_steps=3,
    ) as gov:
        train_steps(gov, 30)  # staged at step 20, vouched for at 30 (records up to 25 acknowledged)
        assert [(i.step, i.kind) for i in gov.lkg.published] == [(0, "validation"), (20, "step")]
        train_steps(gov, 10)  # staged at 40
        at_40 = {k: v.clone() for k, v in model.state_dict().items()}
        train_steps(gov, 10)  # published at 50: one step snapshot is kept
        assert [(i.step, i.kind) for i in gov.lkg.published] == [(0, "validation"), (40, "step")]
        train_steps(gov, 7)
        fake.order(CommandType.ROLLBACK, onset_step=52)
        outcome = train_steps(gov, 1)[0]
        assert (outcome.restored, outcome.restored_step) == (True, 40)
        assert all(torch.equal(at_40[k], v) for k, v in model.state_dict().items())
        fake.order(CommandType.ROLLBACK)  # no onset: a validation's verdict, or a controller
        outcome = train_steps(gov, 1)[0]
        assert (outcome.restored, outcome.restored_step) == (True, 0)
    assert [s.step for s in fake.snapshots] == [0, 20, 40]


def test_a_step_snapshot_waits_for_the_acks_and_dies_with_a_command() -> None:
    model, optimizers, _ = plain_setup()
    fake = FakeGovernance(train_verification_steps=5, ack_everything=False)
    with GovernedTraining(model, optimizers, governor=fake, agree_every_steps=10, step_snapshot_every=20) as gov:
        train_steps(gov, 40)
        assert gov.step_pending is not None
        assert gov.step_pending.info.step == 20
        assert [i.step for i in gov.lkg.published] == [0], "not acknowledged: not vouched for"
        fake.order(CommandType.ROLLBACK, onset_step=35)
        outcome = train_steps(gov, 1)[0]
        assert (outcome.restored, outcome.restored_step) == (True, 0)
        assert gov.step_pending is None
    without = FakeGovernance(train_verification_steps=None)
    model, optimizers, _ = plain_setup()
    with GovernedTraining(model, optimizers, governor=without, agree_every_steps=10, step_snapshot_every=20) as gov:
        train_steps(gov, 60)
        assert gov.step_pending is None, "no Welcome has said how the train stream vouches: no step snapshots"


def test_with_a_grad_scaler_the_default_grad_norm_is_unscaled_and_an_overflow_is_not_reported() -> None:
    """A scaler's overflowed step is its normal working (it skips the step): the governor sees the last finite
    norm, not inf; other steps report the norm of the unscaled gradients."""
    model, optimizers, _ = plain_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fake = FakeGovernance()
    expected = []
    with GovernedTraining(model, optimizers, governor=fake, grad_scaler=scaler, agree_every_steps=0) as gov:
        for i in range(4):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,)))
            scaler.scale(loss * (math.inf if i == 2 else 1.0)).backward()
            scale = scaler.get_scale()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            expected.append(float(torch.nn.utils.get_total_norm(grads)) / scale)
            gov.step(loss)
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
        gov.validate(1.0)
    assert fake.grad_norms[:2] == pytest.approx(expected[:2], rel=1e-4)
    assert fake.grad_norms[2] == pytest.approx(expected[1], rel=1e-4), "the overflow reports the last finite norm"
    assert fake.grad_norms[3] == pytest.approx(expected[3], rel=1e-4)


@pytest.mark.parametrize("clip", [False, True], ids=["step-then-governor", "unscale-clip-step-then-governor"])
def test_a_grad_scaler_in_the_documented_order_reports_the_norm_divided_once(clip: bool) -> None:
    """Hardening 2: with ``scaler.step`` (which unscales) then ``gov.step``, the default norm was divided by the
    scale a second time (the journal showed 2.4e-07 where the real level was about 0.016). Whether the scaler
    unscaled the gradients itself or the user did before clipping, the governor sees the unscaled norm."""
    model, optimizers, _ = plain_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fake = FakeGovernance()
    expected = []
    with GovernedTraining(model, optimizers, governor=fake, grad_scaler=scaler, agree_every_steps=0) as gov:
        for _ in range(3):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,)))
            scaler.scale(loss).backward()
            if clip:
                for opt in optimizers:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            expected.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            gov.step(loss)
        gov.validate(1.0)
    assert fake.grad_norms == pytest.approx(expected, rel=1e-4)
    assert min(expected) > 0.01, "the unscaled norms, not the scaled or twice-divided ones"


@pytest.mark.parametrize("never_judged", ["num_dropped_records", "num_shed_records"])
def test_records_never_judged_doom_a_step_snapshot(never_judged: str) -> None:
    """Review finding: records dropped under back-pressure were never judged, yet a later Ack vouched for them.
    Records the governor shed (acknowledged unjudged because it was behind) are the same case."""
    model, optimizers, _ = plain_setup()
    fake = FakeGovernance(train_verification_steps=5, ack_everything=False)
    with GovernedTraining(model, optimizers, governor=fake, agree_every_steps=10, step_snapshot_every=20) as gov:
        train_steps(gov, 20)
        assert gov.step_pending is not None
        setattr(fake, never_judged, 7)
        fake.ack_everything = True
        train_steps(gov, 20)  # 30: the one of step 20 is discarded, another staged; 40: that one is vouched for
        assert [(i.step, i.kind) for i in gov.lkg.published] == [(0, "validation"), (30, "step")]


def test_no_optimizer_step_is_applied_on_a_nan_loss() -> None:
    """The step guard: a step whose gradients are not finite leaves the weights and the optimizer state as
    they were (as GradScaler skips inf steps), at once, while the governor's ROLLBACK is on its way; the
    run is then condemned (a validation waits for the command)."""
    model, optimizers, _ = plain_setup()
    fake = FakeGovernance()
    with GovernedTraining(model, optimizers, governor=fake, agree_every_steps=0) as gov:
        train_steps(gov, 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        moments = {k: v.clone() for k, v in optimizers[0].state_dict()["state"][0].items()}
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))) * math.nan
        loss.backward()
        for opt in optimizers:
            opt.step()
        gov.step(loss)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "no NaN reached the weights"
        after = optimizers[0].state_dict()["state"][0]
        assert all(torch.equal(moments[k], after[k]) for k in moments), "the optimizer state did not move"
        assert gov.guard is not None
        assert gov.guard.num_non_finite_skipped == 2
        gov.vitals.flush()
        assert math.isnan(fake.steps[-1][2]), "the governor still sees the NaN"
        assert gov.condemned
        fake.order(CommandType.ROLLBACK)
        outcome = gov.before_validation()
        assert outcome.restored, "the condemned weights are restored before anything validates them"
        assert not gov.condemned


def test_a_restore_skips_its_batches_in_the_data_or_in_the_updates() -> None:
    """The recipe's skip: a loop that skips in its data takes it (take_skip); one that does not has that many
    batches computed but not applied (the step guard), nor recorded."""
    model, optimizers, _ = plain_setup()
    fake = FakeGovernance()
    with GovernedTraining(model, optimizers, governor=fake, agree_every_steps=0) as gov:
        train_steps(gov, 5)
        fake.order(CommandType.ROLLBACK, skip=3)
        (outcome,) = train_steps(gov, 1)
        assert (outcome.restored, outcome.skip_batches) == (True, 3)
        assert gov.take_skip() == 3
        assert gov.take_skip() == 0
        fake.order(CommandType.ROLLBACK, skip=2)
        train_steps(gov, 1)
        recorded = len(fake.steps)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        train_steps(gov, 2)  # the two skipped batches: not applied, not recorded, not counted
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        assert (len(fake.steps), gov.state.step) == (recorded, 0)
        assert gov.guard is not None
        assert gov.guard.num_skipped_updates == 4  # two optimizers, two batches
        train_steps(gov, 1)
        assert gov.state.step == 1


def test_a_rollback_with_an_onset_never_restores_a_snapshot_taken_at_or_after_it() -> None:
    """Review finding (onset 898): corrupt batches from step 898 and a healthy-looking validation at 900; the
    validation's snapshot waits for the train stream to vouch for it (900 + the detectors' lag), the alarm
    with onset 898 comes first and discards it, and the restore goes back before the onset. Before, the
    verdict alone published step 900's snapshot, it replaced every older one, and the ROLLBACK restored it."""
    model, optimizers, _ = plain_setup()
    fake = FakeGovernance(train_verification_steps=10)
    with GovernedTraining(model, optimizers, governor=fake, agree_every_steps=0, step_snapshot_every=10**6) as gov:
        train_steps(gov, 850)
        seq = gov.report_validation(1.0, epoch=1)
        fake.verdict_on(seq)
        train_steps(gov, 20)
        gov.agreement_point()
        assert [i.step for i in gov.lkg.published] == [0, 850], "850 vouched for by the records up to 860"
        train_steps(gov, 30)  # to step 900; corrupt batches from 898 (the governor has not said so yet)
        seq = gov.report_validation(1.1, epoch=2)
        fake.verdict_on(seq)  # the validation looks healthy
        gov.agreement_point()
        assert [i.step for i in gov.lkg.published] == [0, 850], "900 waits for the records up to 910"
        train_steps(gov, 3)
        fake.order(CommandType.ROLLBACK, onset_step=898)
        (outcome,) = train_steps(gov, 1)
    assert outcome.restored
    assert outcome.restored_step == 850
    assert [s.step for s in fake.snapshots] == [0, 850]
