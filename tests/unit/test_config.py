"""Policy configuration: validation errors name the field and fix; KEY=VALUE parsing; precedence."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from governor_daemon.errors import PolicyConfigError
from governor_daemon.policy import FIELD_NAMES, PolicyConfig, parse_assignments
from governor_daemon.settings import add_arguments, resolve


def test_defaults_match_design() -> None:
    """The defaults are the numbers of docs/protocol.md, "Policy"."""
    c = PolicyConfig()
    assert (c.history_window, c.min_history, c.sensitivity, c.multiplier, c.absolute_threshold) == (
        20,
        10,
        6.0,
        3.0,
        10.0,
    )
    assert (c.min_panics_before_rollback, c.lobotomy_mean_ratio, c.lobotomy_tolerance_ratio) == (
        2,
        0.6,
        0.065,
    )
    assert (c.death_penalty, c.max_rollbacks, c.rollback_window, c.command_timeout_s) == (10.0, 3, 10, 120.0)
    assert (c.recovery_skip_batches, c.recovery_lr_scale, c.stall_timeout_s, c.rank_deadline_s) == (
        0,
        1.0,
        300.0,
        60.0,
    )
    assert c.profile == "default"
    assert not c.shadow_mode
    assert c.random_guess_loss is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"history_window": 5}, "history_window (5) must be >= min_history (10)"),
        ({"recovery_lr_scale": 0.0}, "recovery_lr_scale must be in (0, 1]"),
        ({"recovery_lr_scale": 1.5}, "recovery_lr_scale must be in (0, 1]"),
        ({"profile": "fancy"}, "profile must be one of default, seed"),
        ({"min_panics_before_rollback": 0}, "min_panics_before_rollback must be >= 1"),
        ({"random_guess_loss": -1.0}, "random_guess_loss must be > 0"),
        ({"max_rollbacks": 10}, "max_rollbacks (10) must be < rollback_window (10)"),
        ({"command_timeout_s": 0.0}, "command_timeout_s must be > 0"),
        ({"sensitivity": float("nan")}, "sensitivity must be a finite float"),
        ({"history_window": 2.5}, "history_window must be a finite int"),
        ({"shadow_mode": 1}, "shadow_mode must be a finite bool"),
    ],
)
def test_impossible_values_raise_naming_field(overrides: dict[str, object], message: str) -> None:
    """Each impossible value raises PolicyConfigError (a ValueError) naming the field."""
    with pytest.raises(PolicyConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PolicyConfig(**overrides)  # type: ignore[arg-type]
    assert issubclass(PolicyConfigError, ValueError)


def test_all_problems_reported_at_once() -> None:
    """Several bad fields are reported together."""
    with pytest.raises(PolicyConfigError) as info:
        PolicyConfig(multiplier=0.0, stall_timeout_s=-1.0)
    assert "multiplier" in str(info.value)
    assert "stall_timeout_s" in str(info.value)


def test_parse_assignments_types() -> None:
    """KEY=VALUE pairs parse to the field's type."""
    parsed = parse_assignments(
        ["sensitivity=4.5", "history_window=30", "shadow_mode=yes", "random_guess_loss=none", "profile=seed"]
    )
    assert parsed == {
        "sensitivity": 4.5,
        "history_window": 30,
        "shadow_mode": True,
        "random_guess_loss": None,
        "profile": "seed",
    }


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("bogus=1", "unknown policy field 'bogus'; valid fields: profile, history_window"),
        ("sensitivity", "expected KEY=VALUE"),
        ("history_window=ten", "history_window expects a int, got 'ten'"),
        ("sensitivity=inf", "sensitivity expects a float"),
        ("shadow_mode=maybe", "shadow_mode expects a bool"),
    ],
)
def test_parse_assignment_errors(pair: str, message: str) -> None:
    """Bad pairs raise PolicyConfigError with the valid keys or the expected type."""
    with pytest.raises(PolicyConfigError, match=message):
        parse_assignments([pair])


