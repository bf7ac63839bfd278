"""Token embedding and LM head, split along the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.layers.linear import NO_TP, QuantizableWeight, default_weight_loader


class _VocabShard(nn.Module):
    """Holds rows [start, start + per_rank) of a (vocab, hidden) matrix; the vocabulary is padded so it
    divides evenly, and padding rows stay zero."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, tp: TPGroup):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        rows = loaded[self.start : self.start + self.per_rank]
        target = param.data[: rows.shape[0]]
        # Padding rows have no codes: only a full shard can stay exactly 4-bit.
        full = rows.shape[0] == self.per_rank
        if not (isinstance(self, QuantizableWeight) and full and self.defer_int4(None, rows, target)):
            default_weight_loader(target, rows)


class VocabParallelEmbedding(_VocabShard):
    """Each rank looks up the ids it owns (zeros elsewhere); an all-reduce assembles the embeddings."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (T, hidden)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(_VocabShard, QuantizableWeight):
    """Each rank scores its slice of the vocabulary; an all-gather assembles the full logits."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, tp: TPGroup = NO_TP):
        super().__init__(vocab_size, hidden, dtype, tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden)  # (S, vocab / T)
        return self.tp.all_gather(logits, dim=-1)[:, : self.vocab_size]
