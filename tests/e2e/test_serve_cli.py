"""`governor serve` as a process: health, reflection, SIGTERM shutdown, configuration, no torch."""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.testing import AttachClient
from tests.conftest import governor_cli


def kinds(data_dir: Path) -> list[str]:
    return [
        item.entry.kind for p in list_segments(data_dir) for item in read_segment(p) if isinstance(item, LocatedEntry)
    ]


def test_health_reflection_and_sigterm_shutdown(tmp_path: Path, no_torch_env: dict[str, str]) -> None:
    """SERVING via grpc.health.v1; reflection lists the services; SIGTERM ends streams and exits 0 (no torch)."""
    daemon = DaemonProcess(tmp_path / "data", env=no_torch_env)
    channel = grpc.insecure_channel(daemon.address)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="tolaria.governor.v1.ControlService")).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(iter(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    names = {s.name for s in answer.list_services_response.service}
    assert {
        "tolaria.governor.v1.TrainerService",
        "tolaria.governor.v1.ControlService",
        "grpc.health.v1.Health",
    } <= names
    client = AttachClient(daemon.address, "shutdown-run")
    client.connect()
    client.validation(10, math.nan)
    client.next("command")
    started = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - started < 10
    assert client.next("stream_end").stream_end.reason.startswith("daemon shutting down")
    client.close()
    channel.close()
    assert kinds(tmp_path / "data")[-1] == "daemon_stop"
    assert "governor stopped; journal flushed" in daemon.log_path.read_text()


def test_configuration_precedence_flags_env_toml(tmp_path: Path) -> None:
    """Policy defaults: flag over GOVERNOR_* over the TOML file over built-in defaults."""
    config = tmp_path / "governor.toml"
    config.write_text("group_commit_ms = 1.0\n[policy]\nsensitivity = 4.0\nmultiplier = 2.5\ndeath_penalty = 7.0\n")
    daemon = DaemonProcess(
        tmp_path / "data",
        "--config",
        str(config),
        "--policy",
        "multiplier=2.0",
        env={"GOVERNOR_POLICY": "multiplier=2.2,death_penalty=5.0"},
    )
    client = AttachClient(daemon.address, "cfg")
    welcome = client.connect()
    policy = welcome.effective_policy
    # The flag's --policy replaces GOVERNOR_POLICY as a whole; the file's [policy] table is the base.
    assert (policy.sensitivity, policy.multiplier, policy.death_penalty) == (4.0, 2.0, 7.0)
    client.close()
    daemon.terminate()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "nonsense"], {}, "listen must be HOST:PORT"),
        (["--policy", "history_window=3"], {}, "history_window (3) must be >= min_history (10)"),
        ([], {"GOVERNOR_MAX_ACTIVE_RUNS": "many"}, "max_active_runs from GOVERNOR_MAX_ACTIVE_RUNS must be a int"),
        (["--lock-policy-fields", "colour"], {}, "lock_policy_fields names unknown field(s) colour"),
        (["--shutdown-grace-s", "30"], {}, "shutdown_grace_s must be in [0, 10)"),
    ],
)
def test_bad_configuration_exits_2(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    """A bad setting is named with its source and the process exits 2 before serving."""
    result = governor_cli(["serve", "--data-dir", str(tmp_path / "d"), "--metrics-listen", "off", *args], env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "d").exists(), "nothing was created"


def test_unknown_toml_key_exits_2(tmp_path: Path) -> None:
    """An unknown key in the TOML file is named with the known ones."""
    config = tmp_path / "g.toml"
    config.write_text("listen_adress = '127.0.0.1:1'\n")
    result = governor_cli(["serve", "--config", str(config)])
    assert result.returncode == 2
    assert "unknown setting(s) listen_adress" in result.stderr


def test_locked_fields_are_ignored_and_reported(tmp_path: Path) -> None:
    """--lock-policy-fields stops a trainer's override; Welcome names the ignored field."""
    daemon = DaemonProcess(tmp_path / "data", "--lock-policy-fields", "death_penalty")
    client = AttachClient(daemon.address, "locked", overrides={"death_penalty": 1.0, "sensitivity": 5.0})
    welcome = client.connect()
    assert welcome.effective_policy.death_penalty == 10.0
    assert welcome.effective_policy.sensitivity == 5.0
    assert list(welcome.ignored_policy_fields) == ["death_penalty"]
    client.close()
    daemon.terminate()
    created = [
        item.entry
        for p in list_segments(tmp_path / "data")
        for item in read_segment(p)
        if isinstance(item, LocatedEntry) and item.entry.kind == "run_created"
    ]
    assert created[0].payload["ignored_policy_fields"] == ["death_penalty"]


def test_metrics_endpoint(tmp_path: Path) -> None:
    """Prometheus text with governor_ metrics on --metrics-listen."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = DaemonProcess(tmp_path / "data", "--metrics-listen", f"127.0.0.1:{port}")
    client = AttachClient(daemon.address, "m")
    client.connect()
    client.validation(10, 2.0)
    client.next("verdict")
    client.wait_ack(1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'governor_verdicts_total{kind="healthy"} 1' in body
    assert 'governor_records_received_total{kind="validation"} 1' in body
    assert "governor_journal_fsync_seconds_count" in body
    assert 'governor_runs{state="healthy"} 1' in body
    client.close()
    daemon.terminate()


def test_sigterm_right_after_start_stops_cleanly(tmp_path: Path) -> None:
    """A SIGTERM that comes as soon as the port file exists (a supervisor stopping a daemon it just started)
    used to find no handler installed yet: the daemon died with -15 in 4 of 15 tries. Now it exits 0."""
    for attempt in range(8):
        daemon = DaemonProcess(tmp_path / f"data-{attempt}")
        assert daemon.terminate() == 0, daemon.log_path.read_text()[-2000:]
