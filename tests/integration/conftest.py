"""Fixtures: a real daemon on 127.0.0.1:0 in-process, and Attach clients against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from governor_daemon.testing import AttachClient, InProcessDaemon
from tolaria.governor.v1 import control_service_pb2_grpc


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    """A started daemon with its journal in tmp_path/data."""
    with InProcessDaemon(tmp_path / "data") as d:
        yield d


@pytest.fixture
def connect(daemon: InProcessDaemon) -> Iterator[Callable[..., AttachClient]]:
    """Factory of connected AttachClients; all are closed at the end."""
    clients: list[AttachClient] = []

    def make(run_id: str = "run-1", **kwargs: Any) -> AttachClient:
        client = AttachClient(daemon.address, run_id, **kwargs)
        clients.append(client)
        client.connect()
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def control(daemon: InProcessDaemon) -> Iterator[control_service_pb2_grpc.ControlServiceStub]:
    """A ControlService stub."""
    channel = grpc.insecure_channel(daemon.address)
    yield control_service_pb2_grpc.ControlServiceStub(channel)
    channel.close()


HEALTHY = [2.3, 1.9, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.65, 0.6, 0.58, 0.55]


def warm_up(client: AttachClient, losses: list[float] = HEALTHY, start_step: int = 0) -> int:
    """Send healthy validation records and consume their verdicts; returns the next step."""
    step = start_step
    for loss in losses:
        step += 10
        client.validation(step, loss, epoch=step // 10)
        client.next("verdict")
    return step
