"""The policy configuration: one validated, immutable dataclass plus KEY=VALUE parsing.

Precedence (docs/protocol.md, "Policy"): daemon defaults < the first Hello's overrides < a controller's
UpdatePolicy. ``merged`` applies one layer; ``locked`` fields are skipped and reported, never
silently applied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from governor_daemon.errors import PolicyConfigError
from tolaria import policy_args

MAX_FIELD_VALUE = 1e6
"""The upper bound of a policy number unless ``_UPPER_BOUNDS`` says otherwise (counts, ratios, penalties)."""
PROFILES = ("default", "seed")
"""Detector profiles: ``seed`` is docs/protocol.md, "Policy"; ``default`` adds a relative divergence gate."""


@dataclass(frozen=True)
class PolicyConfig:
    """Every knob of the decision engine, with the defaults of docs/protocol.md, "Policy".

    Construction validates: an impossible value raises PolicyConfigError naming the field and the fix.
    """

    profile: str = "default"
    history_window: int = 20
    min_history: int = 10
    sensitivity: float = 6.0
    multiplier: float = 3.0
    absolute_threshold: float = 10.0
    min_panics_before_rollback: int = 2
    random_guess_loss: float | None = None
    lobotomy_mean_ratio: float = 0.6
    lobotomy_tolerance_ratio: float = 0.065
    death_penalty: float = 10.0
    max_rollbacks: int = 3
    rollback_window: int = 10
    command_timeout_s: float = 120.0
    recovery_skip_batches: int = 0
    recovery_lr_scale: float = 1.0
    shadow_mode: bool = False
    stall_timeout_s: float = 300.0
    rank_deadline_s: float = 60.0
    # The default profile's train-stream detectors (policy/steps.py); the seed profile judges train records
    # for non-finite values only.
    step_warmup_steps: int = 30
    step_ema_steps: int = 100
    step_loss_ratio: float = 2.0
    step_loss_sigma: float = 4.0
    step_loss_patience: int = 5
    step_grad_ratio: float = 100.0
    step_collapse_patience: int = 10
    step_lr_ratio: float = 3.0
    step_zero_patience: int = 5
    step_rise_ratio: float = 1.25
    step_rise_patience: int = 15
    # The recovery ladder (policy/recovery.py): how a recurring fault escalates instead of replaying.
    recurrence_steps: int = 100
    escalation: bool = True
    escalation_skip_margin: int = 100
    escalation_lr_scale: float = 0.5
    # The stall watchdog: a rank marked STALLED is told to end its process, so its launcher restarts it.
    end_stalled_ranks: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
        problems = [
            *_beyond_bounds(self),
            *_validation_problems(self),
            *_command_problems(self),
            *_step_problems(self),
            *_ladder_problems(self),
        ]
        if problems:
            raise PolicyConfigError("invalid policy: " + "; ".join(problems))

    def merged(self, overrides: Mapping[str, Any], locked: Iterable[str] = ()) -> tuple[PolicyConfig, list[str]]:
        """Return (a new config with ``overrides`` applied, the override names skipped as locked).

        Raises PolicyConfigError for an unknown field or an impossible result; ``self`` is unchanged.
        """
        unknown = sorted(set(overrides) - set(FIELD_NAMES))
        if unknown:
            raise PolicyConfigError(
                f"unknown policy field(s) {', '.join(unknown)}; valid fields: {', '.join(FIELD_NAMES)}"
            )
        locked_set = set(locked)
        skipped = sorted(k for k in overrides if k in locked_set)
        applied = {k: v for k, v in overrides.items() if k not in locked_set}
        return dataclasses.replace(self, **applied), skipped

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-ready; every field is a scalar). Built by hand: the core writes it
        into every entry's effects and every checkpoint, and ``dataclasses.asdict`` deep-copies each value."""
        return {name: getattr(self, name) for name in FIELD_NAMES}


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PolicyConfig))
_UPPER_BOUNDS: dict[str, float] = {
    f.name: {
        "absolute_threshold": 1e15,  # the blow-up ceiling (policy/detectors.py)
        "step_grad_ratio": 1e12,
        "command_timeout_s": 1e7,
        "stall_timeout_s": 1e7,
        "rank_deadline_s": 1e7,
    }.get(f.name, MAX_FIELD_VALUE)
    for f in dataclasses.fields(PolicyConfig)
    if str(f.type) in ("int", "float", "float | None")
}
"""Every number of the policy has an upper bound, so that nothing derived from it (a total of punishments,
a deadline) can overflow, and the error names it (an UpdatePolicy of death_penalty=1e308 made the total
-inf and the journal refuse the entry after the state had changed)."""
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(PolicyConfig)}


