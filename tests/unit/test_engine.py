"""The mechanisms outside the profiles: commands, loop breaker, shadow, timeouts, resume, results."""

from __future__ import annotations

import math

import pytest

from governor_daemon.errors import PolicyStateError
from governor_daemon.policy import Action, CommandKind, PolicyConfig, RunPolicy, RunState, Verdict

NAN = math.nan


def warm_policy(config: PolicyConfig | None = None, world_size: int = 1, **kwargs: object) -> RunPolicy:
    """A run whose history holds ten losses of mean 2 (population σ 1)."""
    policy = RunPolicy(config or PolicyConfig(), world_size=world_size, **kwargs)  # type: ignore[arg-type]
    for i, loss in enumerate((1.0,) * 5 + (3.0,) * 5):
        policy.judge_validation(0, i, dict.fromkeys(range(world_size), loss), float(i))
    return policy


def judge(policy: RunPolicy, loss: float, step: int, now_s: float = 100.0):
    return policy.judge_validation(policy.timeline, step, {0: loss}, now_s)


def complete(policy: RunPolicy, command_id: int, now_s: float = 100.0) -> None:
    policy.on_command_result(command_id, 0, True, policy.timeline + 1, "", now_s)


def test_nan_rolls_back_with_punishment_and_recipe() -> None:
    """A NaN validation loss sends ROLLBACK with -death_penalty and the recovery recipe."""
    policy = warm_policy(PolicyConfig(recovery_skip_batches=7, recovery_lr_scale=0.5, death_penalty=4.0))
    decision = judge(policy, NAN, 20)
    assert (decision.verdict, decision.action) == (Verdict.PANIC, Action.ROLLBACK)
    cmd = decision.command
    assert cmd is not None
    assert (cmd.kind, cmd.punishment_reward, cmd.recovery_skip_batches, cmd.recovery_lr_scale) == (
        CommandKind.ROLLBACK,
        -4.0,
        7,
        0.5,
    )
    assert (cmd.timeline, cmd.step, cmd.command_id) == (0, 20, 1)
    assert decision.punishment_reward == -4.0
    assert policy.state is RunState.ROLLING_BACK


def test_two_divergences_roll_back_and_reset_counter_keep_history() -> None:
    """Two consecutive divergences: ANOMALY, then PANIC with ROLLBACK; the counter resets, history stays."""
    policy = warm_policy()
    history = policy.validation.detector.history
    first = judge(policy, 50.0, 11)
    assert (first.verdict, first.action, policy.state) == (Verdict.ANOMALY, Action.NONE, RunState.ANOMALY)
    second = judge(policy, 60.0, 12)
    assert (second.verdict, second.action) == (Verdict.PANIC, Action.ROLLBACK)
    assert policy.validation.detector.consecutive == 0
    assert policy.validation.detector.history == history


def test_result_moves_timeline_and_clears_state() -> None:
    """A successful CommandResult closes the command and moves the run to the new timeline."""
    policy = warm_policy()
    cmd = judge(policy, NAN, 20).command
    assert cmd is not None
    assert policy.ledger.total_punishment == 0.0, "charged when executed, not when issued"
    notices = policy.on_command_result(cmd.command_id, 0, True, 1, "", 101.0)
    assert [n.kind for n in notices] == ["punishment_charged", "command_completed"]
    assert (policy.timeline, policy.state, policy.ledger.open) == (1, RunState.HEALTHY, None)
    assert (policy.ledger.total_punishment, policy.ledger.last_punishment, notices[0].charged) == (-10.0, -10.0, -10.0)


def test_stale_and_future_timelines_are_refused() -> None:
    """Records of an older timeline are stale; a newer timeline than the run's is an error."""
    policy = warm_policy()
    cmd = judge(policy, NAN, 20).command
    assert cmd is not None
    complete(policy, cmd.command_id)
    assert policy.is_stale(0)
    with pytest.raises(PolicyStateError, match="stale"):
        policy.judge_validation(0, 21, {0: 1.0}, 102.0)
    with pytest.raises(PolicyStateError, match="timeline 5"):
        policy.judge_validation(5, 21, {0: 1.0}, 102.0)


