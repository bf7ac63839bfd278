"""Paged attention for CPU (and any torch device) without custom kernels.

The KV cache of a layer is one tensor (2, num_kv_heads, num_blocks, block_size, head_dim): head-major, so
that a gathered context is already laid out per KV head. New keys and values are written to their slots
(`slot_mapping`); attention then reads each request's context through its block table.

* Decodes are batched: the step's blocks are gathered once per layer into a reused workspace of shape
  (nkv, B, L, hd), and attention is two batched matmuls over (kv head, request) pairs with the query
  group of each KV head as the rows (no GQA expansion). Scores are computed in the model dtype and
  softmaxed in float32, as HF's eager attention does. This is about 2x faster than torch's CPU SDPA
  kernel in bfloat16 for one query row per request.
* Each prefill chunk gets one `scaled_dot_product_attention` call (causal, offset by its start).
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
    # The decodes' block tables (B, max_blocks) int32 (unused entries arbitrary) and context lengths (B,) int32:
    # a decode attends to the first context_lens[i] positions of its table.
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (cos, signed sin), set by the model
    _workspace: torch.Tensor | None = None  # (2, nkv, B*max_blocks, block_size*hd): reused by every layer
    _bias: torch.Tensor | None = None  # (nkv * B, 1, L) additive mask from context_lens, in the model dtype

    def gather_blocks(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decodes' K and V as padded contiguous contexts, (nkv * B, L, hd) each.

        One buffer serves all layers of the step: a fresh multi-MB tensor per layer would cost page
        faults on every call, which dominated decode time at long contexts.
        """
        _, nkv, nb, bs, hd = kv_cache.shape
        b, max_blocks = self.block_tables.shape
        ids = self.block_tables.reshape(-1)
        if self._workspace is None or self._workspace.dtype != kv_cache.dtype:
            self._workspace = torch.empty(2, nkv, ids.numel(), bs * hd, dtype=kv_cache.dtype, device=kv_cache.device)
        for i in range(2):
            torch.index_select(kv_cache[i].view(nkv, nb, bs * hd), 1, ids, out=self._workspace[i])
        shape = (nkv * b, max_blocks * bs, hd)
        return self._workspace[0].view(shape), self._workspace[1].view(shape)

    def decode_bias_for(self, num_kv_heads: int, dtype: torch.dtype, length: int) -> torch.Tensor:
        """(nkv * B, 1, L) additive mask matching the gathered layout (kv head major, then request): 0 where a
        key exists, -inf past each context. Built on the device from context_lens (no host round trip)."""
        if self._bias is None or self._bias.dtype != dtype:
            lens = self.context_lens
            pad = torch.arange(length, device=lens.device)[None, :] >= lens[:, None]  # (B, L)
            bias = torch.zeros(pad.shape, dtype=dtype, device=lens.device).masked_fill_(pad, float("-inf"))
            self._bias = bias.repeat(num_kv_heads, 1).view(num_kv_heads * lens.shape[0], 1, length)
        return self._bias


class PagedAttention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends over each request's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: (T, nh, hd); k, v: (T, nkv, hd); kv_cache: (2, nkv, NB, bs, hd)
        k_slots = kv_cache[0].view(self.num_kv_heads, -1, self.head_dim)  # (nkv, NB*bs, hd)
        v_slots = kv_cache[1].view(self.num_kv_heads, -1, self.head_dim)
        k_slots.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_slots.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        if meta.num_decodes == q.shape[0]:  # a decode-only step: nothing to place the rows around
            return self._decode(q, kv_cache, meta)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], kv_cache, meta)
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.num_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], k_slots, v_slots, chunk)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b, nkv, hd = q.shape[0], self.num_kv_heads, self.head_dim
        keys, values = meta.gather_blocks(kv_cache)  # (nkv*B, L, hd)
        queries = q.view(b, nkv, -1, hd).transpose(0, 1).reshape(nkv * b, -1, hd)  # (nkv*B, g, hd)
        bias = meta.decode_bias_for(nkv, q.dtype, keys.shape[1])  # (nkv*B, 1, L)
        scores = torch.baddbmm(bias, queries, keys.transpose(1, 2), alpha=self.scale)  # (nkv*B, g, L)
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        o = torch.bmm(probs, values)  # (nkv*B, g, hd)
        return o.view(nkv, b, -1, hd).transpose(0, 1).reshape(b, self.num_heads, hd)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor,
                 v_slots: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        if chunk.context_slots is not None:  # a later chunk: earlier positions live in the cache
            keys, values = k_slots.index_select(1, chunk.context_slots), v_slots.index_select(1, chunk.context_slots)
        else:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # (nkv, n, hd)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # (1, nh, n, hd)
            keys.unsqueeze(0),  # (1, nkv, ctx, hd)
            values.unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return o.squeeze(0).transpose(0, 1)  # (n, nh, hd)