def _check_type(name: str, value: object) -> None:
    kind = _FIELD_TYPES[name]
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind in ("float", "float | None"):
        ok = (value is None and kind == "float | None") or (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    else:
        ok = isinstance(value, str)
    if not ok:
        raise PolicyConfigError(f"invalid policy: {name} must be a finite {kind}, got {value!r}")


def _failed(*checks: tuple[bool, str]) -> list[str]:
    """The messages of the checks that failed, in order."""
    return [message for ok, message in checks if not ok]


def _beyond_bounds(c: PolicyConfig) -> list[str]:
    """The numbers above their upper bound (``_UPPER_BOUNDS``)."""
    return [
        f"{name} must be <= {bound:g}, got {value:g}"
        for name, bound in _UPPER_BOUNDS.items()
        if (value := getattr(c, name)) is not None and value > bound
    ]


def _validation_problems(c: PolicyConfig) -> list[str]:
    """The validation detectors' fields: the profile, the history, the thresholds, the collapse band."""
    return _failed(
        (c.profile in PROFILES, f"profile must be one of {', '.join(PROFILES)}, got {c.profile!r}"),
        (c.min_history >= 1, f"min_history must be >= 1, got {c.min_history}"),
        (
            c.history_window >= c.min_history,
            f"history_window ({c.history_window}) must be >= min_history ({c.min_history}): "
            "the statistics could never start; raise history_window or lower min_history",
        ),
        (c.sensitivity >= 0, f"sensitivity must be >= 0, got {c.sensitivity}"),
        (c.multiplier > 0, f"multiplier must be > 0, got {c.multiplier}"),
        (c.absolute_threshold >= 0, f"absolute_threshold must be >= 0, got {c.absolute_threshold}"),
        (
            c.min_panics_before_rollback >= 1,
            f"min_panics_before_rollback must be >= 1, got {c.min_panics_before_rollback}",
        ),
        (
            c.random_guess_loss is None or c.random_guess_loss > 0,
            f"random_guess_loss must be > 0 (or none, to derive it from the task), got {c.random_guess_loss}",
        ),
        (c.lobotomy_mean_ratio > 0, f"lobotomy_mean_ratio must be > 0, got {c.lobotomy_mean_ratio}"),
        (c.lobotomy_tolerance_ratio > 0, f"lobotomy_tolerance_ratio must be > 0, got {c.lobotomy_tolerance_ratio}"),
    )


def _command_problems(c: PolicyConfig) -> list[str]:
    """The commands' fields: the punishment, the loop breaker, the recipe, the timeouts and deadlines."""
    return _failed(
        (c.death_penalty >= 0, f"death_penalty must be >= 0 (the reward is its negative), got {c.death_penalty}"),
        (c.rollback_window >= 1, f"rollback_window must be >= 1, got {c.rollback_window}"),
        (
            c.max_rollbacks < c.rollback_window,
            f"max_rollbacks ({c.max_rollbacks}) must be < rollback_window ({c.rollback_window}), "
            "or the loop breaker can never fire; raise rollback_window",
        ),
        (c.command_timeout_s > 0, f"command_timeout_s must be > 0, got {c.command_timeout_s}"),
        (0 < c.recovery_lr_scale <= 1, f"recovery_lr_scale must be in (0, 1], got {c.recovery_lr_scale}"),
        (c.stall_timeout_s > 0, f"stall_timeout_s must be > 0, got {c.stall_timeout_s}"),
        (c.rank_deadline_s > 0, f"rank_deadline_s must be > 0, got {c.rank_deadline_s}"),
    )


def _step_problems(c: PolicyConfig) -> list[str]:
    """The default profile's train-stream detectors' fields (policy/steps.py)."""
    return _failed(
        (c.step_warmup_steps >= 1, f"step_warmup_steps must be >= 1, got {c.step_warmup_steps}"),
        (c.step_ema_steps >= 2, f"step_ema_steps must be >= 2, got {c.step_ema_steps}"),
        (c.step_loss_ratio > 1, f"step_loss_ratio must be > 1, got {c.step_loss_ratio}"),
        (c.step_loss_sigma > 0, f"step_loss_sigma must be > 0, got {c.step_loss_sigma}"),
        (c.step_loss_patience >= 1, f"step_loss_patience must be >= 1, got {c.step_loss_patience}"),
        (c.step_grad_ratio > 1, f"step_grad_ratio must be > 1, got {c.step_grad_ratio}"),
        (c.step_collapse_patience >= 1, f"step_collapse_patience must be >= 1, got {c.step_collapse_patience}"),
        (c.step_lr_ratio > 1, f"step_lr_ratio must be > 1, got {c.step_lr_ratio}"),
        (c.step_zero_patience >= 1, f"step_zero_patience must be >= 1, got {c.step_zero_patience}"),
        (c.step_rise_ratio > 1, f"step_rise_ratio must be > 1, got {c.step_rise_ratio}"),
        (c.step_rise_patience >= 1, f"step_rise_patience must be >= 1, got {c.step_rise_patience}"),
    )


def _ladder_problems(c: PolicyConfig) -> list[str]:
    """The recovery ladder's fields (policy/recovery.py)."""
    return _failed(
        (c.recurrence_steps >= 0, f"recurrence_steps must be >= 0, got {c.recurrence_steps}"),
        (c.escalation_skip_margin >= 0, f"escalation_skip_margin must be >= 0, got {c.escalation_skip_margin}"),
        (0 < c.escalation_lr_scale <= 1, f"escalation_lr_scale must be in (0, 1], got {c.escalation_lr_scale}"),
    )


def _config_error(exc: policy_args.PolicyArgError) -> PolicyConfigError:
    """The daemon's wording of a pair the shared parser refused (its commands and settings have always
    spelled these errors this way)."""
    if exc.problem == "syntax":
        return PolicyConfigError(f"expected KEY=VALUE, got {exc.pair!r}; valid keys: {', '.join(FIELD_NAMES)}")
    if exc.problem == "unknown":
        return PolicyConfigError(f"unknown policy field {exc.key!r}; valid fields: {', '.join(FIELD_NAMES)}")
    return PolicyConfigError(f"policy field {exc.key} expects a {exc.kind}, got {exc.text!r}")


def parse_value(name: str, text: str) -> Any:
    """Parse the text of one policy field (``tolaria.policy_args``); raises PolicyConfigError naming the field."""
    try:
        return policy_args.parse_value(name, text)
    except policy_args.PolicyArgError as exc:
        raise _config_error(exc) from None


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings (one pair each) into typed overrides (``tolaria.policy_args``, the parser
    `tolaria-train --policy` uses too).

    Raises PolicyConfigError for a missing '=', an unknown key (listing the valid keys) or a bad value.
    """
    try:
        return policy_args.parse_pairs(pairs)
    except policy_args.PolicyArgError as exc:
        raise _config_error(exc) from None