def test_one_rollback_at_a_time() -> None:
    """While a ROLLBACK is open a second trigger is suppressed and changes no state."""
    policy = warm_policy()
    first = judge(policy, NAN, 20)
    assert first.command is not None
    history, consecutive = policy.validation.detector.history, policy.validation.detector.consecutive
    second = judge(policy, NAN, 21)
    assert (second.verdict, second.action, second.command) == (Verdict.PANIC, Action.ROLLBACK, None)
    assert second.suppressed == "rollback 1 still open"
    healthy = judge(policy, 1.5, 22)
    assert healthy.appended is None
    assert not healthy.snapshot_allowed
    assert "not committed" in healthy.reason
    assert (policy.validation.detector.history, policy.validation.detector.consecutive) == (history, consecutive)
    train = policy.judge_train_step(0, 23, 0, NAN, 1.0, 100.0)
    assert train.command is None
    assert train.suppressed == "rollback 1 still open"


def test_loop_breaker_fourth_rollback_in_window_halts() -> None:
    """The 4th ROLLBACK among the last 10 validation decisions becomes HALT, with punishment."""
    policy = warm_policy()
    kinds = []
    for step in range(20, 24):
        decision = judge(policy, NAN, step)
        assert decision.command is not None
        kinds.append(decision.command.kind)
        if decision.command.kind is CommandKind.ROLLBACK:
            complete(policy, decision.command.command_id)
    assert kinds == [CommandKind.ROLLBACK] * 3 + [CommandKind.HALT]
    assert "loop breaker" in decision.reason
    assert decision.punishment_reward == -10.0
    assert policy.state is RunState.HALTED


def test_loop_breaker_window_slides() -> None:
    """Rollbacks further apart than the window never add up to a HALT."""
    policy = warm_policy()
    step = 20
    for _ in range(6):
        decision = judge(policy, NAN, step)
        assert decision.command is not None
        assert decision.command.kind is CommandKind.ROLLBACK
        complete(policy, decision.command.command_id)
        for _ in range(4):  # 1 rollback per 5 decisions: 2 per window of 10, below max_rollbacks 3
            step += 1
            judge(policy, 2.0, step)
        step += 1


def test_resume_clears_loop_breaker_and_counter_keeps_history() -> None:
    """Resume of a HALTED run sends RESUME, clears the window and counter, keeps history."""
    policy = warm_policy(PolicyConfig(max_rollbacks=0))
    decision = judge(policy, NAN, 20)
    assert decision.command is not None
    assert decision.command.kind is CommandKind.HALT
    history = policy.validation.detector.history
    with pytest.raises(PolicyStateError, match="already halted"):
        policy.halt("again", 101.0)
    resume = policy.resume("operator checked", 102.0)
    assert (resume.kind, resume.punishment_reward) == (CommandKind.RESUME, 0.0)
    assert policy.state is RunState.ROLLING_BACK
    complete(policy, resume.command_id)
    assert (policy.state, policy.timeline, policy.validation.detector.history) == (RunState.HEALTHY, 1, history)
    assert len(policy.escalation.recent) == 0


def test_resume_of_running_run_is_refused() -> None:
    """Only a HALTED run can be resumed."""
    with pytest.raises(PolicyStateError, match="not halted"):
        warm_policy().resume("why", 1.0)


