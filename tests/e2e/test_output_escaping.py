"""Strings from trainers and controllers cannot forge audit lines or drive a terminal."""

from __future__ import annotations

from pathlib import Path

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.testing import AttachClient
from governor_daemon.text import printable
from tests.conftest import governor_cli
from tolaria.governor.v1 import common_pb2, trainer_service_pb2

FORGED = "done\x1b[2J\x1b[31m\n      99 2026-01-01T00:00:00.000 prod-run  decision  panic\u2028\u202e"


def test_printable_escapes_controls_separators_and_bidi() -> None:
    assert printable("a\x1b[31mb\nc\u2028d\u202ee\u00e9") == "a\\x1b[31mb\\x0ac\\u2028d\\u202ee\u00e9"


def test_audit_show_and_status_escape_what_the_wire_sent(tmp_path: Path) -> None:
    """Review finding: ANSI escapes and fake audit lines from a Finish message or a controller's reason got
    through `audit show`, `status` and the logs (and `watch`, since it prints lines for people too)."""
    daemon = DaemonProcess(tmp_path / "data", "--log-format", "console")
    address = ["--address", daemon.address]
    client = AttachClient(daemon.address, "esc-run")
    client.connect()
    halted = governor_cli(["halt", "esc-run", "--reason", FORGED, *address])
    assert halted.returncode == 0, halted.stderr
    client.next("command")
    status = governor_cli(["status", "esc-run", *address])  # shows the open HALT and its reason
    seq = client.next_seq()
    finish = trainer_service_pb2.Finish(seq=seq, status=common_pb2.FINISH_STATUS_HALTED, message=FORGED, duration_s=1)
    client.send(finish=finish)
    client.wait_ack(seq)
    watched = governor_cli(["watch", *address, "--run", "esc-run", "--kind", "controller_request", "--limit", "1"])
    client.close()
    assert daemon.terminate() == 0
    show = governor_cli(["audit", "show", "--data-dir", str(tmp_path / "data"), "--run", "esc-run"])
    for output in (show.stdout, status.stdout, watched.stdout, daemon.log_path.read_text()):
        assert "\x1b" not in output
        assert "\u2028" not in output
        assert "\u202e" not in output
    escaped = [line for line in show.stdout.splitlines() if "\\x1b[2J" in line]
    assert escaped, show.stdout
    assert all("\\x0a      99 2026" in line for line in escaped), "the forged line stays inside its entry"
    assert not any(line.lstrip().startswith("99 ") for line in show.stdout.splitlines())
    assert "\\x1b[2J" in status.stdout
    assert len(watched.stdout.splitlines()) == 1, "watch: the forged line stays inside its event's line"
    assert "\\x0a      99 2026" in watched.stdout
