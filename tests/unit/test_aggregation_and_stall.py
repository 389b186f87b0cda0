"""Multi-rank step aggregation and stall detection with an injected clock."""

from __future__ import annotations

from governor_daemon.policy import AddOutcome, StallTracker, StepAggregator


def test_ready_when_all_ranks_reported() -> None:
    """A step is READY when the last of world_size ranks reports."""
    agg = StepAggregator(world_size=3)
    assert agg.add(0, 0, 100, 1.0, now_s=0.0)[0] is AddOutcome.PENDING
    assert agg.add(2, 0, 100, 1.2, now_s=1.0)[0] is AddOutcome.PENDING
    outcome, group = agg.add(1, 0, 100, 1.1, now_s=2.0)
    assert outcome is AddOutcome.READY
    assert group is not None
    assert group.losses == {0: 1.0, 1: 1.1, 2: 1.2}
    assert group.missing == ()


def test_deadline_names_missing_ranks_and_late_reports() -> None:
    """After rank_deadline_s the step is decided with the ranks present; a later report is late."""
    agg = StepAggregator(world_size=2)
    agg.add(0, 0, 100, 1.0, now_s=10.0)
    assert agg.due(now_s=69.9, deadline_s=60.0) == []
    assert agg.next_deadline_s(60.0) == 70.0
    (group,) = agg.due(now_s=70.0, deadline_s=60.0)
    assert group.missing == (1,)
    assert group.losses == {0: 1.0}
    assert agg.add(1, 0, 100, 1.0, now_s=71.0)[0] is AddOutcome.LATE


def test_timeline_separates_steps_and_duplicates() -> None:
    """The same step on a new timeline is a new group; a rank reporting twice is a duplicate."""
    agg = StepAggregator(world_size=2)
    agg.add(0, 0, 100, 1.0, now_s=0.0)
    assert agg.add(0, 0, 100, 1.0, now_s=0.0)[0] is AddOutcome.DUPLICATE
    assert agg.add(0, 1, 100, 1.0, now_s=0.0)[0] is AddOutcome.PENDING
    assert len(agg.flush()) == 2


def test_stall_after_timeout_and_cleared_by_progress() -> None:
    """No step advance for stall_timeout_s makes STALLED once; the next advance clears it."""
    tracker = StallTracker(now_s=0.0)
    assert not tracker.check(300.0, stall_timeout_s=300.0)
    assert tracker.check(300.1, stall_timeout_s=300.0)
    assert not tracker.check(400.0, stall_timeout_s=300.0)  # reported once
    assert tracker.observe_step(5, 401.0) is True
    assert not tracker.stalled


def test_same_step_is_not_progress() -> None:
    """A heartbeat repeating the latest step does not reset the clock."""
    tracker = StallTracker(now_s=0.0)
    tracker.observe_step(5, 10.0)
    tracker.observe_step(5, 200.0)
    assert tracker.seconds_since_progress(250.0) == 240.0
    assert tracker.check(310.1, stall_timeout_s=300.0)


def test_learned_threshold_after_five_intervals() -> None:
    """After 5 intervals the threshold is 5 × the longest interval, when shorter than the timeout."""
    tracker = StallTracker(now_s=0.0)
    for i, t in enumerate([0.0, 1.0, 2.0, 4.0, 5.0]):
        tracker.observe_step(i, t)
    assert tracker.threshold_s(300.0) == 300.0  # 4 intervals so far
    tracker.observe_step(5, 6.0)
    assert tracker.threshold_s(300.0) == 10.0  # 5 × longest (2 s)
    assert not tracker.check(16.0, 300.0)
    assert tracker.check(16.5, 300.0)
    assert StallTracker(0.0).threshold_s(3.0) == 3.0


def test_learned_threshold_has_a_floor() -> None:
    """Bursts of millisecond intervals do not make a threshold below LEARNED_FLOOR_S (nor above the timeout)."""
    from governor_daemon.policy.stall import LEARNED_FLOOR_S

    tracker = StallTracker(now_s=0.0)
    for i in range(8):
        tracker.observe_step(i, i * 0.001)
    assert tracker.threshold_s(300.0) == LEARNED_FLOOR_S
    assert tracker.threshold_s(4.0) == 4.0
    assert not tracker.check(0.007 + 9.9, 300.0)