def test_command_timeout_halts() -> None:
    """A command without result after command_timeout_s HALTs the run; a late result keeps the timeline."""
    policy = warm_policy()
    cmd = judge(policy, NAN, 20, now_s=1000.0).command
    assert cmd is not None
    assert policy.check_timeouts(1120.0) == []
    notices = policy.check_timeouts(1120.5)
    assert [n.kind for n in notices] == ["command_timeout"]
    assert policy.state is RunState.HALTED
    assert policy.ledger.total_punishment == 0.0, "neither the ROLLBACK nor the timeout's HALT was executed yet"
    late = policy.on_command_result(cmd.command_id, 0, True, 1, "", 1130.0)
    assert [n.kind for n in late] == ["punishment_charged", "late_command_result"]
    assert (policy.timeline, policy.state) == (1, RunState.HALTED)
    assert policy.ledger.total_punishment == -10.0, "a late result: the trainer did execute it"


def test_failed_rollback_halts_with_command() -> None:
    """A failed ROLLBACK HALTs the run and sends a HALT command."""
    policy = warm_policy()
    cmd = judge(policy, NAN, 20).command
    assert cmd is not None
    notices = policy.on_command_result(cmd.command_id, 0, False, 0, "missing key host.fc1.weight", 101.0)
    assert [n.kind for n in notices] == ["punishment_charged", "command_failed", "halt"]
    halt = notices[2].command
    assert halt is not None
    assert halt.kind is CommandKind.HALT
    assert halt.command_id == 2
    assert policy.state is RunState.HALTED


def test_shadow_mode_decides_but_sends_nothing() -> None:
    """In shadow mode the decision says rollback, no command is opened, the reason says shadow."""
    policy = warm_policy(PolicyConfig(shadow_mode=True))
    decision = judge(policy, NAN, 20)
    assert (decision.action, decision.command, decision.punishment_reward) == (Action.ROLLBACK, None, None)
    assert decision.shadow
    assert "shadow mode" in decision.reason
    assert policy.state is RunState.HEALTHY
    assert policy.ledger.open is None


def test_train_step_signals() -> None:
    """A non-finite train loss or grad norm rolls back at once; finite ones are healthy and not in history."""
    policy = warm_policy()
    history = policy.validation.detector.history
    ok = policy.judge_train_step(0, 15, 0, 123.0, 4.0, 100.0)
    assert (ok.verdict, ok.action) == (Verdict.HEALTHY, Action.NONE)
    assert policy.validation.detector.history == history
    bad = policy.judge_train_step(0, 16, 0, 1.0, math.inf, 100.0)
    assert (bad.verdict, bad.action) == (Verdict.PANIC, Action.ROLLBACK)
    assert "grad_norm inf" in bad.reason


def test_snapshot_allowed() -> None:
    """Allowed only for HEALTHY, no open command, and not above multiplier × lowest accepted loss."""
    policy = RunPolicy(PolicyConfig())
    assert policy.judge_validation(0, 1, {0: 2.0}, 1.0).snapshot_allowed
    assert policy.judge_validation(0, 2, {0: 6.0}, 2.0).snapshot_allowed  # equal to 3 × 2.0
    blowup = policy.judge_validation(0, 3, {0: 6.5}, 3.0)  # warm-up blow-up: healthy, not LKG
    assert blowup.verdict is Verdict.HEALTHY
    assert not blowup.snapshot_allowed
    assert "no snapshot" in blowup.reason
    warm = warm_policy()
    assert not judge(warm, 50.0, 11).snapshot_allowed  # anomaly


def test_halt_replaces_open_rollback_and_request_rollback_checks_state() -> None:
    """Halt while a ROLLBACK is open replaces it; RequestRollback is refused while one is open."""
    policy = warm_policy()
    assert judge(policy, NAN, 20).command is not None
    with pytest.raises(PolicyStateError, match="still open"):
        policy.request_rollback("again", 101.0)
    halt = policy.halt("operator", 102.0)
    assert halt.command_id == 2
    assert policy.state is RunState.HALTED
    with pytest.raises(PolicyStateError, match="halted"):
        policy.request_rollback("now", 103.0)


