"""Point-to-point hand-off of IntermediateTensors between neighbouring stages (torch.distributed).

Both ends know the shape from the SchedulerOutput (tokens x hidden), so only the data travels: hidden
states and residual go as one (2, T, hidden) tensor, one message per step. Gloo moves bytes, so 16-bit
floats travel viewed as int16 (gloo has no bfloat16); NCCL takes them as they are.

With tensor parallelism every TP rank of a stage holds the same full tensors. Each sends only its 1/T
slice of the hidden dimension to its peer (same TP rank) in the next stage, which all-gathers the slices
over its fast TP group: the slow link between stages carries each activation once, not T times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeserve.distributed.parallel_state import TPGroup, host_staged, peer_errors
from pipeserve.types import IntermediateTensors


def _wire(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


class StageLink:
    """Sends to the next stage's rank and receives from the previous one, in step order."""

    def __init__(self, prev_rank: int | None, next_rank: int | None, tp: TPGroup | None = None):
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.tp = tp or TPGroup()
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.bytes_sent = 0

    def send(self, tensors: IntermediateTensors) -> None:
        """Start sending; the previous send is completed first so at most one is outstanding."""
        self.wait_sends()
        packed = torch.stack((tensors.hidden_states, tensors.residual))  # (2, T, hidden)
        start, width = self.tp.shard(packed.shape[-1])
        part = packed[..., start : start + width].contiguous()  # (2, T, hidden / tp)
        wire = _wire(part.cpu() if host_staged(part.device) else part)
        with peer_errors():
            self._pending.append((dist.isend(wire, dst=self.next_rank), wire))
        self.bytes_sent += wire.numel() * wire.element_size()

    def recv(self, num_tokens: int, hidden: int, dtype: torch.dtype, device: str) -> IntermediateTensors:
        """Receive the previous stage's tensors for a step of `num_tokens` tokens."""
        buf = torch.empty(2, num_tokens, hidden // self.tp.size, dtype=dtype,
                          device="cpu" if host_staged(device) else device)
        with peer_errors():
            dist.recv(_wire(buf), src=self.prev_rank)
        buf = buf.to(device)
        full = self.tp.all_gather(buf, dim=-1)  # (2, T, hidden)
        return IntermediateTensors(full[0], full[1])

    def wait_sends(self) -> None:
        pending, self._pending = self._pending, []
        with peer_errors():
            for work, _ in pending:
                work.wait()

    def drop_sends(self) -> None:
        """Forget sends of a broken group (their peer is gone; waiting on them would only raise again)."""
        self._pending.clear()
