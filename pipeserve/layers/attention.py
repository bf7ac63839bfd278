"""Paged attention: Triton kernels that read the cache in place on CUDA, torch operators elsewhere.

The KV cache of a layer is one tensor (2, num_kv_heads, num_blocks, block_size, head_dim): head-major, so
that a gathered context is already laid out per KV head. New keys and values are written to their slots
(`slot_mapping`); attention then reads each request's context through its block table.

Metadata contract (`AttentionMetadata`, one per step, shared by every layer of the stage):
* Rows of the step: `num_decodes` single-token decodes first, then the prefill chunks' tokens.
* `slot_mapping` (T,) int64: the cache slot of each row's new K/V; -1 marks a padding row (nothing stored).
* Decodes: `block_tables` (B, max_blocks) int32, where B = num_decodes (padding rows included) and entries
  past a request's blocks hold any valid block id (0); `context_lens` (B,) int32, the tokens each decode
  attends to including its own, 0 for a padding row. A padding row's output is zeros. Nothing else about the
  decodes is needed, so a static, padded batch (a CUDA graph's) fills only these tensors in place.
* `has_padding`: True when any row is a padding row (the CPU path then filters them; the kernels need no flag).
* Prefills: on a device where `device_uses_kernels`, `packed_prefill` (all chunks, from `pack_prefills`); elsewhere
  `prefills`, one `PrefillChunk` per chunk.
* Set by the model: `positions` where the rotary kernel runs, else `rope_tables`.

Paths:
* CUDA with triton: a store kernel writes K/V, a split-KV decode kernel walks the block tables, and one
  prefill kernel serves every chunk of the step (triton_attention.py).
* Elsewhere (the CPU, where these are the fastest): `index_copy_` stores K/V; decodes are batched by
  gathering the step's blocks once per layer into a reused workspace of shape (nkv, B, L, hd), then two
  batched matmuls over (kv head, request) pairs with the query group of each KV head as the rows (no GQA
  expansion); scores are computed in the model dtype and softmaxed in float32, as HF's eager attention
  does (about 2x faster than torch's CPU SDPA kernel in bfloat16 for one query row per request). Each
  prefill chunk gets one `scaled_dot_product_attention` call (causal, offset by its start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.layers.kernel_select import uses_kernels


def _kernels(t: torch.Tensor) -> ModuleType | None:
    if not uses_kernels(t):
        return None
    from pipeserve.layers import triton_attention  # imported on first CUDA use: CPU runs never load triton

    return triton_attention


@dataclass
class PrefillChunk:
    """A prompt chunk of `num_tokens` queries at positions start_pos.. in the flat token batch."""

    query_start: int
    num_tokens: int
    start_pos: int
    context_slots: torch.Tensor | None  # (ctx,) cache slots of positions 0..ctx-1; None when start_pos == 0
    mask: torch.Tensor | None  # (n, ctx) bool, True = may attend; None when the chunk is the whole context


@dataclass
class PackedPrefill:
    """Every prefill chunk of a step as one kernel's input; rows counted from the first prefill row."""

    cu_query_lens: torch.Tensor  # (C+1,) int32: chunk c is rows cu[c]:cu[c+1]
    start_pos: torch.Tensor  # (C,) int32: position of each chunk's first token
    block_tables: torch.Tensor  # (C, max_blocks) int32
    max_query_len: int


def pack_prefills(chunks: list[tuple[list[int], int, int]], block_size: int,
                  device: torch.device | str) -> PackedPrefill:
    """The kernel's form of a step's prefill chunks, each given as (block table, start_pos, num_tokens)."""
    cu, starts, tables = packed_prefill_arrays(chunks, block_size)
    return PackedPrefill(cu.to(device), starts.to(device), tables.to(device), max(n for *_, n in chunks))