def test_precedence_and_locked_fields() -> None:
    """defaults < Hello overrides < UpdatePolicy; locked fields are skipped and reported."""
    daemon = PolicyConfig(sensitivity=5.0)
    run, skipped = daemon.merged({"sensitivity": 4.0, "death_penalty": 3.0}, locked=["death_penalty"])
    assert (run.sensitivity, run.death_penalty, skipped) == (4.0, 10.0, ["death_penalty"])
    updated, _ = run.merged({"sensitivity": 7.0})
    assert updated.sensitivity == 7.0
    assert run.sensitivity == 4.0
    with pytest.raises(PolicyConfigError, match="unknown policy field"):
        run.merged({"nope": 1})


def test_field_names_cover_the_proto_policy() -> None:
    """Every field of the Policy message is a configuration field and vice versa."""
    from tolaria.governor.v1 import common_pb2

    proto_fields = {f.name for f in common_pb2.Policy.DESCRIPTOR.fields}
    assert proto_fields == set(FIELD_NAMES)


def test_the_contract_types_the_pairs_as_the_config_does() -> None:
    """KEY=VALUE pairs are typed by the Policy message (tolaria.policy_args, shared with tolaria-train): each
    field parses to the type PolicyConfig declares, and random_guess_loss alone takes none."""
    import dataclasses

    from tolaria import policy_args

    assert {f.name: str(f.type) for f in dataclasses.fields(PolicyConfig)} == {
        name: policy_args.kind(name) for name in policy_args.FIELDS
    }


@pytest.mark.parametrize(
    ("flags", "warned"),
    [([], False), (["--metrics-per-run", "8"], True), (["--metrics-per-run", "8", "--metrics-listen", "off"], False)],
)
def test_per_run_metrics_warn_that_run_ids_go_on_an_unauthenticated_endpoint(
    tmp_path: Path, flags: list[str], warned: bool
) -> None:
    """Hardening 2: --metrics-per-run puts every tenant's run ids on /metrics, which has no authentication. It
    stays off by default, and turning it on logs a warning at start-up naming the address."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = resolve(parser.parse_args(["--data-dir", str(tmp_path), *flags]), env={})
    said = [w for w in settings.warnings if "--metrics-per-run" in w]
    assert bool(said) == warned, settings.warnings
    if warned:
        assert "127.0.0.1:9464/metrics, which has no authentication" in said[0]


def test_the_core_bounds_have_one_home(tmp_path: Path) -> None:
    """The serve settings that bound the core take their defaults from ``Limits`` and hand every one of them
    to the core: an unset setting is ``Limits``' default, a set one reaches the core."""
    from governor_daemon.core.state import Limits
    from governor_daemon.settings import settings_for

    defaults = settings_for(tmp_path)
    assert defaults.limits() == Limits()
    bound = {f.name for f in dataclasses.fields(Limits) if hasattr(defaults, f.name)}
    assert bound == {
        "max_records_per_batch",
        "max_active_runs",
        "retain_finished_runs",
        "max_active_runs_per_principal",
        "idle_run_expiry_s",
        "journal_train_records",
    }
    changed = settings_for(tmp_path, **{name: getattr(Limits(), name) + 1 for name in bound})
    assert changed.limits() == Limits(**{name: getattr(Limits(), name) + 1 for name in bound})


def test_the_config_dict_is_every_field_in_order_and_scalar() -> None:
    """``as_dict`` is built by hand (it is in every entry's effects): it must stay what ``dataclasses.asdict``
    gives, field for field in declaration order, and every value a scalar that needs no copy."""
    config = dataclasses.replace(PolicyConfig(), step_loss_patience=7, profile="seed")
    assert list(config.as_dict().items()) == list(dataclasses.asdict(config).items())
    assert all(isinstance(v, (bool, int, float, str, type(None))) for v in config.as_dict().values())
