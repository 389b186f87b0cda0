"""The final summary is strict JSON: ``json.dumps(..., allow_nan=False)`` takes it as it is."""

from __future__ import annotations

import json
import math

from tolaria_trainer.loop import RunSummary


def test_non_finite_values_are_strings_in_strict_json() -> None:
    """A diverged run stays visible ("nan", "inf", "-inf", as the journal writes them); absent values are null."""
    summary = RunSummary("r", 0, "completed", 0, final_validation_loss=math.nan, final_validation_accuracy=-math.inf)
    report = summary.as_dict()
    assert (report["final_validation_loss"], report["final_validation_accuracy"]) == ("nan", "-inf")
    assert RunSummary("r", 0, "completed", 0, duration_s=math.inf).as_dict()["duration_s"] == "inf"
    assert RunSummary("r", 0, "completed", 0).as_dict()["final_validation_loss"] is None
    json.dumps(report, allow_nan=False)
