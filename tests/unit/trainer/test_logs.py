"""`tolaria-train`'s log pipeline (``tolaria_trainer.logs``): JSON lines only, whatever logs and whatever it
logs. Each case runs in a fresh interpreter, since the configuration is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import REPO

SCRIPT = """
import logging, math, warnings, structlog
from tolaria_trainer import logs
logs.configure("json")
structlog.get_logger("tolaria.loop").info("epoch", val_loss=math.nan, train=[math.inf, 1.0], nested={"x": -math.inf})
logging.getLogger("tolaria.governed").warning("governor command %d ROLLBACK: loss %s", 1, math.nan)
logging.getLogger("tolaria.governed").info("below WARNING: not shown")
warnings.warn("a library's warning")
logs.say("deprecated spelling: --governor is now --address")
try:
    raise RuntimeError("boom")
except RuntimeError:
    logs.say("internal error", "error", exc_info=True)
"""


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses bare NaN and Infinity."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_stderr_line_is_json_with_non_finite_numbers_as_strings() -> None:
    """structlog events, standard-library records, Python warnings and the CLI's own messages all come out as
    one strict JSON object per line; NaN and the infinities at any depth are "nan", "inf", "-inf" (the
    summary's and the journal's spelling)."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = [strict_json(line) for line in done.stderr.splitlines()]
    assert len(lines) == 5, lines
    epoch, governed, warned, deprecated, crashed = lines
    assert (epoch["val_loss"], epoch["train"], epoch["nested"]) == ("nan", ["inf", 1.0], {"x": "-inf"})
    assert (governed["logger"], governed["level"]) == ("tolaria.governed", "warning")
    assert governed["event"] == "governor command 1 ROLLBACK: loss nan"
    assert warned["logger"] == "py.warnings"
    assert "a library's warning" in warned["event"]
    assert (deprecated["event"], deprecated["logger"]) == (
        "deprecated spelling: --governor is now --address",
        "tolaria.cli",
    )
    assert crashed["level"] == "error"
    assert "RuntimeError: boom" in crashed["exception"]
