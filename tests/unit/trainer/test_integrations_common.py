"""The framework-independent half of the GovernorCallbacks (no framework needed): fp16 overflows are the
grad scaler's business, not a rollback; the loss is found in any output shape; the run is closed once,
with the status its end means."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from tests.unit.trainer.fake_governance import FakeGovernance
from tolaria_trainer.governance import CommandType, FinishStatus
from tolaria_trainer.governed import GovernedTraining, Outcome, RunHalted
from tolaria_trainer.integrations._common import GovernedFit, loss_of, total_grad_norm
from tolaria_trainer.loggers import CallableLogger, GovernorEvent


def open_fit(grad_scaler: torch.amp.GradScaler | None) -> tuple[GovernedFit, list[float]]:
    """An ungoverned fit whose GovernedTraining.step records the gradient norm it is given."""
    model = nn.Linear(2, 1)
    fit = GovernedFit("test", None, None, None, None, None, False, {})
    governed = fit.open(model, [torch.optim.SGD(model.parameters(), lr=0.1)], grad_scaler=grad_scaler)
    seen: list[float] = []
    original = governed.step

    def step(loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None) -> Outcome:
        seen.append(float(grad_norm) if grad_norm is not None else math.nan)
        return original(loss, grad_norm)

    governed.step = step  # type: ignore[method-assign]
    return fit, seen


def test_with_a_grad_scaler_an_overflowed_step_reports_the_last_finite_norm() -> None:
    fit, seen = open_fit(torch.amp.GradScaler("cpu"))
    for norm in (math.inf, 2.0, math.nan, 3.0, -math.inf):
        fit.step(torch.tensor(0.5), torch.tensor(norm))
    assert seen == [1.0, 2.0, 2.0, 3.0, 3.0]


def test_without_a_grad_scaler_a_non_finite_norm_is_reported_as_is() -> None:
    fit, seen = open_fit(None)
    fit.step(torch.tensor(0.5), torch.tensor(math.inf))
    fit.step(torch.tensor(0.5), None)
    assert seen == [math.inf, 0.0]


class WithLoss:
    loss = torch.tensor(1.5)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (torch.tensor(1.5), 1.5),
        ({"loss": torch.tensor(1.5), "logits": torch.zeros(2)}, 1.5),
        (WithLoss(), 1.5),
        ({"logits": torch.zeros(2)}, None),
        (None, None),
        ((torch.tensor(1.5),), None),
    ],
)
def test_loss_of(output: Any, expected: float | None) -> None:
    loss = loss_of(output)
    assert (None if loss is None else float(loss)) == expected


def test_total_grad_norm() -> None:
    model = nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert total_grad_norm([optimizer]) is None
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    norm = total_grad_norm([optimizer])
    assert norm is not None
    assert float(norm) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (RuntimeError("boom"), FinishStatus.FAILED),
        (RunHalted("operator"), FinishStatus.HALTED),
    ],
)
def test_an_exception_closes_the_run_once_with_its_status(
    exc: BaseException, status: FinishStatus, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit, _ = open_fit(None)
    closed: list[tuple[FinishStatus | None, str]] = []

    def close(self: GovernedTraining, status: FinishStatus | None, message: str = "", timeout: Any = None) -> bool:
        closed.append((status, message))
        return True

    monkeypatch.setattr(GovernedTraining, "close", close)
    fit.fail(exc)
    fit.fail(exc)
    fit.finish()
    fit.abandon()
    assert [s for s, _ in closed] == [status]
    assert not fit.active


def test_the_framework_logger_and_the_users_loggers_both_get_each_event() -> None:
    """A fit's loggers are the framework's own, then the ``loggers`` option's; a bad one is refused when the
    callback is built, before any fit."""
    with pytest.raises(TypeError, match="loggers: expected"):
        GovernedFit("test", None, None, None, None, None, False, {"loggers": ["runs/x"]})
    fake = FakeGovernance()
    framework: list[GovernorEvent] = []
    users: list[GovernorEvent] = []
    fit = GovernedFit("test", fake, None, None, None, None, False, {"loggers": users.append})
    model = nn.Linear(2, 1)
    fit.open(model, [torch.optim.SGD(model.parameters(), lr=0.1)], framework_logger=CallableLogger(framework.append))
    fit.step(torch.tensor(0.5), torch.tensor(1.0))
    fake.order(CommandType.ROLLBACK)
    assert fit.step(torch.tensor(0.5), torch.tensor(1.0)).restored
    fit.finish()
    assert [e.kind for e in framework] == [e.kind for e in users] == ["rollback"]
