"""GovernedTraining against a real daemon: the README's example as written, and a NaN mid-run in a plain
loop (one rollback, training goes on, a finite final loss)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from governor_daemon.testing import InProcessDaemon
from tolaria.controller import ControllerClient
from tolaria_trainer import GovernedTraining, Outcome

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Govern your own training loop", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's GovernedTraining section has a python block"
    return match.group(1)


def keep_up(gov: GovernedTraining, every: int) -> None:
    """After an agreement point (every ``every`` steps), wait until the governor acknowledged every message sent.

    The daemon runs in this process and judges the train stream asynchronously: on a loaded machine the loop
    could outrun it by hundreds of steps, so the tests below that count what the train-stream detectors caught
    would depend on the machine's speed. In lockstep, each command comes at the agreement point after the one
    whose records raised it, whatever the load (an Ack follows the entry that judged its records, and a
    command goes out before the Ack of the records that raised it)."""
    if gov.state.step % every:
        return
    waited = time.monotonic()
    while gov.governance.pending():
        assert time.monotonic() - waited < 120, f"the governor acknowledged nothing for 120 s: {gov.governance}"
        time.sleep(0.002)


@pytest.fixture
def judging_daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    """A daemon that judges every train-step record however long it waited (shedding has its own tests,
    tests/integration/test_ingest.py): the tests that count detections must not depend on the machine's load."""
    with InProcessDaemon(tmp_path / "data", shed_after_ms=3_600_000.0) as d:
        yield d