def test_multi_rank_command_closes_after_every_rank() -> None:
    """With two ranks the timeline moves with the first rank that restored; the command closes only when
    both answered."""
    policy = warm_policy(world_size=2)
    decision = policy.judge_validation(0, 20, {0: 1.0, 1: NAN}, 100.0)
    cmd = decision.command
    assert cmd is not None
    assert decision.ranks == (0, 1)
    notices = policy.on_command_result(cmd.command_id, 1, True, 1, "", 101.0)
    assert [n.kind for n in notices] == ["punishment_charged", "command_progress"]
    assert (policy.timeline, policy.state) == (1, RunState.ROLLING_BACK)
    notices = policy.on_command_result(cmd.command_id, 0, True, 1, "", 101.0)
    assert [n.kind for n in notices] == ["command_completed"], "charged once, by the first rank's result"
    assert (policy.timeline, policy.state, policy.ledger.total_punishment) == (1, RunState.HEALTHY, -10.0)


def test_random_guess_loss_precedence() -> None:
    """RGL: policy > record > Hello > ln(num_classes) > none."""
    assert RunPolicy(PolicyConfig()).random_guess_loss() is None
    assert RunPolicy(PolicyConfig(), num_classes=10).random_guess_loss() == pytest.approx(math.log(10))
    hello = RunPolicy(PolicyConfig(), random_guess_loss=1.5, num_classes=10)
    assert hello.random_guess_loss() == 1.5
    assert hello.random_guess_loss(record_rgl=1.7) == 1.7
    forced = RunPolicy(PolicyConfig(random_guess_loss=2.0), random_guess_loss=1.5)
    assert forced.random_guess_loss(record_rgl=1.7) == 2.0


def test_update_policy_shrinks_history_keeping_newest() -> None:
    """Shrinking history_window keeps the newest entries; the new policy applies to the next record."""
    policy = warm_policy()
    newest = policy.validation.detector.history[-5:]
    policy.update_policy(policy.config.merged({"history_window": 5, "min_history": 5})[0])
    assert policy.validation.detector.history == newest
    policy.judge_validation(0, 30, {0: 3.0}, 200.0)
    assert policy.validation.detector.history == (*newest[1:], 3.0)


def test_finish_and_stall_states() -> None:
    """STALLED while a rank is stalled; FINISHED once every rank finished."""
    policy = warm_policy(world_size=2)
    policy.roster.set_stalled(1, True)
    assert policy.state is RunState.STALLED
    policy.roster.set_stalled(1, False)
    assert policy.state is RunState.HEALTHY
    policy.finish(0)
    assert policy.state is RunState.HEALTHY
    policy.finish(1)
    assert policy.state is RunState.FINISHED


def test_a_validation_at_the_random_guess_or_far_above_the_train_stream_publishes_nothing() -> None:
    """Review finding (a zeroed head): a validation loss of 5.44 next to ln 256 = 5.55, early in the run
    (the history not warm yet), was judged healthy and its snapshot, taken after the fault, was published.
    Against the train stream's own level, a validation in the collapse band or far above it is no LKG."""
    import numpy as np

    rgl = math.log(256)
    policy = RunPolicy(PolicyConfig(step_warmup_steps=10), random_guess_loss=rgl)
    steps = np.arange(1, 201, dtype=np.int64)
    losses = 2.0 * np.exp(np.random.default_rng(0).normal(0, 0.05, 200))
    policy.judge_train_batch(0, 0, steps, losses, None, 0.0)
    healthy = policy.judge_validation(0, 200, {0: 2.1}, 1.0)
    assert healthy.snapshot_allowed
    collapsed = policy.judge_validation(0, 250, {0: 5.44}, 2.0)
    assert collapsed.verdict is Verdict.HEALTHY, "the history is too young to judge it: warm-up"
    assert not collapsed.snapshot_allowed
    assert "random-guess loss" in collapsed.reason
    broken = policy.judge_validation(0, 300, {0: 4.2}, 3.0)
    assert not broken.snapshot_allowed
    assert "far above the train stream's level" in broken.reason
