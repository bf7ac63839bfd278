"""A rank's tensor-parallel group and its collectives (the grid's arithmetic is in rank_layout.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeserve.distributed.rank_layout import RankLayout


class PeerLost(RuntimeError):
    """A torch.distributed operation failed: a peer rank died, hung up, or dropped the group."""


@contextlib.contextmanager
def peer_errors() -> Iterator[None]:
    """Turn a failed collective or point-to-point operation into PeerLost, so a rank can tell "a peer is
    gone" (it survives and waits to regroup) from "my own computation raised" (it reports and exits)."""
    try:
        yield
    except RuntimeError as exc:  # gloo and NCCL raise RuntimeError subclasses (DistBackendError, ...)
        raise PeerLost(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def host_staged(device: torch.device | str) -> bool:
    """True when tensors on `device` must pass through host memory: CUDA under gloo, which the group runs
    when ranks share a GPU (rank_process.choose_backend) and whose point-to-point ops take CPU tensors only."""
    return torch.device(device).type == "cuda" and dist.get_backend() == "gloo"


@dataclass(eq=False)
class TPGroup:
    """This rank's tensor-parallel group; with size 1 every collective is a no-op.

    Every layer of a stage holds this same object, so after a recovery forms a new process group a surviving
    rank points `group` at the new one (`init_tp_groups(..., into=tp)`) without rebuilding its model.
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place. Gloo cannot add 16-bit floats, so on CPU they are summed in float32."""
        if self.size == 1:
            return x
        if host_staged(x.device):
            return x.copy_(self.all_reduce(x.cpu()))
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            wide = x.float()
            with peer_errors():
                dist.all_reduce(wide, group=self.group)
            return x.copy_(wide)
        with peer_errors():
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, in rank order."""
        if self.size == 1:
            return x
        if host_staged(x.device):
            return self.all_gather(x.cpu(), dim).to(x.device)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        with peer_errors():
            dist.all_gather([_bits(p) for p in parts], _bits(x.contiguous()), group=self.group)
        return torch.cat(parts, dim=dim)

    def shard(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's equal share of `total` (which must divide evenly)."""
        if total % self.size:
            raise ValueError(f"{total} does not split evenly over tensor_parallel_size={self.size}")
        size = total // self.size
        return self.rank * size, size


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Gloo has no bfloat16 (nor int16 in collectives): bfloat16 travels as float16 bits where only bytes
    move (all-gather), never added."""
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return t.view(torch.float16)
    return t


def tp_group_of(layout: RankLayout, rank: int) -> TPGroup:
    """This rank's TP group, not yet bound to a process group (enough to load its shard of the weights)."""
    return TPGroup(layout.tp_rank(rank), layout.tp_size) if layout.tp_size > 1 else TPGroup()


def init_tp_groups(layout: RankLayout, rank: int, into: TPGroup | None = None) -> TPGroup:
    """Create every TP group of the current process group (all ranks must create all groups, in the same
    order) and bind ours to `into` (a new TPGroup when None)."""
    mine = into or tp_group_of(layout, rank)
    for stage in range(layout.pp_size):
        ranks = layout.stage_ranks(stage)
        group = dist.new_group(ranks) if layout.tp_size > 1 else None
        if rank in ranks:
            mine.group = group
    return mine