def test_readme_example_runs_as_written(daemon: InProcessDaemon, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    assert len(script.read_text().splitlines()) <= 25, "the example stays short"
    env = {**os.environ, "GOVERNOR_ADDRESS": daemon.address}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 8, done.stdout
    assert all(line.endswith("restored: False") for line in lines), done.stdout
    assert "gov.settle()" in script.read_text(), "the paragraph after the example requires it"
    assert done.stdout.splitlines()[-1] == "settled, restored: False", done.stdout
    with ControllerClient(daemon.address) as client:
        (run,) = client.runs()
    assert run.task == "custom"
    assert str(run.state) == "FINISHED", run
    assert run.num_rollbacks == 0
    assert run.latest_validation_step == 8 * 24


def test_nan_mid_run_gives_one_rollback_and_training_goes_on(daemon: InProcessDaemon) -> None:
    """The loop is written as a real one must be: a restore sends it back to the restored epoch, and
    ``settle()`` after the last epoch takes a rollback that arrives after the last step. The daemon stalls
    for a second at the fault, so the rollback always comes after the loop's last step (an in-process
    daemon sharing the test's GIL lagged like that now and then, and the test used to miss it)."""
    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = x[:, :4].argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    restores: list[Outcome] = []
    val_loss = math.nan

    def train_epoch(gov: GovernedTraining, epoch: int) -> Outcome:
        nonlocal val_loss
        for i, (xb, yb) in enumerate(zip(x[:768].split(32), y[:768].split(32), strict=True)):
            if epoch == 5 and i == 3 and not restores:
                with torch.no_grad():
                    model[2].weight.fill_(math.nan)  # a corrupt update
                daemon.loop.call_soon_threadsafe(time.sleep, 1.0)  # the daemon falls behind: the loop ends first
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            outcome = gov.step(loss)
            if outcome.restored:
                return outcome
        with torch.no_grad():
            val_loss = loss_fn(model(x[768:]), y[768:]).item()
        return gov.validate(val_loss, epoch=epoch)

    with GovernedTraining(
        model, optimizer, governor=daemon.address, run_id="plain-nan", num_classes=4, agree_every_steps=4
    ) as gov:
        epoch = 0
        while True:
            while epoch < 8:
                outcome = train_epoch(gov, epoch + 1)
                epoch += 1
                if outcome.restored:
                    restores.append(outcome)
                    epoch = outcome.restored_epoch or 0
            outcome = gov.settle()
            if not outcome.restored:
                break
            restores.append(outcome)
            epoch = outcome.restored_epoch or 0
    assert len(restores) == 1, restores
    (restore,) = restores
    assert restore.command is not None
    assert str(restore.command.type) == "ROLLBACK"
    # The newest snapshot a verdict and the train stream (23 steps past it) vouched for before the rollback:
    # epoch 3's or 4's, or an earlier one when the governor lagged (never one after the onset, step 100).
    assert restore.restored_step in (0, 24, 48, 72, 96), restore
    assert restore.restored_epoch == restore.restored_step // 24
    assert restore.punishment_reward < 0
    assert restore.timeline == 1
    assert math.isfinite(val_loss)
    assert val_loss < 0.5, "training went on after the rollback"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with ControllerClient(daemon.address) as client:
        run = client.panic_state("plain-nan")
    assert run.num_rollbacks == 1
    assert str(run.state) == "FINISHED"
    assert run.total_punishment_reward == restore.punishment_reward


def test_a_gradient_blow_up_between_validations_goes_back_to_a_step_snapshot(
    judging_daemon: InProcessDaemon,
) -> None:
    """The daemon's train-stream detector catches one step of gradients x 1e4 at once, names its onset, and the
    trainer restores a snapshot the train stream vouched for after the last validation, not the validation's.
    The blow-up comes at the first step after such a step snapshot was published: the loop waits for that
    (its own records vouch for it), not for a clock."""
    torch.manual_seed(0)
    x = torch.randn(4096, 20)
    y = x[:, :4].argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    restores = []
    blow_up_at: int | None = None
    with GovernedTraining(
        model,
        optimizer,
        governor=judging_daemon.address,
        run_id="blow-up",
        num_classes=4,
        agree_every_steps=10,
        step_snapshot_every=20,
        policy={"step_warmup_steps": 50},
    ) as gov:
        while gov.state.step < 600 and not restores:
            for xb, yb in zip(x.split(16), y.split(16), strict=True):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                after_validation = [i for i in gov.lkg.published if i.kind == "step" and i.step > 200]
                if blow_up_at is None and after_validation:
                    blow_up_at = gov.state.step + 1
                    for p in model.parameters():
                        assert p.grad is not None
                        p.grad.mul_(1e4)
                optimizer.step()
                outcome = gov.step(loss)
                keep_up(gov, 10)
                if outcome.restored:
                    restores.append(outcome)
                    break
                step = gov.state.step
                if step % 100 == 0 and step <= 200:
                    with torch.no_grad():
                        val_loss = loss_fn(model(x[:512]), y[:512]).item()
                    gov.validate(val_loss, epoch=step // 100)
        gov.settle()
        why = (
            f"shed {gov.governance.num_shed_records}, dropped {gov.governance.num_dropped_records}, "
            f"verification steps {gov.governance.train_verification_steps}, step {gov.state.step}, "
            f"published {[(i.kind, i.step) for i in gov.lkg.published]}"
        )
    assert blow_up_at is not None, f"a step snapshot after the last validation was vouched for ({why})"
    assert len(restores) == 1, restores
    (restore,) = restores
    assert restore.command is not None
    assert restore.command.onset_step == blow_up_at
    assert restore.command.reason.startswith("gradient blow-up: grad norm"), restore.command.reason
    assert restore.restored_step is not None
    assert 200 < restore.restored_step < blow_up_at, "a step snapshot newer than the last validation (step 200)"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with ControllerClient(judging_daemon.address) as client:
        run = client.panic_state("blow-up")
    assert run.num_rollbacks == 1


def test_a_fault_that_recurs_right_after_a_restore_is_caught_as_fast_as_the_first_time(
    judging_daemon: InProcessDaemon,
) -> None:
    """Review finding (blind after every restore): the train-stream detectors started afresh, warm-up
    included, on every new timeline, so a fault that recurred right after a restore became the new
    baseline: in a loop without validations it was never caught. Now they resume from the state pinned for
    the restored snapshot: the recurrence is caught within the first occurrence's delay, and the recovery
    ladder escalates (the data window is skipped) instead of replaying it."""
    torch.manual_seed(0)
    x = torch.randn(4096, 20)
    y = x[:, :4].argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    position = {"batch": 0}
    bad = range(300, 340)  # data positions whose labels are garbage: they come back whenever replayed
    restores: list[Outcome] = []
    with GovernedTraining(
        model,
        optimizer,
        governor=judging_daemon.address,
        run_id="recurs",
        num_classes=4,
        extra_state=position,
        agree_every_steps=10,
        step_snapshot_every=20,
    ) as gov:
        while gov.state.step < 600:
            position["batch"] += gov.take_skip()
            k = position["batch"] % 256
            xb, yb = x[16 * k : 16 * (k + 1)], y[16 * k : 16 * (k + 1)]
            if position["batch"] in bad:
                yb = (yb + 1 + position["batch"] % 3) % 4  # every label wrong
            position["batch"] += 1
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            outcome = gov.step(loss)
            keep_up(gov, 10)
            if outcome.restored:
                restores.append(outcome)
            assert not outcome.halted
        gov.settle()
    assert len(restores) == 2, [r.command.reason if r.command else r for r in restores]
    first, second = (r.command for r in restores)
    assert first is not None
    assert second is not None
    assert first.onset_step == second.onset_step == 301, "the same data position, replayed"
    assert second.onset_step is not None
    assert first.onset_step is not None
    assert second.step - second.onset_step <= first.step - first.onset_step, "no warm-up blind window"
    assert (first.recovery_rung, second.recovery_rung) == (0, 1), "the recurrence escalates"
    assert second.skip_through_step is not None
    assert position["batch"] > bad.stop, "the second restore skipped the bad data"
