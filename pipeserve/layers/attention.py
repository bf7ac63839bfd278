"""Paged attention on top of torch's scaled_dot_product_attention.

The KV cache of a layer is one tensor (2, num_blocks, block_size, num_kv_heads, head_dim). New keys and
values are written to their slots (`slot_mapping`); attention then reads each request's context through
its block table. Decodes are batched into one padded SDPA call; each prefill chunk gets its own call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    """A prompt chunk of `num_tokens` queries at positions start_pos.. in the flat token batch."""

    query_start: int
    num_tokens: int
    start_pos: int
    context_slots: torch.Tensor | None  # (ctx,) cache slots of positions 0..ctx-1; None when start_pos == 0
    mask: torch.Tensor | None  # (n, ctx) bool, True = may attend; None when the chunk is the whole context


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer of the stage."""

    slot_mapping: torch.Tensor  # (T,) cache slot of each new token
    num_decodes: int = 0  # the first num_decodes tokens are single-token decodes
    decode_blocks: torch.Tensor | None = None  # (B, max_blocks) block table, padded with block 0
    decode_mask: torch.Tensor | None = None  # (B, 1, 1, max_blocks*block_size) bool
    prefills: list[PrefillChunk] = field(default_factory=list)
    _workspace: torch.Tensor | None = None  # (2, B*max_blocks, block elems): reused by every layer

    def gather_blocks(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decodes' K and V as padded contiguous contexts, (B, L, nkv, hd) each.

        One buffer serves all layers of the step: a fresh multi-MB tensor per layer would cost page
        faults on every call, which dominated decode time at long contexts.
        """
        nb, bs, nkv, hd = kv_cache.shape[1:]
        b, max_blocks = self.decode_blocks.shape
        ids = self.decode_blocks.view(-1)
        if self._workspace is None or self._workspace.dtype != kv_cache.dtype:
            self._workspace = torch.empty(2, ids.numel(), bs * nkv * hd, dtype=kv_cache.dtype, device=kv_cache.device)
        torch.index_select(kv_cache[0].view(nb, -1), 0, ids, out=self._workspace[0])
        torch.index_select(kv_cache[1].view(nb, -1), 0, ids, out=self._workspace[1])
        shape = (b, max_blocks * bs, nkv, hd)
        return self._workspace[0].view(shape), self._workspace[1].view(shape)


class PagedAttention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends over each request's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: (T, nh, hd); k, v: (T, nkv, hd); kv_cache: (2, NB, bs, nkv, hd)
        k_flat = kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)  # (NB*bs, nkv, hd)
        v_flat = kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], kv_cache, meta)
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.num_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], k_flat, v_flat, chunk)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b, nkv, hd = q.shape[0], self.num_kv_heads, self.head_dim
        keys, values = meta.gather_blocks(kv_cache)  # (B, L, nkv, hd) each, L = max_blocks * block_size
        # Fold each KV head's query group into the query length: (B, nkv, g, hd). torch's CPU kernels are
        # several times faster this way than with one query row and GQA expansion, and the math is the same.
        o = F.scaled_dot_product_attention(
            q.view(b, nkv, -1, hd),
            keys.transpose(1, 2),  # (B, nkv, L, hd)
            values.transpose(1, 2),
            attn_mask=meta.decode_mask,  # (B, 1, 1, L)
            scale=self.scale,
        )
        return o.reshape(b, self.num_heads, hd)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor,
                 v_flat: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        if chunk.context_slots is not None:  # a later chunk: earlier positions live in the cache
            k, v = k_flat.index_select(0, chunk.context_slots), v_flat.index_select(0, chunk.context_slots)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # (1, nh, n, hd)
            k.transpose(0, 1).unsqueeze(0),  # (1, nkv, ctx, hd)
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return o.squeeze(0).transpose(0, 1)  # (n, nh, hd)
