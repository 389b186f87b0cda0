"""The recovery ladder (policy/recovery.py) through RunPolicy: a fault that recurs after its rollback climbs
one rung per recurrence (restore; an older snapshot and the data skipped; the LR scaled too; HALT with a
diagnosis), a new fault starts at rung 0, Resume starts afresh, and the ladder survives the journal."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from governor_daemon.policy import CommandKind, PolicyConfig, RunPolicy
from governor_daemon.policy.decisions import Command
from governor_daemon.policy.recovery import HALT_RUNG, Recovery

RGL = math.log(50)


def nan_at(policy: RunPolicy, step: int) -> Command:
    """A non-finite train record at ``step`` on the run's timeline; returns the command it caused."""
    steps = np.array([step], dtype=np.int64)
    decision, _ = policy.judge_train_batch(policy.timeline, 0, steps, np.array([math.nan]), None, float(step))
    assert decision is not None
    assert decision.command is not None, decision.reason
    return decision.command


def executed(policy: RunPolicy, command: Command, restored_step: int) -> None:
    """The only rank executed ``command``, restoring ``restored_step``."""
    if command.kind is CommandKind.HALT:
        policy.on_command_result(command.command_id, 0, True, policy.timeline, "", 0.0, restored_step)
        return
    policy.on_command_result(command.command_id, 0, True, command.timeline + 1, "", 0.0, restored_step)


def test_a_recurring_fault_climbs_the_ladder_to_a_diagnosed_halt() -> None:
    policy = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    first = nan_at(policy, 500)
    assert (first.kind, first.recovery_rung, first.restore_before_step, first.skip_through_step) == (
        CommandKind.ROLLBACK,
        0,
        None,
        None,
    )
    executed(policy, first, 480)
    second = nan_at(policy, 500)  # replayed from step 480: the same fault at the same step
    margin = policy.config.escalation_skip_margin
    assert second.recovery_rung == 1
    assert (second.restore_before_step, second.skip_through_step) == (480, 500 + margin)
    assert second.recovery_lr_scale == policy.config.recovery_lr_scale
    assert "rung 1 of the recovery ladder" in second.reason
    executed(policy, second, 400)
    third = nan_at(policy, 505)
    assert third.recovery_rung == 2
    assert (third.restore_before_step, third.skip_through_step) == (480, 505 + 2 * margin), "rung 0's restore point"
    assert third.recovery_lr_scale == pytest.approx(policy.config.escalation_lr_scale)
    executed(policy, third, 400)
    fourth = nan_at(policy, 505)
    assert fourth.kind is CommandKind.HALT
    assert fourth.recovery_rung == HALT_RUNG
    assert "deterministic fault: recurs at step 505 from the snapshot of step 400" in fourth.reason
    assert f"after skipping {505 + 2 * margin - 400} batches and LR x0.5" in fourth.reason
    assert f"rung {HALT_RUNG}" in fourth.reason
    assert policy.halted


def test_a_fault_far_past_the_last_one_starts_at_rung_zero() -> None:
    policy = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    first = nan_at(policy, 500)
    executed(policy, first, 480)
    later = nan_at(policy, 500 + policy.config.recurrence_steps + 1)
    assert later.recovery_rung == 0
    assert later.skip_through_step is None


def test_an_unexecuted_rollback_is_no_restore_point() -> None:
    """A recurrence needs the previous rollback to have restored something: before its result, a fault on the
    same timeline is suppressed (one command at a time), and a rollback never executed is no rung."""
    policy = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    first = nan_at(policy, 500)
    policy.on_command_result(first.command_id, 0, False, 0, "restore failed", 0.0)  # a failed restore: HALT
    assert policy.halted
    assert policy.escalation.recovery is not None
    assert policy.escalation.recovery.restored_step is None


def test_resume_starts_the_ladder_afresh_and_escalation_can_be_turned_off() -> None:
    policy = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    command = nan_at(policy, 500)
    for _ in range(3):
        executed(policy, command, 480)
        command = nan_at(policy, 500)
    assert command.kind is CommandKind.HALT
    executed(policy, command, 480)
    resume = policy.resume("fixed the data", 1.0)
    executed(policy, resume, 480)
    assert policy.escalation.recovery is None
    assert nan_at(policy, 500).recovery_rung == 0
    off = RunPolicy(PolicyConfig(escalation=False, max_rollbacks=5, rollback_window=10), random_guess_loss=RGL)
    command = nan_at(off, 500)
    for _ in range(3):
        executed(off, command, 480)
        command = nan_at(off, 500)
        assert (command.kind, command.recovery_rung) == (CommandKind.ROLLBACK, 0), "replayed with the recipe"


def test_the_ladder_survives_the_journal() -> None:
    policy = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    command = nan_at(policy, 500)
    executed(policy, command, 480)
    again = RunPolicy.from_dict(policy.to_dict())
    assert again.escalation.recovery == policy.escalation.recovery
    assert isinstance(again.escalation.recovery, Recovery)
    assert again.escalation.recovery.restored_step == 480
    assert nan_at(again, 500).recovery_rung == 1


def test_a_recoverys_dict_is_every_field_in_order_and_round_trips() -> None:
    """``as_dict`` is built by hand (it is journaled with the run's state): it stays ``dataclasses.asdict``."""
    recovery = Recovery(3, 1, 40, 35, 52, 2, restore_before_step=35, lr_scale=0.5, restored_step=30)
    assert list(recovery.as_dict().items()) == list(dataclasses.asdict(recovery).items())
    assert Recovery.from_dict(recovery.as_dict()) == recovery
