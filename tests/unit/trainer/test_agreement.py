"""Two real ranks (gloo on CPU) at an agreement point: the same command on every rank, or none."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch.multiprocessing as mp

from tests.conftest import REPO
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


PEER = """
import os, signal, sys
import torch
from tolaria_trainer.distributed import Distributed
from tolaria_trainer.errors import PeerLost
dist = Distributed(torch.device("cpu"))
assert dist.agree_max(dist.rank) == 1  # both ranks are up
if dist.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no goodbye to the group
param = torch.nn.Parameter(torch.ones(4))
param.grad = torch.ones(4)
try:
    dist.average_gradients([param])
except PeerLost as exc:
    print(exc)
    sys.exit(0)
sys.exit("the collective went on without its peer")
"""


def test_a_rank_whose_peer_is_killed_mid_run_gets_peer_lost_not_a_crash() -> None:
    """Rank 1 is killed (SIGKILL) after the group formed; rank 0's next gradient all-reduce fails, and that is
    PeerLost naming the collective (tolaria-train exits 9 and leaves the run to the launcher's restart), not
    gloo's RuntimeError, which the CLI reported as an internal error, a bug."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PEER],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    out, err = procs[0].communicate()
    procs[1].wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 0, err
    assert out.startswith("averaging the gradients with the other ranks failed ("), out
    assert out.rstrip().endswith("another rank crashed or was killed"), out
