"""`tolaria-train --policy KEY=VALUE`: typed by the contract's Policy message; bad input is an error naming it."""

from __future__ import annotations

import pytest

from governor_daemon.policy import parse_assignments
from tolaria_trainer.cli import main, parse_policy


def test_values_are_typed_by_the_contract() -> None:
    parsed = parse_policy(["end_stalled_ranks=true", "escalation=off", "stall_timeout_s=5", "max_rollbacks=2"])
    assert parsed == {"end_stalled_ranks": True, "escalation": False, "stall_timeout_s": 5.0, "max_rollbacks": 2}
    assert parse_policy(["shadow_mode=YES", "end_stalled_ranks= 0"]) == {
        "shadow_mode": True,
        "end_stalled_ranks": False,
    }


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("end_stalled_ranks=ture", "end_stalled_ranks is true or false"),  # was silently false: the watchdog off
        ("escalation=", "escalation is true or false"),
        ("stall_timeout_s=five", "stall_timeout_s needs a number"),
        ("stall_timeout=5", "expected KEY=VALUE with KEY one of"),
        ("end_stalled_ranks", "expected KEY=VALUE"),
        # was sent as inf, a value the governor's policy refuses: now an error before training
        ("stall_timeout_s=inf", "stall_timeout_s needs a finite number"),
        ("random_guess_loss=lots", "random_guess_loss needs a number"),
        ("max_rollbacks=2.5", "max_rollbacks needs a whole number"),
        # was accepted and failed later, building the Policy message ("Value out of range"), not as exit 2
        ("min_history=-1", "min_history needs a whole number >= 0"),
    ],
)
def test_bad_input_is_an_error_naming_the_pair(pair: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_policy([pair])


def test_the_cli_refuses_a_misspelt_bool_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 and one line, nothing trained, no governor contacted."""
    code = main(["--task", "digits", "--policy", "end_stalled_ranks=ture", "--log-format", "console"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--policy 'end_stalled_ranks=ture': end_stalled_ranks is true or false" in err


def test_the_trainer_and_the_daemon_parse_alike() -> None:
    """One parser (tolaria.policy_args): what `tolaria-train --policy` sends is what `governor policy set` and
    the daemon's settings would make of the same pairs."""
    pairs = [" sensitivity = 4.5", "history_window=30", "shadow_mode=On", "random_guess_loss=none", "profile=seed "]
    typed = {
        "sensitivity": 4.5,
        "history_window": 30,
        "shadow_mode": True,
        "random_guess_loss": None,
        "profile": "seed",
    }
    assert parse_policy(pairs) == typed
    assert parse_assignments(pairs) == typed