def packed_prefill_arrays(chunks: list[tuple[list[int], int, int]], block_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`PackedPrefill`'s tensors on the host: (cu_query_lens, start_pos, block_tables)."""
    width = max(-(-(start + n) // block_size) for _, start, n in chunks)
    tables = torch.zeros(len(chunks), width, dtype=torch.int32)
    for i, (table, start, n) in enumerate(chunks):
        used = table[: -(-(start + n) // block_size)]
        tables[i, : len(used)] = torch.tensor(used, dtype=torch.int32)
    cu = torch.tensor([0] + [n for *_, n in chunks], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    starts = torch.tensor([start for _, start, _ in chunks], dtype=torch.int32)
    return cu, starts, tables


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer of the stage (the contract is in the module doc)."""

    slot_mapping: torch.Tensor  # (T,) int64 cache slot of each new token, -1 for a padding row
    num_decodes: int = 0  # the first num_decodes tokens are single-token decodes
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int32 decode block tables
    context_lens: torch.Tensor | None = None  # (B,) int32, 0 for a padding row
    # Whether any row is a padding row (slot -1, context 0). The builder knows it on the host; the CPU path reads
    # it instead of inspecting the tensors, which would cost a device-to-host read every step.
    has_padding: bool = False
    prefills: list[PrefillChunk] = field(default_factory=list)
    packed_prefill: PackedPrefill | None = None
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (cos, signed sin), set by the model
    positions: torch.Tensor | None = None  # (T,) set by the model where rotary runs as a kernel
    _workspace: torch.Tensor | None = None  # (2, nkv, B*max_blocks, block_size*hd): reused by every layer
    _bias: torch.Tensor | None = None  # (nkv*B, 1, L) additive decode mask in the model dtype
    _empty_rows: torch.Tensor | None = None  # (B,) bool: decode rows with context 0
    _store: tuple[torch.Tensor | None, torch.Tensor] | None = None  # (rows to store or None for all, slots)

    def store_rows(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(rows whose K/V are stored, their slots): padding rows (slot -1) left out; rows None means all."""
        if self._store is None:
            if not self.has_padding:
                self._store = (None, self.slot_mapping)
            else:
                rows = (self.slot_mapping >= 0).nonzero().squeeze(1)
                self._store = (rows, self.slot_mapping[rows])
        return self._store

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

    def decode_mask(self, num_kv_heads: int, length: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(nkv * B, 1, L) additive mask matching the gathered layout (kv head major, then request), and the
        (B,) rows with context 0 (None when there are none)."""
        if self._bias is None or self._bias.dtype != dtype:
            pad = torch.arange(length, device=self.context_lens.device)[None, :] >= self.context_lens[:, None]
            bias = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill_(pad, float("-inf"))  # (B, L)
            self._bias = bias.repeat(num_kv_heads, 1).view(num_kv_heads * pad.shape[0], 1, length)
            self._empty_rows = (self.context_lens == 0) if self.has_padding else None
        return self._bias, self._empty_rows


class PagedAttention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends over each request's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: (T, nh, hd); k, v: (T, nkv, hd); kv_cache: (2, nkv, NB, bs, hd)
        kernels = _kernels(q)
        if kernels is not None:
            return self._forward_kernels(kernels, q, k, v, kv_cache, meta)
        k_slots = kv_cache[0].view(self.num_kv_heads, -1, self.head_dim)  # (nkv, NB*bs, hd)
        v_slots = kv_cache[1].view(self.num_kv_heads, -1, self.head_dim)
        stored, slots = meta.store_rows()
        new_k, new_v = (k, v) if stored is None else (k[stored], v[stored])  # padding rows store nothing
        k_slots.index_copy_(1, slots, new_k.transpose(0, 1))
        v_slots.index_copy_(1, slots, new_v.transpose(0, 1))
        if meta.num_decodes == q.shape[0]:  # a decode-only step: nothing to place the rows around
            return self._decode(q, kv_cache, meta)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], kv_cache, meta)
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.num_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], k_slots, v_slots, chunk)
        return out

    def _forward_kernels(self, kernels: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        nd = meta.num_decodes
        if nd < q.shape[0] and meta.packed_prefill is None:
            raise ValueError("prefill rows on a kernel device need AttentionMetadata.packed_prefill (pack_prefills)")
        kernels.store_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (T, nh, hd); each kernel fills its rows
        if nd:
            kernels.paged_decode(q[:nd], kv_cache, meta.block_tables, meta.context_lens, self.scale, out=out[:nd])
        if meta.packed_prefill is not None:
            p = meta.packed_prefill
            kernels.paged_prefill(q[nd:], kv_cache, p.block_tables, p.cu_query_lens, p.start_pos, p.max_query_len,
                                  self.scale, out=out[nd:])
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b, nkv, hd = q.shape[0], self.num_kv_heads, self.head_dim
        keys, values = meta.gather_blocks(kv_cache)  # (nkv*B, L, hd)
        queries = q.view(b, nkv, -1, hd).transpose(0, 1).reshape(nkv * b, -1, hd)  # (nkv*B, g, hd)
        bias, empty_rows = meta.decode_mask(nkv, keys.shape[1], q.dtype)  # (nkv*B, 1, L)
        scores = torch.baddbmm(bias, queries, keys.transpose(1, 2), alpha=self.scale)  # (nkv*B, g, L)
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        o = torch.bmm(probs, values).view(nkv, b, -1, hd).transpose(0, 1).reshape(b, self.num_heads, hd)
        if empty_rows is not None:  # padding rows: every key masked, so softmax gave NaN
            o = o.masked_fill(empty_rows[:, None, None], 0.0)
        return o

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
