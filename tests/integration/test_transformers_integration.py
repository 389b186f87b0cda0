"""The transformers.Trainer GovernorCallback against a real daemon: a tiny GPT-2 built from a config (no
download) whose weights turn NaN once mid-run is rolled back once, in place, and training goes on to a
finite loss. The per-step losses it reports are the ones the Trainer logs (gradient accumulation too)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

import transformers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from governor_daemon.testing import InProcessDaemon
from tolaria.controller import ControllerClient, RunFinished, RunState
from tolaria_trainer.governed import Outcome
from tolaria_trainer.integrations.transformers import GovernorCallback

VOCAB = 64
NAN_AT_STEP = 32  # optimizer steps; evaluations every 5, each vouched for by the 23 train steps after it


class CountingTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequences that count up from a random start (mod VOCAB): learnable in a few dozen steps."""

    def __init__(self, n: int, seed: int) -> None:
        starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(16)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PoisonOnce(transformers.TrainerCallback):
    """Fills the weights with NaN after optimizer step NAN_AT_STEP, once; until the restore, each step
    waits a little so that the rollback lands mid-run even on a slow machine. Keeps the Trainer's logs."""

    def __init__(self, governor: GovernorCallback) -> None:
        self.governor = governor
        self.poisoned_at: int | None = None
        self.steps_after_restore = 0
        self.logs: list[dict[str, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.poisoned_at is None and state.global_step == NAN_AT_STEP:
            self.poisoned_at = state.global_step
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        elif self.poisoned_at is not None and not self.governor.fit.restores:
            time.sleep(0.02)
        elif self.governor.fit.restores:
            self.steps_after_restore += 1

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append({"step": state.global_step, **(logs or {})})


def test_nan_mid_run_is_rolled_back_once_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rollback, in place; training goes on to a finite loss; the rollback is one log_history entry at the
    step it happened, which the Trainer's TensorBoard integration (``log_through``) and later callbacks see."""
    torch.manual_seed(0)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    run_id = "transformers-nan"
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    with InProcessDaemon(tmp_path / "data") as daemon:
        governor = GovernorCallback(
            governor=daemon.address, run_id=run_id, random_guess_loss=math.log(VOCAB), agree_every_steps=5
        )
        step_losses: list[float] = []  # what each step() reported (read on the host here: tests only)
        original_step = governor.fit.step

        def step(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Outcome:
            step_losses.append(float(loss))
            return original_step(loss, grad_norm)

        governor.fit.step = step  # type: ignore[method-assign]
        poison = PoisonOnce(governor)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=50,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            per_device_eval_batch_size=32,
            learning_rate=3e-3,
            eval_strategy="steps",
            eval_steps=5,
            logging_steps=5,
            save_strategy="no",
            report_to=["tensorboard"],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=CountingTokens(256, seed=1),
            eval_dataset=CountingTokens(32, seed=2),
            callbacks=[governor, poison],
        )
        governor.log_through(trainer)
        trainer.train()

        assert poison.poisoned_at == NAN_AT_STEP
        assert len(governor.fit.restores) == 1
        assert governor.fit.restores[0].restored_step in (5, 10)  # an evaluation's snapshot allowed and vouched for
        assert poison.steps_after_restore >= 8  # training went on well past the rollback
        assert trainer.state.global_step == 50  # the Trainer's counters are not rewound
        assert all(torch.isfinite(p).all() for p in model.parameters())
        final_loss = trainer.evaluate()["eval_loss"]
        assert math.isfinite(final_loss)
        assert final_loss < 0.8 * math.log(VOCAB)  # it learned after the rollback
        assert math.isfinite(step_losses[-1])
        # Before the NaN, the losses reported each step average to what the Trainer logged (micro-batch
        # losses normalized by num_items_in_batch: summed, not averaged).
        first = next(log for log in poison.logs if "loss" in log and log["step"] == 5)
        assert sum(step_losses[:5]) / 5 == pytest.approx(first["loss"], rel=1e-3, abs=1e-4)
        gov = governor.governed
        assert gov is not None
        assert gov.num_rollbacks == 1
        with ControllerClient(daemon.address) as control:
            status = control.panic_state(run_id)
            finish = next(e for e in control.events(runs=[run_id], kinds=["finish"], deadline_s=10))
        assert status.num_rollbacks == 1
        assert status.state is RunState.FINISHED
        assert status.task == "transformers"
        assert isinstance(finish, RunFinished)
        assert (finish.status, finish.num_rollbacks) == ("COMPLETED", 1)

    (entry,) = [e for e in trainer.state.log_history if "governor/rollbacks" in e]
    assert NAN_AT_STEP < entry["step"] < 50, "logged at the step the rollback was executed"
    assert entry["governor/rollbacks"] == 1.0
    assert entry["governor/restored_step"] == governor.fit.restores[0].restored_step
    # Before the first rollback the governed step is the Trainer's global step.
    assert entry["governor/decision"].startswith(f"rollback (command 1) at step {entry['step']}: restored step ")
    assert "non-finite" in entry["governor/decision"]
    assert any(log.get("governor/rollbacks") == 1.0 for log in poison.logs), "on_log of the callbacks after it"
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    # The integration prefixes what is not an evaluation's with "train/".
    assert [(e.step, e.value) for e in accumulator.Scalars("train/governor/rollbacks")] == [(entry["step"], 1.0)]
    (text,) = accumulator.Tensors("train/governor/decision/text_summary")
    assert tensor_util.make_ndarray(text.tensor_proto).item().decode() == entry["governor/decision"]


class HaltAt(transformers.TrainerCallback):
    """A controller halts the run after optimizer step ``step`` and waits until the run's stream delivered it."""

    def __init__(self, address: str, run_id: str, governor: GovernorCallback, step: int) -> None:
        self.address, self.run_id, self.governor, self.step = address, run_id, governor, step
        self.logs: list[dict[str, Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.step:
            return
        with ControllerClient(self.address) as control_client:
            control_client.halt(self.run_id, "an operator stops it")
        gov = self.governor.governed
        assert gov is not None
        for _ in range(6000):  # until the command arrived (a broken stream fails the test after a minute)
            if gov.governance.commands_waiting:
                return
            time.sleep(0.01)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs or {}))


def test_a_halt_is_in_log_history_and_the_on_log_of_later_callbacks(tmp_path: Path) -> None:
    """Without log_through: a HALT is two log_history entries (the order, the stop) at the step it happened,
    and the callbacks after the GovernorCallback get them in the next on_log (the Trainer's end-of-training log)."""
    with InProcessDaemon(tmp_path / "data") as daemon:
        governor = GovernorCallback(governor=daemon.address, run_id="hf-halt", agree_every_steps=1, halt_wait_s=0)
        halter = HaltAt(daemon.address, "hf-halt", governor, step=2)
        trainer = tiny_trainer(tmp_path, governor, max_steps=20)
        trainer.add_callback(halter)
        trainer.train()
    assert governor.fit.halt is not None
    assert trainer.state.global_step == 3, "the halt was executed at the step after it was ordered"
    entries = [e for e in trainer.state.log_history if "governor/halted" in e]
    assert [(e["step"], e["governor/halted"]) for e in entries] == [(3, 0.0), (3, 1.0)]
    assert entries[1]["governor/decision"] == "halted (command 1) at step 3: halted by controller: an operator stops it"
    (seen,) = [log for log in halter.logs if "governor/halted" in log]
    assert seen["governor/halted"] == 1.0, "the latest value of each series"


def tiny_trainer(
    tmp_path: Path, callback: GovernorCallback, trainer_class: Any = None, max_steps: int = 4, **kwargs: Any
) -> Any:
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return (trainer_class or transformers.Trainer)(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=CountingTokens(64, seed=1),
        callbacks=[callback],
        **kwargs,
    )


def shifted_cross_entropy(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))


def test_a_loss_computed_outside_the_model_needs_record_loss(tmp_path: Path) -> None:
    callback = GovernorCallback(governor=None)
    trainer = tiny_trainer(tmp_path, callback, compute_loss_func=shifted_cross_entropy)
    with pytest.raises(ValueError, match=r"record_loss"):
        trainer.train()
    assert not callback.fit.active  # closed FAILED, its forward hook removed
    assert callback._hook is None


def test_record_loss_from_compute_loss(tmp_path: Path) -> None:
    callback = GovernorCallback(governor=None)
    recorded: list[torch.Tensor] = []

    class RecordingTrainer(transformers.Trainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            labels = inputs.pop("labels")
            outputs = model(**inputs)  # no labels: the model computes no loss
            loss = shifted_cross_entropy(outputs, labels)
            callback.record_loss(loss)
            recorded.append(loss.detach())
            return (loss, outputs) if return_outputs else loss

    original_step = callback.fit.step
    reported: list[float] = []

    def step(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Outcome:
        reported.append(float(loss))
        return original_step(loss, grad_norm)

    callback.fit.step = step  # type: ignore[method-assign]
    tiny_trainer(tmp_path, callback, trainer_class=RecordingTrainer).train()
    assert reported == pytest.approx([float(loss) for loss in recorded])
    gov = callback.governed
    assert gov is not None
    assert gov.state.step == 4
    assert not callback.fit.active  # closed at on_train_end
