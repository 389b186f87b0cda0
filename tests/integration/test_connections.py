"""Idle connections cannot starve the daemon of file descriptors."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc

from governor_daemon.testing import InProcessDaemon
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc


def test_connections_that_never_handshake_are_closed(tmp_path: Path) -> None:
    """Review finding: 1,100 idle TCP connections starved a 1024-fd daemon. Connections that never complete
    the HTTP/2 handshake are closed after handshake_timeout_s, and the daemon serves calls meanwhile."""
    with InProcessDaemon(tmp_path / "data", handshake_timeout_s=1.0) as daemon:
        host, port = daemon.address.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(200)]
        try:
            with grpc.insecure_channel(daemon.address) as channel:
                assert cgrpc.ControlServiceStub(channel).ListRuns(cpb.ListRunsRequest(), timeout=5).runs == []
            deadline = time.monotonic() + 15
            closed = 0
            for sock in idle:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    while sock.recv(4096):  # the server's preface, if it got that far, then EOF
                        pass
                    closed += 1
                except ConnectionResetError:
                    closed += 1
                except TimeoutError:
                    pass
            assert closed == len(idle), f"{closed}/{len(idle)} idle connections closed by the daemon"
        finally:
            for sock in idle:
                sock.close()
