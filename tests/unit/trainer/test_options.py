"""GovernedOptions: checked where they are made, the field named; one set of knobs for every caller."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from tests.unit.trainer.fake_governance import FakeGovernance
from tolaria_trainer import GovernedTraining
from tolaria_trainer.config import RunConfig
from tolaria_trainer.integrations._common import GovernedFit
from tolaria_trainer.options import GovernedKnobs, GovernedOptions


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"agree_every_steps": -1}, r"agree_every_steps must be >= 0 \(0: only at validations\), got -1"),
        ({"step_snapshot_every": 0}, "step_snapshot_every must be >= 1 and onset_margin_steps >= 0, got 0 and 10"),
        ({"onset_margin_steps": -2}, "step_snapshot_every must be >= 1 and onset_margin_steps >= 0, got 250 and -2"),
        ({"step_snapshots": -1}, "step_snapshots must be >= 0, got -1"),
        ({"num_classes": 1}, "num_classes must be at least 2, got 1"),
        ({"num_classes": 3, "random_guess_loss": 1.0}, "not both"),
        ({"random_guess_loss": float("nan")}, "random_guess_loss must be a positive finite number, got nan"),
        ({"random_guess_loss": 0.0}, "random_guess_loss must be a positive finite number, got 0.0"),
        ({"snapshot_location": "disk"}, "snapshot_location must be one of device, pinned, host, auto, got 'disk'"),
        ({"halt_wait_s": -1.0}, "halt_wait_s must be >= 0 seconds, got -1.0"),
        ({"verdict_wait_s": float("nan")}, "verdict_wait_s must be >= 0 seconds, got nan"),
        ({"final_flush_s": -0.5}, "final_flush_s must be >= 0 seconds, got -0.5"),
        ({"heartbeat_s": 0.0}, "heartbeat_s must be a positive number of seconds, got 0.0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(knobs: dict[str, typing.Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GovernedOptions(**knobs)
    with pytest.raises(ValueError, match=message):  # replacing a field checks again
        GovernedOptions().with_knobs(knobs)


def test_options_are_frozen_and_keep_secrets_out_of_their_repr() -> None:
    options = GovernedOptions(token="s3cret", tls_key=b"KEY", agree_every_steps=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.agree_every_steps = 1  # type: ignore[misc]
    assert "agree_every_steps=7" in repr(options)
    assert "s3cret" not in repr(options)
    assert "KEY" not in repr(options)
    assert options.with_knobs({}) is options
    assert options.with_knobs({"fail_closed": True}) == dataclasses.replace(options, fail_closed=True)


def test_the_keyword_arguments_are_exactly_the_fields() -> None:
    """GovernedTraining(**knobs) is typed by GovernedKnobs: the same names and types as the dataclass."""
    assert typing.get_type_hints(GovernedKnobs) == typing.get_type_hints(GovernedOptions)
    assert list(GovernedKnobs.__annotations__) == [f.name for f in dataclasses.fields(GovernedOptions)]


def test_split_separates_knobs_from_the_runs_objects() -> None:
    state = {"position": 3}
    knobs, others = GovernedOptions.split({"agree_every_steps": 5, "extra_state": state, "fail_closed": True})
    assert knobs == {"agree_every_steps": 5, "fail_closed": True}
    assert others == {"extra_state": state}


def test_run_config_builds_its_options_in_one_place(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"CA")
    cfg = RunConfig(task="synthetic", run_id="r1", agree_every_steps=7, halt_wait_s=0.0, tls_ca=ca, token="t")
    options = cfg.governed_options(num_classes=10)
    assert (options.run_id, options.task, options.token, options.num_classes) == ("r1", "synthetic", "t", 10)
    assert (options.agree_every_steps, options.halt_wait_s, options.tls_ca, options.snapshot_shm) == (
        7,
        0.0,
        b"CA",
        True,
    )
    unnamed = RunConfig(task="synthetic").governed_options(random_guess_loss=2.5)
    assert (unnamed.run_id or "").startswith("synthetic-")
    assert unnamed.snapshot_shm is False, "shared-memory snapshots only under a given run id"


def test_run_config_refuses_a_bad_knob_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="--agree-every-steps must be >= 0, got -1"):  # the flag's own check first
        RunConfig(agree_every_steps=-1)
    with pytest.raises(ValueError, match=r"verdict_wait_s must be >= 0 seconds, got -1\.0"):
        RunConfig(verdict_wait_s=-1.0)


def test_a_callback_checks_its_knobs_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="onset_margin_steps >= 0"):
        GovernedFit("test", None, None, None, None, None, False, {"onset_margin_steps": -1})
    fit = GovernedFit("test", None, "run-9", None, 3, None, False, {"agree_every_steps": 4, "extra_state": {}})
    assert (fit.options.task, fit.options.run_id, fit.options.num_classes, fit.options.agree_every_steps) == (
        "test",
        "run-9",
        3,
        4,
    )
    assert fit.runtime == {"extra_state": {}}


def test_governed_training_takes_options_and_keywords_that_replace_their_fields() -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = GovernedOptions(run_id="opts", agree_every_steps=7, verdict_wait_s=1.0)
    with GovernedTraining(model, optimizer, governor=FakeGovernance(), options=options, agree_every_steps=3) as gov:
        assert gov.options == dataclasses.replace(options, agree_every_steps=3)
        assert gov.run_id == "opts"
        for _ in range(3):
            gov.step(1.0, 1.0)
        assert gov.state.step == 3
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="agree_every_steps must be >= 0"):
        GovernedTraining(model, fresh, governor=None, options=options, agree_every_steps=-1)
    assert "step" not in vars(fresh), "a refused option changes nothing: no step guard installed"
