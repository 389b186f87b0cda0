"""The step-overhead bench still runs (`make bench` is not part of `make test`): a few rounds of each
placement against a real daemon, its row rendered. It asserts the shape of the result, not a speed."""

from __future__ import annotations

import os

import pytest

from tests.benchmarks import bench_step_overhead
from tests.benchmarks.run_all import step_overhead_row


def affinities() -> dict[int, set[int]]:
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}


@pytest.mark.parametrize("placement", bench_step_overhead.PLACEMENTS.values(), ids=bench_step_overhead.PLACEMENTS)
def test_step_overhead_bench_runs(placement: dict[str, bool]) -> None:
    before = affinities()
    result = bench_step_overhead.run(rounds=3, block=4, **placement)
    after = affinities()
    assert {tid: after[tid] for tid in before if tid in after} == {
        tid: before[tid] for tid in before if tid in after
    }, "the bench leaves every thread of the process where it found it (it pins them to measure)"
    for arm in bench_step_overhead.ARMS:
        medians = result["medians_us"][arm]
        assert min(medians["thread"], medians["wall"], medians["ops"]) > 0, (arm, medians)
    spread = result["thread_governed_vs_ungoverned"]
    assert spread["ci_low"] <= spread["median"] <= spread["ci_high"]
    what, measured, ratio, budget = step_overhead_row(result)
    assert ("<= 1.02" in budget) == bool(placement.get("pause_daemon")), budget
    assert measured.endswith(" us")
    assert ratio.count("(") == 1
    assert "daemon" in what


def test_spread_gives_the_median_and_a_confidence_interval_around_it() -> None:
    values = [float(v) for v in range(1, 101)]
    spread = bench_step_overhead.spread(values)
    assert spread["median"] == 50.5
    # the 41st and 61st of the sorted values: ranks 50 -+ 0.98 sqrt(100), rounded outwards
    assert (spread["ci_low"], spread["ci_high"]) == (41.0, 61.0)


def test_the_fault_campaign_runs_and_the_governor_saves_a_run_with_a_recurring_bad_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A short campaign (one seed, a bad batch whose NaN comes back whenever its data position is trained, and
    a crash): the governor climbs the ladder past the bad batch and the run finishes as its healthy twin; the
    ungoverned run ends on NaN; after the crash the governed restart adopts a snapshot from shared memory and
    the ungoverned one starts over; the table renders. Shape and these outcomes, not the numbers of `make
    bench`."""
    from tests.benchmarks import bench_faults

    for name, value in {"STEPS": 160, "WARMUP": 10, "VAL_EVERY": 20, "FAULT_AT": 100, "CHECKPOINT_EVERY": 40}.items():
        monkeypatch.setattr(bench_faults, name, value)
    bad, crash = [f for f in bench_faults.FAULTS if f.name in ("bad_batch", "crash")]
    campaign = bench_faults.run_campaign((bad, crash), (0,), progress=lambda line: None)
    restarted = campaign.results["governed"][("crash", 0)]
    assert bench_faults.outcome(restarted, campaign.twins[0]) == "saved", restarted
    assert restarted.restores == 1
    assert 0 < restarted.steps_lost < 100, "the restart adopted a snapshot taken before the crash at step 100"
    assert campaign.results["ungoverned"][("crash", 0)].steps_lost == 100, "no state to resume: from step 0"
    assert campaign.results["checkpoint + restart (Megatron-LM)"][("crash", 0)].steps_lost == 100 - 80
    governed = campaign.results["governed"][("bad_batch", 0)]
    assert bench_faults.outcome(governed, campaign.twins[0]) == "saved", governed
    assert governed.restores == 2, "the replay recurred once, then the ladder skipped the bad batch"
    assert governed.steps_lost > 0
    assert campaign.results["ungoverned"][("bad_batch", 0)].final_val != campaign.twins[0].final_val
    assert campaign.results["governed"][("healthy", 0)].restores == 0
    lines = bench_faults.table(campaign)
    assert any(line.startswith("| governed | 2/2 |") for line in lines), lines


def test_the_crash_restart_bench_runs_and_counts_the_steps_each_restart_loses() -> None:
    """Small sizes: a process killed at step 12 (snapshots every 5 steps, checkpoints every 8) is restarted
    three ways; each resumes where its kind of state says."""
    from tests.benchmarks import bench_crash_restart

    result = bench_crash_restart.run(hidden=32, kill_at=12, snapshot_every=5, checkpoint_every=8, repeats=1)
    assert result["shm"]["resumed_step"] == 10
    assert result["disk"]["resumed_step"] == 8
    assert result["scratch"]["resumed_step"] == 0
    assert [result[m]["steps_lost"] for m in ("shm", "disk", "scratch")] == [2, 4, 12]
    assert all(result[m]["crash_to_step_s"] > 0 for m in ("shm", "disk", "scratch"))
