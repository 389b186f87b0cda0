"""`governor serve` logs what it decides, as JSON lines on stdout, and notifies --notify-url; a bad URL stops
start-up with a message that does not repeat the URL's secret."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import grpc

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.journal.entry import parse_line
from governor_daemon.journal.segments import list_segments
from governor_daemon.testing import AttachClient
from tests.conftest import governor_cli
from tests.integration.conftest import warm_up
from tests.integration.receiver import Receiver
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

SECRET = "s3cr3t-token"


def _lines(log_path: Path) -> list[dict[str, Any]]:
    """The daemon's log lines (its stdout; stderr, merged into the same file, holds Python's own warnings)."""
    text = log_path.read_text()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n{text[-3000:]}") from None
    return parsed


def _journal(data: Path) -> dict[int, tuple[str, str]]:
    """seq -> (run, kind) of every journal entry on disk."""
    entries = {}
    for path in list_segments(data):
        for raw in path.read_text().splitlines():
            entry = parse_line(raw)
            entries[entry.seq] = (entry.run, entry.kind)
    return entries


def test_a_rollback_is_logged_as_json_lines_that_the_journal_backs(tmp_path: Path) -> None:
    """After a NaN, a ROLLBACK and its result, the daemon's stdout holds (as JSON) the attach, the command with
    its rule and reason, the result and the detach, each with run, rank, seq; every seq named is that kind of
    entry in the journal; the notify URL's secret path is never logged."""
    data = tmp_path / "data"
    with Receiver() as receiver:
        daemon = DaemonProcess(data, env={"GOVERNOR_NOTIFY_URL": receiver.url()})
        try:
            client = AttachClient(daemon.address, "run-log")
            client.connect()
            step = warm_up(client)
            client.validation(step + 10, math.nan)
            client.wait_ack(client.result(client.next("command").command))
            client.close()
            assert receiver.wait_for(lambda events: len(events) == 1)
            with grpc.insecure_channel(daemon.address) as channel:  # the detach is journaled before SIGTERM
                request = cpb.WatchEventsRequest(run_ids=["run-log"], kinds=["detach"])
                next(iter(cgrpc.ControlServiceStub(channel).WatchEvents(request, timeout=20)))
        finally:
            assert daemon.terminate() == 0
    lines = _lines(daemon.log_path)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    (command,) = by_event["command issued"]
    assert {k: command[k] for k in ("run", "kind", "command", "cause", "rule", "verdict", "level")} == {
        "run": "run-log",
        "kind": "command",
        "command": "ROLLBACK",
        "cause": "decision",
        "rule": "non_finite",
        "verdict": "panic",
        "level": "warning",
    }
    assert command["reason"] == "non-finite: validation loss nan"
    (result,) = by_event["command result"]
    assert (result["rank"], result["succeeded"], result["command_id"]) == (0, True, command["command_id"])
    assert [line["rank"] for line in by_event["trainer attached"]] == [0]
    assert [line["rank"] for line in by_event["trainer detached"]] == [0]
    journal = _journal(data)
    decided = [line for line in lines if "seq" in line and "kind" in line]
    assert len(decided) >= 5, decided
    for line in decided:
        assert journal.get(line["seq"]) == (line["run"], line["kind"]), line
    text = daemon.log_path.read_text()
    assert SECRET not in text
    serving = by_event["governor serving"][0]
    assert serving["notify_url"] == f"http://127.0.0.1:{receiver.port}/…"


def test_a_journal_failure_is_notified(tmp_path: Path) -> None:
    """The disk fills up: the daemon exits 8, and the receiver got a journal_failed event first."""
    with Receiver() as receiver:
        daemon = DaemonProcess(tmp_path / "data", "--notify-url", receiver.url(), max_file_bytes=200_000)
        client = AttachClient(daemon.address, "full")
        client.connect()
        try:
            for i in range(400):
                client.vitals(range(64 * i, 64 * i + 64), [0.5] * 64)
                client.wait_ack(client.seq, timeout_s=20)
        except (grpc.RpcError, EOFError):
            pass
        finally:
            client.close()
        assert daemon.proc.wait(30) == 8
        assert receiver.wait_for(lambda events: any(e["event"] == "journal_failed" for e in events))
    (event,) = [e for e in receiver.events if e["event"] == "journal_failed"]
    assert "journal write failed" in event["text"]
    assert event["details"]["data_dir"] == str(tmp_path / "data")


def test_a_notify_url_that_is_not_http_stops_start_up(tmp_path: Path) -> None:
    """ftp:// is refused with exit 2 and a message naming the setting, without the URL's secret path."""
    result = governor_cli(
        ["serve", "--data-dir", str(tmp_path / "data"), "--notify-url", f"ftp://hooks.example/{SECRET}"], timeout_s=60
    )
    assert result.returncode == 2, result.stderr
    assert "notify_url must start with http:// or https://" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists(), "nothing was started"
