"""GovernedTraining against a real daemon: the README's example as written, and a NaN mid-run in a plain
loop (one rollback, training goes on, a finite final loss)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from governor_daemon.testing import InProcessDaemon
from tolaria.controller import ControllerClient
from tolaria_trainer import GovernedTraining

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Govern your own training loop", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's GovernedTraining section has a python block"
    return match.group(1)


def test_readme_example_runs_as_written(daemon: InProcessDaemon, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    assert len(script.read_text().splitlines()) <= 25, "the example stays short"
    env = {**os.environ, "TOLARIA_GOVERNOR": daemon.address}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 8, done.stdout
    assert all(line.endswith("restored: False") for line in lines), done.stdout
    with ControllerClient(daemon.address) as client:
        (run,) = client.runs()
    assert run.task == "custom"
    assert str(run.state) == "FINISHED", run
    assert run.num_rollbacks == 0
    assert run.latest_validation_step == 8 * 24


def test_nan_mid_run_gives_one_rollback_and_training_goes_on(daemon: InProcessDaemon) -> None:
    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = x[:, :4].argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    restores = []
    val_loss = math.nan
    with GovernedTraining(
        model, optimizer, governor=daemon.address, run_id="plain-nan", num_classes=4, agree_every_steps=4
    ) as gov:
        for epoch in range(1, 9):
            for i, (xb, yb) in enumerate(zip(x[:768].split(32), y[:768].split(32), strict=True)):
                if epoch == 5 and i == 3 and not restores:
                    with torch.no_grad():
                        model[2].weight.fill_(math.nan)  # a corrupt update
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
                outcome = gov.step(loss)
                if outcome.restored:
                    restores.append(outcome)
            with torch.no_grad():
                val_loss = loss_fn(model(x[768:]), y[768:]).item()
            outcome = gov.validate(val_loss, epoch=epoch)
            if outcome.restored:
                restores.append(outcome)
    assert len(restores) == 1, restores
    (restore,) = restores
    assert restore.command is not None
    assert str(restore.command.type) == "ROLLBACK"
    assert (restore.restored_epoch, restore.restored_step) == (4, 4 * 24), "back to the LKG of epoch 4"
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
