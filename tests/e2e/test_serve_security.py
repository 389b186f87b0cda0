"""`governor serve` security settings as an operator meets them: explicit mTLS roles, token file hygiene,
warnings at start-up, tokens reloaded on SIGHUP."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from governor_daemon.daemon_process import DaemonProcess
from tests.conftest import governor_cli
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

SERVE = ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off"]


def test_mtls_without_a_tokens_file_refuses_to_start(tmp_path: Path) -> None:
    """Review finding: without a tokens file every CA-signed certificate was a controller."""
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    tls = ["--tls-cert", str(pem), "--tls-key", str(pem), "--tls-client-ca", str(pem)]
    result = governor_cli([*SERVE, "--data-dir", str(tmp_path / "data"), *tls], timeout_s=30)
    assert result.returncode == 2
    assert "needs tokens_file" in result.stdout + result.stderr


def test_a_hash_inside_a_token_is_an_error_not_a_truncation(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# name role token\nops controller abcdefgh#ijklmnopqrst  # trailing comment\n")
    tokens.chmod(0o600)
    result = governor_cli([*SERVE, "--data-dir", str(tmp_path / "data"), "--tokens-file", str(tokens)], timeout_s=30)
    assert result.returncode == 2
    assert "tokens:2: '#' inside a field" in result.stdout + result.stderr


def test_readable_tokens_file_warns_and_sighup_reloads_it(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ops controller old-token-0123456789\n")
    tokens.chmod(0o644)
    daemon = DaemonProcess(tmp_path / "data", "--tokens-file", str(tokens))
    try:
        with grpc.insecure_channel(daemon.address) as channel:
            stub = cgrpc.ControlServiceStub(channel)
            stub.ListRuns(cpb.ListRunsRequest(), metadata=(("authorization", "Bearer old-token-0123456789"),))
            tokens.write_text("ops controller new-token-0123456789\n")
            tokens.chmod(0o600)
            daemon.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "tokens reloaded" not in daemon.log_path.read_text():
                assert time.monotonic() < deadline, daemon.log_path.read_text()[-2000:]
                time.sleep(0.05)
            stub.ListRuns(cpb.ListRunsRequest(), metadata=(("authorization", "Bearer new-token-0123456789"),))
            with pytest.raises(grpc.RpcError) as info:
                stub.ListRuns(cpb.ListRunsRequest(), metadata=(("authorization", "Bearer old-token-0123456789"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, "the old token works after SIGHUP"
            tokens.write_text("broken line\n")
            daemon.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "tokens file not reloaded" not in daemon.log_path.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            stub.ListRuns(cpb.ListRunsRequest(), metadata=(("authorization", "Bearer new-token-0123456789"),))
    finally:
        assert daemon.terminate() == 0
    log = daemon.log_path.read_text()
    assert "is readable by group or others (mode 644)" in log
