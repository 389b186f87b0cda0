"""Two real ranks (gloo on CPU) at an agreement point: the same command on every rank, or none."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch.multiprocessing as mp

from tests.unit.trainer.helpers import governed_run
from tolaria.governor.v1 import common_pb2


def _rank(rank: int, port: int, holders: list[int], results: Any) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    run, governor = governed_run(epochs=1)
    run.gov.start()
    if rank in holders:
        governor.command(3, common_pb2.COMMAND_TYPE_ROLLBACK, timeline=0)
    run.state.step = 17  # trained a little since the LKG
    run.gov.agreement_point()
    results_sent = [m.command_result for m in governor.drain() if m.WhichOneof("message") == "command_result"]
    results.put((rank, run.state.timeline, run.state.step, [(r.command_id, r.new_timeline) for r in results_sent]))
    run.dist.close()


def run_two_ranks(holders: list[int]) -> list[tuple[int, int, int, list[tuple[int, int]]]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_rank, args=(port, holders, results), nprocs=2, start_method="spawn")
    return sorted(results.get(timeout=60) for _ in range(2))


@pytest.mark.slow
def test_a_rank_whose_stream_never_delivered_the_command_executes_it_too() -> None:
    """D2: rank 0 never received ROLLBACK 3 (refused or reconnecting); rank 1 sends it, both restore and answer."""
    assert run_two_ranks(holders=[1]) == [(0, 1, 0, [(3, 1)]), (1, 1, 0, [(3, 1)])]
