"""`governor watch` and `governor audit show` for people: one line per event with its key facts, each run's
consecutive vitals entries summarised (review: 72 % of the output was raw truncated vitals JSON), and
--json with every payload whole."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from governor_daemon import train_records
from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.testing import AttachClient
from tests.conftest import governor_cli
from tolaria.journal import ENTRY_KINDS


def _fields(line: str) -> dict[str, Any]:
    """A human line's columns: cursor, date-time, run, rank, kind, then the facts."""
    cursor, ts, run, rank, kind, facts = line.split(maxsplit=5)
    return {"cursor": int(cursor), "ts": ts, "run": run, "rank": rank, "kind": kind, "facts": facts}


def test_watch_and_show_print_one_line_per_event_and_summarise_vitals(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data")
    address = ["--address", daemon.address]
    client = AttachClient(daemon.address, "lines-run")
    client.connect()
    means = []
    for i in range(5):  # one at a time: batches queued together may be judged (and journaled) as one
        steps = list(range(i * 20 + 1, i * 20 + 21))
        losses = [1.0 / math.sqrt(s) for s in steps]
        client.wait_ack(client.vitals(steps, losses, [0.5] * 20))
        means.append(sum(losses) / len(losses))
    client.validation(100, 1.0, epoch=1)
    client.next("verdict")
    client.vitals([101, 102], [0.5, math.nan], [0.5, 0.5])
    command = client.next("command").command
    client.result(command)
    client.vitals(list(range(103, 113)), [0.4] * 10, [0.5] * 10)
    client.wait_ack(client.seq)

    run = ["--run", "lines-run"]
    on_disk = governor_cli(["audit", "show", "--data-dir", str(tmp_path / "data"), *run, "--json"])
    count = len(on_disk.stdout.splitlines())  # acknowledged, so journaled: what watch will stream
    as_json = governor_cli(["watch", *address, *run, "--json", "--limit", str(count)])
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(events) == count
    vitals = [e for e in events if e["kind"] == "vitals"]
    assert len(vitals) == 7
    decoded = train_records.decode(vitals[0]["payload"]["records"])
    assert decoded.steps == tuple(range(1, 21)), "--json carries each payload whole"

    human = governor_cli(["watch", *address, *run, "--limit", str(count)])
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    rows = [_fields(line) for line in lines]
    assert all(r["kind"] in ENTRY_KINDS for r in rows), lines
    assert len(lines) == count - 7 + 3, "five vitals entries in one line, the NaN's on its own, the last one"
    summary = next(r for r in rows if r["kind"] == "vitals")
    assert summary["facts"] == (
        f"vitals: 5 batches, 100 records, steps 1..100, tl 0; loss mean {means[0]:.4g} -> {means[-1]:.4g}, max 1"
    )
    assert summary["cursor"] == vitals[4]["cursor"], "a summary's cursor resumes after what it covers"
    assert (summary["run"], summary["rank"]) == ("lines-run", "r0")
    facts = [r["facts"] for r in rows]
    assert any("step 102 tl 0: PANIC -> rollback (command 1) reward -10: non-finite train loss" in f for f in facts), (
        facts
    )
    assert any(f.startswith("ROLLBACK command 1 (train_step) on timeline 0 at step 102") for f in facts), facts
    assert "command 1 (rollback) succeeded; timeline 1, restored step 102" in "\n".join(facts)
    assert rows[-1]["facts"].startswith("vitals: 1 batch, 10 records, steps 103..112, tl 1")

    each = governor_cli(["watch", *address, *run, "--limit", str(count), "--vitals"]).stdout.splitlines()
    assert len(each) == count
    assert sum(1 for line in each if _fields(line)["kind"] == "vitals") == 7
    client.close()
    assert daemon.terminate() == 0

    data = ["--data-dir", str(tmp_path / "data")]
    shown = governor_cli(["audit", "show", *data, *run]).stdout.splitlines()
    assert shown[: len(lines)] == lines, "audit show and watch print an entry alike"
    assert [_fields(line)["kind"] for line in shown[len(lines) :]] == ["detach"]
    assert len(governor_cli(["audit", "show", *data, *run, "--vitals"]).stdout.splitlines()) == count + 1
    only = governor_cli(["audit", "show", *data, *run, "--kind", "vitals"]).stdout.splitlines()
    assert len(only) == 7, "asking for the vitals kind shows each entry"
    full = [json.loads(line) for line in governor_cli(["audit", "show", *data, *run, "--json"]).stdout.splitlines()]
    assert [e["payload"] for e in full[:count]] == [e["payload"] for e in events]
