"""Multi-rank helpers over torch.distributed (torchrun): rank facts, gradient averaging, and the
agreement collectives over a separate gloo group on CPU tensors (no device sync)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tolaria_trainer.errors import PeerLost


@contextlib.contextmanager
def _with_peers(what: str) -> Iterator[None]:
    """A collective: its failure (gloo's "Connection closed by peer", NCCL's errors, a timeout) means another
    rank is gone, which is an outcome of the run (PeerLost), not a bug of this rank."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed's DistError and its kinds are RuntimeErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLost(f"{what} with the other ranks failed ({first}): another rank crashed or was killed") from exc


def _init_process_group(backend: str, rank: int, world_size: int) -> None:
    """``init_process_group`` from torchrun's environment. Under torchrun's agent store (which outlives a
    restart of the workers, ``--max-restarts``) the keys go under a prefix of this attempt: the default
    rendezvous would read the previous attempt's addresses from the store (gloo: "Connection refused")."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        dist.init_process_group(backend=backend)
        return
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, world_size, is_master=False)  # type: ignore[attr-defined]
    prefixed = dist.PrefixStore(f"/tolaria/attempt_{attempt}", store)  # type: ignore[attr-defined]
    dist.init_process_group(backend=backend, store=prefixed, rank=rank, world_size=world_size)


class Distributed:
    """Rank facts and collectives; with world_size 1 every collective is the identity."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._agree_group: dist.ProcessGroup | None = None
        if self.world_size > 1:
            if not dist.is_initialized():
                _init_process_group("nccl" if device.type == "cuda" else "gloo", self.rank, self.world_size)
            # Agreement runs on CPU tensors over gloo even when training uses NCCL: no device sync.
            self._agree_group = dist.new_group(backend="gloo")

    @property
    def is_distributed(self) -> bool:
        """True with more than one rank."""
        return self.world_size > 1

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """All-reduce (mean) the gradients of ``parameters`` over the training group."""
        if not self.is_distributed:
            return
        with _with_peers("averaging the gradients"):
            for param in parameters:
                if param.grad is not None:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                    param.grad.div_(self.world_size)

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module``."""
        if not self.is_distributed:
            return
        with torch.no_grad(), _with_peers("broadcasting rank 0's parameters"):
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)

    def agree_max(self, value: int) -> int:
        """The maximum of ``value`` over ranks (CPU tensor, gloo group)."""
        return self._agree(value, dist.ReduceOp.MAX)

    def agree_min(self, value: int) -> int:
        """The minimum of ``value`` over ranks (CPU tensor, gloo group)."""
        return self._agree(value, dist.ReduceOp.MIN)

    def broadcast_bytes(self, data: bytes, src: int) -> bytes:
        """Rank ``src``'s ``data`` on every rank (gloo group; what other ranks pass is ignored)."""
        if not self.is_distributed:
            return data
        box: list[object] = [data if self.rank == src else None]
        with _with_peers("an agreement broadcast"):
            dist.broadcast_object_list(box, src=src, group=self._agree_group)
        received = box[0]
        assert isinstance(received, bytes)
        return received

    def _agree(self, value: int, op: dist.ReduceOp.RedOpType) -> int:
        if not self.is_distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        with _with_peers("an agreement"):
            dist.all_reduce(tensor, op=op, group=self._agree_group)
        return int(tensor[0])

    def close(self) -> None:
        """Tear the process group down."""
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()
