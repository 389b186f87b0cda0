"""A journal write failure is fatal and loud, never silent, and a restart recovers from the journal."""

from __future__ import annotations

from pathlib import Path

import grpc

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.testing import AttachClient
from tests.conftest import governor_cli
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc


def test_disk_full_stops_the_daemon_and_restart_recovers(tmp_path: Path) -> None:
    """Review finding: on ENOSPC the daemon stayed up, SERVING, showed state that was not on disk and ended
    new streams with no status. Now: streams end UNAVAILABLE, one clear error, exit 8; nothing acknowledged
    is lost."""
    data = tmp_path / "data"
    daemon = DaemonProcess(data, max_file_bytes=200_000)
    client = AttachClient(daemon.address, "full")
    client.connect()
    acked = 0
    error: grpc.RpcError | None = None
    try:
        for i in range(400):
            client.vitals(range(64 * i, 64 * i + 64), [0.5] * 64)
            while True:
                message = client._inbox.get(timeout=10)
                if message is None or isinstance(message, grpc.RpcError):
                    raise message or EOFError("stream ended without a status")
                if message.WhichOneof("message") == "ack":
                    acked = message.ack.up_to_seq
                    break
    except grpc.RpcError as exc:
        error = exc
    finally:
        client.close()
    assert error is not None, "the journal never filled up"
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    code = daemon.proc.wait(20)
    log = daemon.log_path.read_text()
    assert code == 8, log[-3000:]  # JOURNAL_FAILED, not the internal-error code
    assert log.count("journal write failed: no more acknowledgements") == 1
    assert "Traceback" not in log

    restarted = DaemonProcess(data)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            run = cgrpc.ControlServiceStub(channel).GetPanicState(cpb.GetPanicStateRequest(run_id="full")).run
        assert run.ranks[0].last_durable_seq >= acked > 0, "every acknowledged record survived"
    finally:
        assert restarted.terminate() == 0
    result = governor_cli(["audit", "verify", "--data-dir", str(data)], timeout_s=60)
    assert result.returncode == 0, result.stdout
