"""Small builders for trainer unit tests: a real model on the synthetic task, and a governed run whose
connection's sender thread never starts: the test plays the daemon by feeding AttachResponses to the
connection's protocol and reading back what it would transmit."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tolaria.governor.v1 import trainer_service_pb2
from tolaria_trainer.client import GovernorConnection, TrainerProtocol
from tolaria_trainer.config import RunConfig
from tolaria_trainer.loop import GovernedRun
from tolaria_trainer.tasks import create_model, get_task
from tolaria_trainer.training import TrainingState, VitalsBuffer, adam, step_recorder, train_epoch_normal


def make_state(optimizer: str = "adam", scheduler: bool = True, seed: int = 0) -> TrainingState:
    """A TrainingState on the synthetic task with the chosen optimizer and a StepLR scheduler."""
    torch.manual_seed(seed)
    task = get_task("synthetic")
    model = create_model(task, "cpu")
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if scheduler else None
    return TrainingState(
        model,
        [opt],
        torch.device("cpu"),
        adam(1e-2),
        schedulers=[sched] if sched else [],
        generator=torch.Generator().manual_seed(seed),
    )


def train_one_epoch(state: TrainingState) -> None:
    """One real epoch of the synthetic task (and a scheduler step)."""
    task = get_task("synthetic")
    data = task.load(None, 64, state.generator)
    train_epoch_normal(state, data.train, task.loss_fn(), step_recorder(state, VitalsBuffer(state.device, 32)))
    for scheduler in state.schedulers:
        scheduler.step()
    state.epoch += 1


def snapshot_of(state: TrainingState) -> dict[str, object]:
    """Everything a restore must bring back, copied."""
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "optim": {
            pid: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for pid, s in state.host_optimizer.state_dict()["state"].items()
        },
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in state.host_optimizer.param_groups],
        "scheduler": dict(state.schedulers[0].state_dict()) if state.schedulers else None,
        "rng": torch.get_rng_state().clone(),
        "generator": state.generator.get_state().clone() if state.generator else None,
        "step": state.step,
        "epoch": state.epoch,
    }


def assert_bitwise_equal(a: dict[str, object], b: dict[str, object]) -> None:
    """Every tensor equal bit for bit, every other value equal."""
    assert a.keys() == b.keys()
    for key in a:
        _equal(a[key], b[key], key)


def _equal(x: object, y: object, where: str) -> None:
    if isinstance(x, np.ndarray):
        assert np.array_equal(x, y), f"{where} differs"  # type: ignore[arg-type]
    elif isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor), where
        assert x.dtype == y.dtype, where
        assert torch.equal(x, y), f"{where} differs"
    elif isinstance(x, dict):
        assert isinstance(y, dict), where
        assert x.keys() == y.keys(), where
        for k in x:
            _equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list):
        assert isinstance(y, list), where
        assert len(x) == len(y), where
        for i, (p, q) in enumerate(zip(x, y, strict=True)):
            _equal(p, q, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


HELLO = trainer_service_pb2.Hello(run_id="r", rank=0, world_size=1, incarnation_id="i", task="synthetic")


class ScriptedGovernor:
    """Plays the daemon for one unstarted GovernorConnection, through its protocol object."""

    def __init__(self, protocol: TrainerProtocol) -> None:
        self.protocol = protocol
        self.sent: list[trainer_service_pb2.AttachRequest] = []
        self.generation = 0

    def welcome(self, timeline: int = 0) -> None:
        """Attach: a Welcome with nothing durable."""
        self.generation += 1
        self.protocol.connecting(0.0)
        welcome = trainer_service_pb2.Welcome(generation=self.generation, timeline=timeline)
        self.protocol.receive(trainer_service_pb2.AttachResponse(welcome=welcome), 0.0)

    def verdict(self, seq: int, timeline: int, step: int, kind: int, snapshot_allowed: bool) -> None:
        """Judge validation record ``seq``."""
        verdict = trainer_service_pb2.Verdict(
            seq=seq, timeline=timeline, step=step, kind=kind, snapshot_allowed=snapshot_allowed
        )
        self.protocol.receive(trainer_service_pb2.AttachResponse(verdict=verdict), 0.0)

    def command(self, command_id: int, kind: int, timeline: int) -> None:
        """Order a command decided on ``timeline``."""
        command = trainer_service_pb2.Command(
            command_id=command_id, type=kind, generation=self.generation, timeline=timeline, reason="test"
        )
        self.protocol.receive(trainer_service_pb2.AttachResponse(command=command), 0.0)

    def resync(self, timeline: int, up_to_seq: int) -> None:
        """Tell the rank its records up to ``up_to_seq`` were stale."""
        resync = trainer_service_pb2.Resync(timeline=timeline, up_to_seq=up_to_seq, reason="test")
        self.protocol.receive(trainer_service_pb2.AttachResponse(resync=resync), 0.0)

    def ack(self) -> None:
        """Acknowledge everything drained so far (durable, and judged without a command: it vouches for the
        snapshots staged up to there)."""
        up_to = 0
        for message in self.sent:
            kind = message.WhichOneof("message")
            if kind == "vitals_batch":
                up_to = max(up_to, message.vitals_batch.first_seq + len(message.vitals_batch.step) - 1)
            elif kind != "hello":
                up_to = max(up_to, getattr(message, str(kind)).seq)
        self.protocol.receive(trainer_service_pb2.AttachResponse(ack=trainer_service_pb2.Ack(up_to_seq=up_to)), 0.0)

    def drain(self) -> list[trainer_service_pb2.AttachRequest]:
        """Everything the client would transmit now (kept in ``sent`` too)."""
        out = []
        while (message := self.protocol.next_message(0.0)) is not None:
            out.append(message)
        self.sent.extend(out)
        return out


class UnstartedConnection(GovernorConnection):
    """The real connection, whose sender thread never starts: a ScriptedGovernor plays the daemon."""

    def start(self, wait_s: float) -> bool:
        """Already welcomed by the script."""
        return True


def governed_run(**overrides: Any) -> tuple[GovernedRun, ScriptedGovernor]:
    """A GovernedRun on the synthetic task with an attached, scripted governor (not started: ``run()``
    starts it, a test driving epochs itself calls ``run.gov.start()``)."""
    defaults: dict[str, Any] = {
        "task": "synthetic",
        "epochs": 2,
        "batch_size": 8,
        "agree_every_steps": 10,
        "final_flush_s": 0.0,
        "verdict_wait_s": 0.0,
    }
    connection = UnstartedConnection("unused", HELLO)
    governor = ScriptedGovernor(connection.protocol)
    governor.welcome()
    run = GovernedRun(RunConfig(**{**defaults, **overrides}), governance=connection)
    return run, governor


def batches(messages: list[trainer_service_pb2.AttachRequest]) -> list[trainer_service_pb2.VitalsBatch]:
    """The VitalsBatch messages among ``messages``."""
    return [m.vitals_batch for m in messages if m.WhichOneof("message") == "vitals_batch"]


def validations(messages: list[trainer_service_pb2.AttachRequest]) -> list[trainer_service_pb2.ValidationRecord]:
    """The ValidationRecord messages among ``messages``."""
    return [m.validation_record for m in messages if m.WhichOneof("message") == "validation_record"]
