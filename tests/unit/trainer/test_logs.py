"""`tolaria-train`'s log pipeline (``tolaria_trainer.logs``): JSON lines only, whatever logs and whatever it
logs. Each case runs in a fresh interpreter, since the configuration is process-wide."""

from __future__ import annotations

import json
import os
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


WRITER = """
import logging, sys, structlog
from tolaria_trainer import logs
logs.configure("json")
rank, count = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    structlog.get_logger().info("snapshot", rank=rank, i=i, digest="sha256:" + "0" * 64)
    logging.getLogger("tolaria.governed").warning("adopted step %d on rank %d", i, rank)
"""


def test_ranks_sharing_one_stderr_never_split_a_line() -> None:
    """torchrun hands every rank the same stderr pipe: each JSON line is one write, so lines of ranks writing
    at the same moment never interleave (a pipe keeps a write of up to 4 KiB whole). Two writes per line (the
    text, then its newline) let two ranks' events share a line that no JSON reader can parse; the crash-restart
    e2e test then missed both ranks' "adopted" events on a fast machine."""
    ranks, count = 4, 1500
    read, write = os.pipe()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(rank), str(count)], stderr=write, stdout=subprocess.DEVNULL, cwd=REPO
        )
        for rank in range(ranks)
    ]
    os.close(write)
    with open(read, encoding="utf-8") as stream:
        text = stream.read()
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    lines = text.splitlines()
    broken = [line for line in lines if not line.startswith("{") or not line.endswith("}")]
    assert broken == [], f"{len(broken)} of {len(lines)} lines split or joined, e.g. {broken[:2]}"
    events = [strict_json(line) for line in lines]
    assert len(events) == 2 * ranks * count
    assert sum(e["event"] == "snapshot" for e in events) == ranks * count
